"""The small deployment several unit tests share (N = 4, q = 0.1, T = 64, orders 2..12)."""

SMALL = dict(
    n_members=4,
    sampling_rate=0.1,
    epsilon=8.0,
    delta=1e-5,
    query_budget=64,
    orders=tuple(range(2, 13)),
)

"""Invariants 1-5 of PMIXED_MATH.md §13 for pmixed.divergence."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed import renyi_divergence, symmetric_renyi_divergence
from pmixed.divergence import renyi_divergence_log, renyi_divergence_pairs
from tests.pmixed.strategies import simplex, simplex_pair

ORDERS = [1.5, 2, 3, 4.5, 8, 16, 32, 64]


def mp_renyi(p, q, alpha) -> mpmath.mpf:
    """50-digit oracle: 1/(α−1) · log Σ p^α q^(1−α)."""
    with mpmath.workdps(50):
        total = mpmath.fsum(
            mpmath.mpf(pi) ** alpha * mpmath.mpf(qi) ** (1 - alpha)
            for pi, qi in zip(p, q)
            if pi > 0
        )
        return mpmath.log(total) / (alpha - 1)


@pytest.mark.parametrize(("a", "b"), [(0.3, 0.6), (1e-3, 0.5), (0.999, 0.01), (0.5, 0.5)])
def test_bernoulli_pairs_match_the_closed_form(a, b):
    p, q = np.array([1 - a, a]), np.array([1 - b, b])
    got = renyi_divergence(p, q, ORDERS + [np.inf])[:-1]
    for alpha, value in zip(ORDERS, got):
        expected = math.log(a**alpha * b ** (1 - alpha) + (1 - a) ** alpha * (1 - b) ** (1 - alpha))
        assert value == pytest.approx(expected / (alpha - 1), rel=1e-12, abs=1e-15)
    d_inf = renyi_divergence(p, q, np.inf)[0]
    assert d_inf == pytest.approx(max(math.log(a / b), math.log((1 - a) / (1 - b))), rel=1e-12)


@settings(max_examples=150)
@given(pair=simplex_pair(max_v=60, zeros=False), alpha=st.sampled_from([2, 3, 5.5, 8, 17, 40, 64]))
def test_log_space_matches_mpmath_oracle_to_1e_9_relative(pair, alpha):
    p, q = pair
    got = renyi_divergence(p, q, alpha)[0]
    expected = float(mp_renyi(p, q, alpha))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-13)


@settings(max_examples=300)
@given(pair=simplex_pair(max_v=1000), orders=st.lists(st.floats(1.01, 64), min_size=1, max_size=5))
def test_never_nan_and_infinite_exactly_on_support_violation(pair, orders):
    p, q = pair
    d = renyi_divergence(p, q, [*orders, np.inf])
    assert not np.isnan(d).any()
    violation = bool(np.any((p > 0) & (q == 0)))
    assert np.isinf(d).all() if violation else np.isfinite(d).all()
    assert (d >= 0).all()


@settings(max_examples=200)
@given(p=simplex(max_v=300))
def test_self_divergence_is_zero(p):
    assert np.allclose(renyi_divergence(p, p, ORDERS + [np.inf]), 0.0, atol=1e-12)


@settings(max_examples=200)
@given(pair=simplex_pair(max_v=300))
def test_divergence_is_nondecreasing_in_order_and_bounded_by_d_inf(pair):
    p, q = pair
    orders = np.array([1.1, 2, 3, 4, 6, 8, 12, 16, 32, 64, np.inf])
    d = renyi_divergence(p, q, orders)
    if np.isinf(d).any():
        return
    assert (np.diff(d) >= -1e-10 * np.maximum(1.0, d[1:])).all()


@settings(max_examples=200)
@given(pair=simplex_pair(max_v=300))
def test_symmetric_divergence_dominates_each_direction(pair):
    p, q = pair
    sym = symmetric_renyi_divergence(p, q, ORDERS)
    assert (sym >= renyi_divergence(p, q, ORDERS)).all()
    assert (sym >= renyi_divergence(q, p, ORDERS)).all()


@settings(max_examples=200)
@given(pair=simplex_pair(min_v=3, max_v=200), data=st.data())
def test_merging_vocabulary_entries_never_increases_divergence(pair, data):
    """Data processing: a deterministic map of the outcome cannot increase D."""
    p, q = pair
    i, j = data.draw(st.lists(st.integers(0, p.size - 1), min_size=2, max_size=2, unique=True))
    merge = lambda x: np.append(np.delete(x, [i, j]), x[i] + x[j])  # noqa: E731
    before = renyi_divergence(p, q, ORDERS)
    after = renyi_divergence(merge(p), merge(q), ORDERS)
    assert (after <= before + 1e-10 * np.maximum(1.0, np.where(np.isinf(before), 0, before))).all()


@settings(max_examples=100)
@given(
    p1q1=simplex_pair(min_v=4, max_v=4, zeros=False),
    p2q2=simplex_pair(min_v=4, max_v=4, zeros=False),
    w=st.floats(0, 1),
)
def test_mixtures_never_exceed_the_worst_component_f4(p1q1, p2q2, w):
    (p1, q1), (p2, q2) = p1q1, p2q2
    mixed = renyi_divergence(w * p1 + (1 - w) * p2, w * q1 + (1 - w) * q2, ORDERS)
    worst = np.maximum(renyi_divergence(p1, q1, ORDERS), renyi_divergence(p2, q2, ORDERS))
    assert (mixed <= worst * (1 + 1e-9) + 1e-12).all()


def test_shapes_broadcast_over_leading_axes_and_orders():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=(3, 2))
    q = rng.dirichlet(np.ones(7))
    d = renyi_divergence(p, q, [2, 3, np.inf])
    assert d.shape == (3, 2, 3)
    assert d.dtype == np.float64
    assert renyi_divergence(p, q, 2).shape == (3, 2, 1)
    np.testing.assert_allclose(d[1, 0], renyi_divergence(p[1, 0], q, [2, 3, np.inf]), rtol=1e-14)


def test_chunking_over_orders_gives_the_same_values():
    rng = np.random.default_rng(1)
    lp = np.log(rng.dirichlet(np.ones(50), size=4))
    lq = np.log(rng.dirichlet(np.ones(50)))
    orders = np.arange(2, 40)
    whole = renyi_divergence_log(lp, lq, orders)
    chunked = renyi_divergence_log(lp, lq, orders, max_bytes=1)
    np.testing.assert_array_equal(whole, chunked)


@settings(max_examples=100)
@given(pair=simplex_pair(max_v=100), alpha=st.sampled_from([2.0, 7.0, 33.0, np.inf]))
def test_row_wise_pairs_equal_the_batched_divergence(pair, alpha):
    lp, lq = (np.log(np.where(x > 0, x, 1.0)) + np.where(x > 0, 0.0, -np.inf) for x in pair)
    one = renyi_divergence_pairs(lp[None], lq[None], np.array([alpha]))[0]
    assert one == renyi_divergence_log(lp, lq, alpha)[0] or np.isclose(
        one, renyi_divergence_log(lp, lq, alpha)[0], rtol=1e-14
    )


@pytest.mark.parametrize(
    ("p", "q", "orders", "message"),
    [
        ([0.5, np.nan], [0.5, 0.5], 2, "p must contain probabilities"),
        ([0.5, 0.6], [0.5, 0.5], 2, "p rows must sum to 1"),
        ([0.5, 0.5], [1.5, -0.5], 2, "q must contain probabilities"),
        ([0.5, 0.5], [0.5, 0.5], 1.0, r"orders must be in \(1, inf\]"),
        ([0.5, 0.5], [0.5, 0.5], [2, np.nan], "orders must be in"),
    ],
)
def test_bad_input_raises_value_error_naming_the_parameter(p, q, orders, message):
    with pytest.raises(ValueError, match=message):
        renyi_divergence(p, q, orders)

"""Rényi divergences in float64 log space, vectorised over leading axes and orders.

For an order α > 1 (van Erven & Harremoës 2014, "Rényi divergence and Kullback-Leibler divergence"):

    D_α(P‖Q) = 1/(α−1) · log Σ_{v: P(v)>0} P(v)^α Q(v)^{1−α}
    D_∞(P‖Q) = log max_{v: P(v)>0} P(v)/Q(v)

Both are +∞ exactly when some v has P(v) > 0 = Q(v). The sum is a logsumexp of
α·log P − (α−1)·log Q over the support of P; entries outside that support are masked *before* any
arithmetic, so exact zeros (e.g. after top-k) never produce NaN.
"""

from __future__ import annotations

import numpy as np

from pmixed._checks import as_log_distribution, check_orders, logsumexp

__all__ = [
    "renyi_divergence",
    "renyi_divergence_log",
    "symmetric_renyi_divergence",
]

#: Values in [-NEGATIVE_SLACK, 0) are rounding noise and are clamped to 0; anything lower raises.
NEGATIVE_SLACK = 1e-12
#: Default cap on the [..., orders_chunk, V] float64 work array, in bytes.
DEFAULT_MAX_BYTES = 256 * 2**20


def renyi_divergence(p: object, q: object, orders: object) -> np.ndarray:
    """Rényi divergence D_α(P‖Q) of probability vectors at one or more orders.

    Args:
        p: probabilities ``[..., V]``; each row sums to 1 (tolerance 1e-6); zeros allowed.
        q: probabilities, broadcastable against ``p``.
        orders: a scalar or 1-D sequence of orders in (1, ∞]; ``np.inf`` gives D_∞.

    Returns:
        float64 array ``[..., n_orders]`` (a scalar order gives ``n_orders = 1``); ``+inf`` exactly
        where supp P ⊄ supp Q; never NaN.

    Raises:
        ValueError: a distribution has NaN, negative entries or does not sum to 1; an order ≤ 1.
    """
    return renyi_divergence_log(as_log_distribution(p, "p"), as_log_distribution(q, "q"), orders)


def symmetric_renyi_divergence(p: object, q: object, orders: object) -> np.ndarray:
    """D^↔_α(P, Q) = max(D_α(P‖Q), D_α(Q‖P)), shaped like :func:`renyi_divergence`."""
    lp, lq = as_log_distribution(p, "p"), as_log_distribution(q, "q")
    return np.maximum(renyi_divergence_log(lp, lq, orders), renyi_divergence_log(lq, lp, orders))


def renyi_divergence_log(
    logp: np.ndarray,
    logq: np.ndarray,
    orders: object,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """D_α(P‖Q) from normalised float64 log-probabilities (``-inf`` marks an exact zero).

    This is the unchecked core used on the privacy path; callers pass rows that were validated and
    renormalised (see :func:`renyi_divergence`). Orders are processed in chunks so that the work
    array ``[..., chunk, V]`` stays under ``max_bytes``.

    Raises:
        FloatingPointError: a divergence came out below ``-1e-12`` or NaN (never silently fixed).
    """
    alphas = check_orders(orders)
    lp, lq = np.broadcast_arrays(np.asarray(logp, np.float64), np.asarray(logq, np.float64))
    in_p = lp > -np.inf
    violation = np.any(in_p & (lq == -np.inf), axis=-1)  # [...]
    # d = log P - log Q on supp P, -inf off it; 0 at violating entries (their result is +inf).
    with np.errstate(invalid="ignore"):
        d = np.where(in_p, lp - lq, -np.inf)
    d = np.where(in_p & (lq == -np.inf), 0.0, d)

    lead = lp.shape[:-1]
    out = np.empty((*lead, alphas.size), dtype=np.float64)
    finite_idx = np.flatnonzero(np.isfinite(alphas))
    if np.isinf(alphas).any():
        out[..., np.isinf(alphas)] = np.max(d, axis=-1)[..., None]
    row_bytes = max(1, int(np.prod(lp.shape, dtype=np.int64)) * 8)
    chunk = max(1, min(finite_idx.size, max_bytes // row_bytes))
    for start in range(0, finite_idx.size, chunk):
        idx = finite_idx[start : start + chunk]
        am1 = (alphas[idx] - 1.0)[:, None]  # [c, 1]
        # terms[..., c, V] = log P + (α-1)·(log P - log Q) = α·log P − (α−1)·log Q on supp P.
        terms = lp[..., None, :] + am1 * d[..., None, :]
        out[..., idx] = logsumexp(terms, axis=-1) / am1[:, 0]
    out[violation] = np.inf
    return _clamp(out)


def _clamp(out: np.ndarray) -> np.ndarray:
    if np.isnan(out).any():
        raise FloatingPointError("renyi_divergence produced NaN; refusing to return it.")
    low = out < -NEGATIVE_SLACK
    if low.any():
        raise FloatingPointError(
            f"renyi_divergence came out negative ({out[low].min():.3e}); inputs are not normalised."
        )
    return np.where(out < 0, 0.0, out)


def renyi_divergence_pairs(
    logp: np.ndarray, logq: np.ndarray, orders: np.ndarray, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray:
    """Row-wise D_{orders[i]}(P_i‖Q_i) for ``logp, logq [P, V]`` and ``orders [P]`` (∞ allowed).

    The same log-space formula as :func:`renyi_divergence_log`, one order per row: the mollifier
    evaluates exactly the (member, constraint) pairs it still needs.
    """
    alphas = np.asarray(orders, np.float64)
    n_rows, v = logp.shape
    out = np.empty(n_rows)
    chunk = max(1, max_bytes // max(1, v * 8 * 3))
    for s in range(0, n_rows, chunk):
        lp, lq, a = logp[s : s + chunk], logq[s : s + chunk], alphas[s : s + chunk]
        in_p = lp > -np.inf
        bad = in_p & (lq == -np.inf)
        with np.errstate(invalid="ignore"):
            d = np.where(in_p, lp - lq, -np.inf)
        d[bad] = 0.0
        inf_order = np.isinf(a)
        am1 = np.where(inf_order, 1.0, a - 1.0)[:, None]
        res = logsumexp(lp + am1 * d, axis=-1) / am1[:, 0]
        if inf_order.any():
            res[inf_order] = np.max(d[inf_order], axis=-1)
        res[bad.any(axis=-1)] = np.inf
        out[s : s + chunk] = res
    return _clamp(out)

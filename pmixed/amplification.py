"""Per-query RDP of PMixED: base bounds over subset pairs and Poisson-subsampling amplification.

All arithmetic is in log space (binomials through ``lgamma``; ``logaddexp``/``log1p``/``expm1``),
because (k−1)·ε(k) reaches the thousands at k = 64.
"""

from __future__ import annotations

import math

import numpy as np

from pmixed._checks import logsumexp

__all__ = [
    "base_rdp_capped",
    "base_rdp_certified",
    "base_rdp_reference",
    "poisson_subsampled_rdp",
    "rdp_budget",
    "rdp_to_epsilon",
]

LOG3 = math.log(3.0)


def _log_mix_one(x: np.ndarray, w: float) -> np.ndarray:
    """log((1 − w) + w·e^x) for x ≥ 0, w ∈ (0, 1], with full relative precision as x → 0.

    ``logaddexp(log(1−w), x + log w)`` cancels to rounding noise when x is tiny (β ≈ 1e-20 broke
    monotonicity in k); ``log1p(w·expm1(x))`` is exact there and overflows only for large x.
    """
    x = np.asarray(x, np.float64)
    small = x < 1.0
    out = np.empty_like(x)
    out[small] = np.log1p(w * np.expm1(x[small]))
    big = x[~small]
    out[~small] = big + math.log(w) if w == 1.0 else np.logaddexp(math.log1p(-w), big + math.log(w))
    return out


def base_rdp_certified(beta: float, k: np.ndarray) -> np.ndarray:
    """Worst-case RDP at integer orders k over every AR pair of subsets, certified mode.

    With D_γ(p̄_i‖p0) ≤ βγ and D_γ(p0‖p̄_i) ≤ βγ for all integer γ ≤ 2·max(k), Mironov's weak
    triangle inequality (arXiv 1702.07476, Prop. 11) at orders (2k−1, 2k) through p0 bounds two
    mixtures by 4βk, and joint convexity with weight 1/(m+1) (worst at m = 1) gives
    ``max(βk, (logaddexp(0, (k−1)·4βk) − log 2)/(k−1))``; the βk term covers S = ∅ vs {j}.
    """
    k = np.asarray(k, np.float64)
    mixture = _log_mix_one((k - 1.0) * 4.0 * beta * k, 0.5) / (k - 1.0)
    return np.maximum(beta * k, mixture)


def base_rdp_capped(beta: float, lambda_max: float, k: np.ndarray) -> np.ndarray:
    """Capped mode: every mixture is ≥ (1−λ_max)·p0, so D_k(A‖p̄_j) ≤ βk + L, L = −log(1−λ_max)."""
    k = np.asarray(k, np.float64)
    big_l = -math.log1p(-lambda_max)
    mixture = _log_mix_one((k - 1.0) * (beta * k + big_l), 0.5) / (k - 1.0)
    return np.maximum(beta * k, mixture)


def base_rdp_reference(beta: float, n: int, k: np.ndarray) -> np.ndarray:
    """The paper code's per-size loss (UNCERTIFIED): βk if n ≤ 1, else log((n−1)/n + e^{(k−1)4βk}/n)/(k−1)."""
    k = np.asarray(k, np.float64)
    if n <= 1:
        return beta * k
    return _log_mix_one((k - 1.0) * 4.0 * beta * k, 1.0 / n) / (k - 1.0)


def poisson_subsampled_rdp(
    base: np.ndarray, q: float, orders: np.ndarray, *, tight: bool = False
) -> np.ndarray:
    """RDP of Poisson(q)-subsampling a mechanism whose RDP at integer order k is ``base[k]``.

    Zhu & Wang, "Poisson Subsampled Rényi Differential Privacy", ICML 2019 (PMLR 97), Theorem 6
    (general upper bound), for integer α ≥ 2, in log space::

        t0  = (α−1)·log1p(−q) + log1p((α−1)·q)
        t_k = logC(α,k) + (α−k)·log1p(−q) + k·log q + (k−1)·ε(k),   k = 2..α
        ε_sub(α) = logsumexp(t0, t_2, t_3 + log 3, …, t_α + log 3) / (α−1)

    ``tight=True`` drops the ``log 3`` (their Theorem 8 form, exact for the Gaussian mechanism and an
    upper bound for other mechanisms only under an extra condition; see PMIXED_MATH.md §8).

    Args:
        base: float64 array indexed by the order k (entries 0 and 1 are ignored), covering at least
            ``max(orders)``; ``+inf`` entries make every order that uses them ``+inf``.
        q: Poisson sampling rate in [0, 1].
        orders: integer orders ≥ 2.

    Returns:
        float64 array shaped like ``orders``.
    """
    orders_i = np.asarray(orders, dtype=np.int64)
    base = np.asarray(base, np.float64)
    if orders_i.size and base.size <= orders_i.max():
        raise ValueError(f"base must cover order {orders_i.max()}. Found length {base.size}.")
    if q == 0.0:
        return np.zeros(orders_i.shape)
    out = np.empty(orders_i.shape)
    a_max = int(orders_i.max()) if orders_i.size else 2
    ks = np.arange(2, a_max + 1)
    if q == 1.0:
        extra = 0.0 if tight else LOG3
        for i, a in enumerate(orders_i):
            out[i] = base[a] + (extra / (a - 1) if a >= 3 else 0.0)
        return out
    log_q, log_1mq = math.log(q), math.log1p(-q)
    for i, a in enumerate(orders_i):
        k = ks[ks <= a]
        eps = base[k]
        if np.isposinf(eps).any():
            out[i] = np.inf
            continue
        log_w = _log_comb(a, k) + (a - k) * log_1mq + k * log_q  # Bin(k; α, q)
        x = (k - 1) * eps
        c = np.where(k >= 3, 1.0 if tight else 3.0, 1.0)
        if x.max(initial=0.0) < 700.0:
            # The sum is 1 + Σ w_k (c_k e^{x_k} − 1) since Σ_k Bin(k; α, q) = 1: log1p of a sum of
            # non-negative terms keeps full relative precision when the result is tiny.
            s = np.exp(log_w) * (c * np.expm1(x) + (c - 1.0))
            out[i] = math.log1p(math.fsum(s)) / (a - 1)
        else:
            t = log_w + x + np.log(c)
            t0 = (a - 1) * log_1mq + math.log1p((a - 1) * q)
            out[i] = float(logsumexp(np.append(t, t0), axis=0)) / (a - 1)
    if np.isnan(out).any():
        raise FloatingPointError("poisson_subsampled_rdp produced NaN.")
    return out


def rdp_budget(epsilon: float, delta: float, orders: np.ndarray) -> np.ndarray:
    """Per-order RDP budget B(k) = ε − log((k−1)/k) + (log δ + log k)/(k−1).

    The inverse of the conversion ε(k) = R(k) + log((k−1)/k) − (log δ + log k)/(k−1)
    (Canonne, Kamath & Steinke 2020, Prop. 12; Balle et al. 2020, Thm 21), the one that
    ``dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon`` applies.
    """
    k = np.asarray(orders, np.float64)
    return epsilon - np.log1p(-1.0 / k) + (math.log(delta) + np.log(k)) / (k - 1.0)


def rdp_to_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, int]:
    """(ε, optimal order) from a composed RDP curve, through dp-accounting's ``compute_epsilon``."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    rdp = np.asarray(rdp, np.float64)
    if (rdp < 0).any() or np.isnan(rdp).any():
        raise ValueError(
            f"rdp must be >= 0 at every order. Found {rdp[(rdp < 0) | np.isnan(rdp)]}."
        )
    eps, order = compute_epsilon(list(map(float, orders)), list(map(float, rdp)), delta)
    return float(eps), int(order)


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln

    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)

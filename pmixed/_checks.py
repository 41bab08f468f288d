"""Input validation shared by the mechanism's public functions.

Every check raises a one-line ``ValueError`` that names the parameter and the allowed range, in the
phrasing dp-accounting uses: ``"sampling_rate must be in (0, 1]. Found 1.5."``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from accounting.checks import finite, is_int, is_real  # noqa: F401 (one definition each)

#: Tolerance on |sum(p) - 1| for a probability vector given by the caller.
SUM_TOLERANCE = 1e-6


def as_log_distribution(p: object, name: str) -> np.ndarray:
    """Validates probability vectors ``[..., V]`` and returns float64 log-probabilities.

    Entries must be finite and >= 0 and each row must sum to 1 within ``SUM_TOLERANCE``. Rows are
    then renormalised in log space, so exact zeros become ``-inf`` and the row sums to 1 to rounding.

    Raises:
        ValueError: naming ``name`` when an entry is NaN, infinite, negative, or a row does not sum
            to 1.
    """
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1. Found shape {arr.shape}.")
    if np.isnan(arr).any():
        raise ValueError(f"{name} must contain probabilities in [0, 1]. Found NaN.")
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1 + SUM_TOLERANCE).any():
        bad = arr[~np.isfinite(arr) | (arr < 0) | (arr > 1 + SUM_TOLERANCE)].flat[0]
        raise ValueError(f"{name} must contain probabilities in [0, 1]. Found {bad}.")
    sums = arr.sum(axis=-1)
    worst = np.max(np.abs(sums - 1.0)) if sums.size else 0.0
    if worst > SUM_TOLERANCE:
        bad = sums.flat[int(np.argmax(np.abs(sums - 1.0)))]
        raise ValueError(
            f"{name} rows must sum to 1 (tolerance {SUM_TOLERANCE:g}). Found a row summing to {bad}."
        )
    with np.errstate(divide="ignore"):
        logp = np.log(arr)
    return logp - _logsumexp(logp, axis=-1, keepdims=True)


def check_orders(orders: object, *, allow_inf: bool = True) -> np.ndarray:
    """Returns a 1-D float64 array of Rényi orders, each > 1 (``inf`` allowed when ``allow_inf``)."""
    arr = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"orders must be a scalar or a non-empty 1-D sequence. Found {orders!r}.")
    bad = arr[np.isnan(arr) | (arr <= 1) | ((not allow_inf) & np.isinf(arr))]
    if bad.size:
        allowed = "(1, inf]" if allow_inf else "(1, inf)"
        raise ValueError(f"orders must be in {allowed}. Found {bad[0]}.")
    return arr


def check_integer_orders(orders: Sequence[int] | np.ndarray) -> tuple[int, ...]:
    """Accounting orders: a strictly increasing sequence of integers >= 2."""
    try:
        values = [int(o) for o in orders]
    except (TypeError, ValueError):
        raise ValueError(f"orders must be integers >= 2. Found {orders!r}.") from None
    if not values or any(v != o or isinstance(o, bool) for v, o in zip(values, orders)):
        raise ValueError(f"orders must be a non-empty sequence of integers >= 2. Found {orders!r}.")
    if min(values) < 2 or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(
            f"orders must be strictly increasing integers >= 2. Found {tuple(values)!r}."
        )
    return tuple(values)


def _logsumexp(a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    """log(sum(exp(a))) along ``axis`` that returns -inf (not NaN) for all -inf rows."""
    m = np.max(a, axis=axis, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - m_safe), axis=axis, keepdims=True)) + m_safe
    out = np.where(m == -np.inf, -np.inf, out)
    return out if keepdims else np.squeeze(out, axis=axis)


logsumexp = _logsumexp

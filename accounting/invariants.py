"""The budget invariants of a ledger: the fsum of its curves, B(k), and every overrun.

Below both the ledger (whose verification fails on an overrun) and the accountant (which reports
it), so neither imports the other for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from accounting.events import curve_at

__all__ = ["OVERRUN_RTOL", "overruns", "rdp_limits", "sum_curves"]


def sum_curves(
    counted: Iterable[tuple[dp_event.DpEvent, int]], orders: Iterable[float]
) -> np.ndarray:
    """Σ count·curve at ``orders`` with ``math.fsum`` per order: the independent cross-check."""
    orders = np.asarray(list(orders), np.float64)
    terms = [count * curve_at(ev, orders) for ev, count in counted if count > 0]
    if not terms:
        return np.zeros(orders.shape)
    stack = np.stack(terms)
    return np.array([math.fsum(col) if np.isfinite(col).all() else math.inf for col in stack.T])


def rdp_limits(epsilon: float, delta: float, orders: Iterable[float]) -> np.ndarray:
    """B(k) = ε − log((k−1)/k) + log(δ·k)/(k−1): the RDP at order k that converts to (ε, δ)
    (the inverse of dp-accounting's conversion, Canonne–Kamath–Steinke 2020, Prop. 12)."""
    k = np.asarray(list(orders), np.float64)
    return epsilon - np.log1p(-1.0 / k) + np.log(delta * k) / (k - 1.0)


#: Relative slack on the composed-epsilon check of :func:`overruns` (float rounding of the
#: conversion only: the filter's own test at the monitored orders is exact).
OVERRUN_RTOL = 1e-12


def overruns(contents: object) -> list[str]:
    """Every way a verified ledger exceeds the budget fixed in its header (empty: none).

    Two invariants, each enough for a failure: (1) at every monitored order k the RDP spent
    (``math.fsum`` over the charged curves, the filter's own arithmetic) is ≤ B(k); (2) the
    composed ε at the budget's δ, minimised over the header's orders, is ≤ the budget's ε. A
    ledger written through the Rényi filter satisfies both; a correctly re-hashed forged append
    (or a filter bug) does not.
    """
    budget = contents.header["budget"]
    if budget is None:
        return []
    counted = contents.counted_events()
    mon = [float(k) for k in budget["monitored_orders"]]
    spent = sum_curves(counted, mon)
    limits = rdp_limits(budget["epsilon"], budget["delta"], mon)
    out = [
        f"RDP at monitored order {k:g} spent {s:.6g} > budget {b:.6g}"
        for k, s, b in zip(mon, spent, limits)
        if s > b
    ]
    grid = [float(k) for k in contents.header["orders"]]
    eps, _ = rdp_lib.compute_epsilon(grid, sum_curves(counted, grid), budget["delta"])
    if eps > budget["epsilon"] * (1 + OVERRUN_RTOL):
        out.append(
            f"composed epsilon {eps:.6g} > budget epsilon {budget['epsilon']:g} "
            f"at delta {budget['delta']:g}"
        )
    return out

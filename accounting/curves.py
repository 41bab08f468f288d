"""Curves a report plots, computed here so that ``reports/`` never computes privacy itself.

* :func:`burn_down`: ε(δ) of a ledger's first k queries, for k on a grid up to every query;
* :func:`cost_trace`: each query's RDP at one order, and whether it was a public step;
* :func:`epsilon_by_order`: the RDP → (ε, δ) conversion at every order of a curve (the minimum
  is the reported ε; the plot marks where it is attained);
* :func:`privacy_profile`: ε(δ) of one RDP curve for several δ.

All of them read data-independent costs only: the public ledger file (event records and the
sequence of queries), never the restricted sibling.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from accounting._records import Fault
from accounting.accountant import compose
from accounting.events import curve_at
from accounting.reading import LedgerContents, LedgerCorrupt, read_ledger

__all__ = ["burn_down", "cost_trace", "epsilon_by_order", "privacy_profile"]


def _replay(path: Path):
    """Yields (contents so far, the query's event) after each query record, verifying as it goes."""
    contents = LedgerContents()
    lines = path.read_bytes().split(b"\n")[:-1]
    for i, line in enumerate(lines, start=1):
        before = dict(contents.tally)
        try:
            contents.feed(line)
        except Fault as fault:
            raise LedgerCorrupt(i, str(fault), path) from None
        if contents.tally != before:
            yield contents, next(e for e, n in contents.tally.items() if before.get(e, 0) != n)


def burn_down(path: str | os.PathLike, delta: float, *, points: int = 64) -> list[dict]:
    """``[{"queries": k, "epsilon": ε_k, "public_steps": p_k}]`` for k on an even grid to the end."""
    path = Path(path)
    total = read_ledger(path).n_queries
    if total == 0:
        return []
    grid = set(np.unique(np.linspace(1, total, min(points, total)).round().astype(int)).tolist())
    out = []
    for contents, _ in _replay(path):
        if contents.n_queries in grid:
            snap = copy.copy(contents)
            snap.tally = dict(contents.tally)
            spent = compose(snap, delta)
            out.append(
                {
                    "queries": contents.n_queries,
                    "epsilon": spent.epsilon,
                    "public_steps": contents.n_public_steps,
                }
            )
    return out


def cost_trace(path: str | os.PathLike, order: float) -> dict:
    """Each query's RDP at ``order`` (0 for a public step) and a public-step flag, in order."""
    cost, public = [], []
    for _, event in _replay(Path(path)):
        is_public = isinstance(event, dp_event.NoOpDpEvent)
        cost.append(0.0 if is_public else float(curve_at(event, np.array([order]))[0]))
        public.append(is_public)
    return {"order": order, "rdp": cost, "public": public}


def epsilon_by_order(orders: Sequence[float], rdp: Sequence[float], delta: float) -> list[float]:
    """ε at each order alone (inf where the RDP is infinite), by dp-accounting's conversion."""
    out = []
    for a, r in zip(orders, rdp):
        if not math.isfinite(r):
            out.append(math.inf)
            continue
        eps, _ = rdp_lib.compute_epsilon([a], [r], delta)
        out.append(float(eps))
    return out


def privacy_profile(
    orders: Sequence[float], rdp: Sequence[float], deltas: Sequence[float]
) -> list[dict]:
    """``[{"delta": δ, "epsilon": ε(δ)}]`` of one RDP curve."""
    return [
        {"delta": float(d), "epsilon": float(rdp_lib.compute_epsilon(orders, rdp, d)[0])}
        for d in deltas
    ]

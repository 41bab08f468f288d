"""Composition: an ``RdpAccountant`` that understands PMixED events, and ``compose`` over a ledger.

:class:`PMixEDAccountant` subclasses ``dp_accounting.rdp.RdpAccountant``. It composes
:class:`~accounting.events.PMixEDQueryEvent` and :class:`~accounting.events.RdpCurveEvent` by adding
their curves (rounded up to the accountant's orders, see :func:`~accounting.events.curve_at`) and hands
every other event to dp-accounting. As in dp-accounting, ``compose`` dry-runs the whole event first and
changes nothing if any part is unsupported.

Conversion to (ε, δ) is dp-accounting's ``compute_epsilon`` (Canonne–Kamath–Steinke 2020, Prop. 12;
Balle et al. 2020, Thm 21).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from accounting.events import PMixEDQueryEvent, RdpCurveEvent, curve_at
from accounting.invariants import overruns, rdp_limits, sum_curves
from accounting.ledger import Ledger
from accounting.reading import LedgerContents, read_ledger

__all__ = ["PMixEDAccountant", "Spent", "compose", "overruns", "rdp_limits", "sum_curves"]

_RELATIONS = {
    "add_remove": NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": NeighboringRelation.REPLACE_ONE,
}
_STATUS_RANK = {"certified": 0, "conditional": 1, "UNCERTIFIED": 2}

#: Relative agreement required between the accountant and the fsum cross-check.
CROSS_CHECK_RTOL = 1e-9


class PMixEDAccountant(rdp_lib.RdpAccountant):
    """dp-accounting's RDP accountant, extended with PMixED's events.

    Args:
        orders: the RDP orders to track; PMixED events are rounded up to them.
        neighboring_relation: PMixED events must state the same relation, else they are refused.

    Attributes:
        status: the weakest status composed so far: ``"certified"``, ``"conditional"`` or
            ``"UNCERTIFIED"`` (any reference-mode event makes the total a claim, not a guarantee).
    """

    def __init__(
        self,
        orders: Iterable[float] | None = None,
        neighboring_relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
    ) -> None:
        super().__init__(None if orders is None else list(orders), neighboring_relation)
        self.status = "certified"

    @property
    def certified(self) -> bool:
        return self.status != "UNCERTIFIED"

    def _maybe_compose(
        self, event: dp_event.DpEvent, count: int, do_compose: bool
    ) -> rdp_lib.privacy_accountant.PrivacyAccountant.CompositionErrorDetails | None:
        if not isinstance(event, (PMixEDQueryEvent, RdpCurveEvent)):
            return super()._maybe_compose(event, count, do_compose)
        if _RELATIONS[event.relation] != self.neighboring_relation:
            return self.CompositionErrorDetails(
                invalid_event=event,
                error_message=(
                    f"event relation {event.relation!r} does not match the accountant's "
                    f"{self.neighboring_relation}."
                ),
            )
        if do_compose and count > 0:
            self._rdp = self._rdp + count * curve_at(event, self._orders)
            if _STATUS_RANK[event.status] > _STATUS_RANK[self.status]:
                self.status = event.status
        return None


@dataclass(frozen=True)
class Spent:
    """Privacy spent by a ledger, as composed by :class:`PMixEDAccountant`.

    Attributes:
        epsilon: ε at ``delta`` from dp-accounting's ``compute_epsilon``.
        delta: the δ asked for.
        optimal_order: the order that attains ``epsilon``.
        orders: the accountant's orders.
        rdp: the total RDP at ``orders`` (+inf where some event has no bound).
        steps: the number of queries charged (public steps included).
        public_steps: how many of them were answered by the public model at zero cost.
        status: ``"certified"``, ``"conditional"`` or ``"UNCERTIFIED"``.
        relation: the neighbouring relation of every composed event.
        epsilon_cross_check: ε from ``compute_epsilon`` on the curves summed with ``math.fsum``.
        budget: the budget fixed in the ledger header (``epsilon``, ``delta``,
            ``monitored_orders``), or None.
        overrun: one line per violated budget invariant (:func:`overruns`); empty when the
            ledger stays within its header's budget (or has none).
        delta_sampler: the δ the token sampler adds: n·(1 + e^ε)·τ for n charged queries whose
            released law is within total variation τ of the analysed one (the header's
            ``sampler_tv_per_query``; 0 when it records none). The claim is (ε, δ + this).
    """

    epsilon: float
    delta: float
    optimal_order: float
    orders: tuple[float, ...]
    rdp: tuple[float, ...]
    steps: int
    public_steps: int
    status: str
    relation: str
    epsilon_cross_check: float
    budget: dict | None = None
    overrun: tuple[str, ...] = ()
    delta_sampler: float = 0.0

    @property
    def certified(self) -> bool:
        return self.status != "UNCERTIFIED"

    def to_json(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "optimal_order": self.optimal_order,
            "orders": list(self.orders),
            "rdp": [r if math.isfinite(r) else "inf" for r in self.rdp],
            "steps": self.steps,
            "public_steps": self.public_steps,
            "status": self.status,
            "certified": self.certified,
            "relation": self.relation,
            "epsilon_cross_check": self.epsilon_cross_check,
            "budget": self.budget,
            "overrun": list(self.overrun),
            "delta_sampler": self.delta_sampler,
            "accountant": f"dp-accounting {_dp_accounting_version()} RdpAccountant",
        }


def compose(
    ledger_or_path: object, delta: float, *, orders: Iterable[float] | None = None
) -> Spent:
    """Verifies a ledger, composes every charged query, and converts to (ε, δ).

    Args:
        ledger_or_path: an :class:`~accounting.ledger.Ledger`, a
            :class:`~accounting.ledger.LedgerContents`, or a path to a ledger file.
        delta: target δ, in (0, 1).
        orders: the accountant's orders; default the ledger header's grid.

    Raises:
        ValueError: bad ``delta``; the ledger mixes relations.
        accounting.ledger.LedgerCorrupt: the ledger does not verify (line number and reason).
        ArithmeticError: the accountant and the fsum cross-check disagree beyond 1e-9 relative.
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1). Found {delta!r}.")
    if isinstance(ledger_or_path, LedgerContents):
        contents = ledger_or_path
    elif isinstance(ledger_or_path, Ledger):
        contents = ledger_or_path.contents()
    elif isinstance(ledger_or_path, (str, os.PathLike)):
        contents = read_ledger(ledger_or_path)
    else:
        raise TypeError(f"ledger_or_path must be a Ledger or a path. Found {type(ledger_or_path)}.")
    counted = contents.counted_events()
    relations = {ev.relation for ev, n in counted if n and hasattr(ev, "relation")}
    if len(relations) > 1:
        raise ValueError(f"the ledger mixes neighbouring relations {sorted(relations)}.")
    relation = relations.pop() if relations else contents.header.get("relation", "add_remove")
    grid = list(contents.orders if orders is None else orders)
    acc = PMixEDAccountant(grid, _RELATIONS[relation])
    for ev, n in counted:
        if n:
            acc.compose(ev, n)
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    summed = sum_curves(counted, grid)
    eps_check, _ = rdp_lib.compute_epsilon(grid, summed, delta)
    if not _close(eps, eps_check):
        raise ArithmeticError(
            f"accountant epsilon {eps!r} and fsum cross-check {eps_check!r} disagree beyond "
            f"{CROSS_CHECK_RTOL:g} relative."
        )
    return Spent(
        epsilon=float(eps),
        delta=float(delta),
        optimal_order=float(order),
        orders=tuple(float(k) for k in grid),
        rdp=tuple(float(r) for r in acc.rdp),
        steps=contents.n_queries,
        public_steps=contents.n_public_steps,
        status=acc.status,
        relation=relation,
        epsilon_cross_check=float(eps_check),
        budget=contents.header["budget"],
        overrun=tuple(overruns(contents)),
        delta_sampler=_delta_sampler(contents, float(eps)),
    )


def _delta_sampler(contents: object, eps: float) -> float:
    """n·(1 + e^ε)·τ in log space (TV τ per query, composed additively over n queries)."""
    tv = contents.header["calibration"].get("sampler_tv_per_query", 0.0)
    n = contents.n_queries - contents.n_public_steps
    if not tv or not n:
        return 0.0
    if not math.isfinite(eps):
        return 1.0
    return min(1.0, math.exp(math.log(tv) + math.log(n) + float(np.logaddexp(0.0, eps))))


def _close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= CROSS_CHECK_RTOL * max(1.0, abs(a), abs(b))


def _dp_accounting_version() -> str:
    from importlib.metadata import version

    return version("dp-accounting")

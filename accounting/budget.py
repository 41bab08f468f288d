"""The privacy budget and the Rényi filter that guards it.

A :class:`PrivacyBudget` turns a target (ε, δ) into a per-order RDP budget

    B(k) = ε − log((k−1)/k) + log(δ·k)/(k−1)

the inverse of dp-accounting's conversion (Canonne–Kamath–Steinke 2020, Prop. 12): a total RDP
R(k) ≤ B(k) at any one order k gives (ε, δ)-DP.

A :class:`RenyiFilter` fixes the monitored orders and their budgets before deployment (the ledger header
records them) and admits a query only if, at every monitored order, the spent RDP plus the query's cost
stays ≤ B(k) (Feldman & Zrnic 2021, arXiv 2008.11193; Lécuyer 2021, arXiv 2103.01379: valid because the
costs are predictable, i.e. fixed by public state). A refused charge raises :class:`BudgetExhausted`
and writes nothing. With a ledger, the spent amount is always recomputed from the file under its lock,
so a restarted server, or a second process on the same ledger, cannot overspend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from accounting.checks import is_real
from accounting.events import curve_at
from accounting.invariants import rdp_limits, sum_curves
from accounting.ledger import Ledger, Receipt

__all__ = ["BudgetExhausted", "PrivacyBudget", "RenyiFilter"]


class BudgetExhausted(RuntimeError):
    """The query cannot be paid for: serve it from the public model or refuse it."""


@dataclass(frozen=True)
class PrivacyBudget:
    """A target (ε, δ) and the RDP orders it may be spent at.

    Args:
        epsilon: target ε, finite and > 0.
        delta: target δ, in (0, 1).
        orders: RDP orders > 1, strictly increasing.
    """

    epsilon: float
    delta: float
    orders: tuple[float, ...]

    def __post_init__(self) -> None:
        problems = []
        if not is_real(self.epsilon) or not math.isfinite(self.epsilon) or self.epsilon <= 0:
            problems.append(f"epsilon must be finite and > 0. Found {self.epsilon!r}.")
        if not is_real(self.delta) or not 0 < self.delta < 1:
            problems.append(f"delta must be in (0, 1). Found {self.delta!r}.")
        orders = tuple(self.orders) if isinstance(self.orders, (Sequence, np.ndarray)) else ()
        if (
            not orders
            or not all(is_real(k) and math.isfinite(k) and k > 1 for k in orders)
            or any(b <= a for a, b in zip(orders, orders[1:]))
        ):
            problems.append(f"orders must be increasing reals > 1. Found {self.orders!r}.")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "orders", orders)

    def limits(self, orders: Sequence[float] | None = None) -> np.ndarray:
        """B(k) at ``orders`` (default: all of the budget's orders)."""
        return rdp_limits(self.epsilon, self.delta, self.orders if orders is None else orders)

    def best_order(self, per_query: dp_event.DpEvent, n_queries: int) -> float:
        """The order minimising ε after ``n_queries`` charges of ``per_query``: the one to monitor."""
        total = n_queries * curve_at(per_query, self.orders)
        return float(rdp_lib.compute_epsilon(self.orders, total, self.delta)[1])


class RenyiFilter:
    """Admits a charge only while the spent RDP stays within B(k) at every monitored order.

    Args:
        budget: the (ε, δ) target.
        monitored_orders: orders fixed before deployment (a subset of ``budget.orders``).
        ledger: where charges are recorded; its header must carry this exact budget. Without a
            ledger the filter keeps count in memory (simulations and audits).
    """

    def __init__(
        self,
        budget: PrivacyBudget,
        monitored_orders: Sequence[float],
        *,
        ledger: Ledger | None = None,
    ) -> None:
        mon = tuple(monitored_orders)
        if not mon or any(k not in budget.orders for k in mon) or len(set(mon)) != len(mon):
            raise ValueError(
                f"monitored_orders must be distinct orders of the budget. Found {monitored_orders!r}."
            )
        self.budget = budget
        self.monitored = tuple(sorted(mon))
        self.limits = budget.limits(self.monitored)
        if (self.limits <= 0).any():
            raise ValueError(f"the RDP budget is <= 0 at order(s) {self.monitored}; pick others.")
        self.ledger = ledger
        self._tally: dict[dp_event.DpEvent, int] = {}
        if ledger is not None:
            fixed = ledger.header["budget"]
            if fixed is None or not _same_budget(fixed, self.header_record()):
                raise ValueError(
                    f"the ledger's header fixes the budget {fixed}; this filter has "
                    f"{self.header_record()}. A budget cannot change after deployment."
                )

    @classmethod
    def for_plan(
        cls,
        budget: PrivacyBudget,
        per_query: dp_event.DpEvent,
        n_queries: int,
        *,
        ledger: Ledger | None = None,
    ) -> RenyiFilter:
        """The filter monitoring the single order that is best for the planned deployment."""
        return cls(budget, (budget.best_order(per_query, n_queries),), ledger=ledger)

    def header_record(self) -> dict:
        """The budget as the ledger header stores it."""
        return {
            "epsilon": self.budget.epsilon,
            "delta": self.budget.delta,
            "monitored_orders": list(self.monitored),
        }

    def _tally_now(self) -> Mapping[dp_event.DpEvent, int]:
        return self._tally if self.ledger is None else self.ledger.contents().tally

    def spent(self) -> np.ndarray:
        """RDP spent at the monitored orders (recomputed from the ledger when there is one)."""
        return _total(self._tally_now(), self.monitored)

    def remaining(self) -> np.ndarray:
        return self.limits - self.spent()

    def can_pay(self, event: dp_event.DpEvent) -> bool:
        return bool((_total(self._tally_now(), self.monitored, event) <= self.limits).all())

    def _admit(self, tally: Mapping[dp_event.DpEvent, int], event: dp_event.DpEvent) -> None:
        total = _total(tally, self.monitored, event)
        over = np.flatnonzero(total > self.limits)
        if over.size:
            i = over[0]
            raise BudgetExhausted(
                f"this query would bring the RDP at order {self.monitored[i]:g} to {total[i]:.6g} "
                f"> budget {self.limits[i]:.6g} (epsilon={self.budget.epsilon}, "
                f"delta={self.budget.delta})."
            )

    def charge(self, event: dp_event.DpEvent) -> Receipt | None:
        """Pays for one query, or raises :class:`BudgetExhausted` having written nothing.

        Returns the ledger receipt (None without a ledger).
        """
        if self.ledger is not None:
            return self.ledger.append(event, admit=self._admit)
        self._admit(self._tally, event)
        self._tally[event] = self._tally.get(event, 0) + 1
        return None


def _total(tally: Mapping, orders: Sequence[float], extra: dp_event.DpEvent | None = None):
    """Σ count·curve at ``orders`` after one more ``extra``: the accountant's fsum cross-check.

    ``extra`` is merged into its count (not added as a separate term) so the admitted total is,
    bit for bit, what the ledger will hold afterwards (``accounting.overruns`` rechecks it)."""
    merged = dict(tally)
    if extra is not None:
        merged[extra] = merged.get(extra, 0) + 1
    return sum_curves(merged.items(), orders)


def _same_budget(a: Mapping, b: Mapping) -> bool:
    return (
        a["epsilon"] == b["epsilon"]
        and a["delta"] == b["delta"]
        and [float(k) for k in a["monitored_orders"]] == [float(k) for k in b["monitored_orders"]]
    )

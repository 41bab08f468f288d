"""accounting: ledger, dp-accounting composition, budget filter, DP-SGD accounting.

Imports nothing else of this project (ARCHITECTURE.md): ``pmixed`` builds the events and writes the
ledger; ``audit`` and ``reports`` read what is here.
"""

from accounting.accountant import PMixEDAccountant, Spent, compose, sum_curves
from accounting.budget import BudgetExhausted, PrivacyBudget, RenyiFilter
from accounting.curves import burn_down, cost_trace, epsilon_by_order, privacy_profile
from accounting.dpsgd import (
    DpsgdAccounting,
    dpsgd_burn_down,
    dpsgd_epsilon,
    dpsgd_event,
    dpsgd_profile,
    from_opacus,
)
from accounting.events import (
    PMixEDQueryEvent,
    PublicStepEvent,
    RdpCurveEvent,
    curve_at,
    event_from_json,
    event_to_json,
)
from accounting.ledger import Ledger, Receipt
from accounting.reading import (
    LedgerContents,
    LedgerCorrupt,
    Verification,
    read_ledger,
    restricted_path,
    verify,
)

__all__ = [
    "BudgetExhausted",
    "DpsgdAccounting",
    "Ledger",
    "LedgerContents",
    "LedgerCorrupt",
    "PMixEDAccountant",
    "PMixEDQueryEvent",
    "PrivacyBudget",
    "PublicStepEvent",
    "RdpCurveEvent",
    "Receipt",
    "RenyiFilter",
    "Spent",
    "Verification",
    "burn_down",
    "compose",
    "cost_trace",
    "curve_at",
    "dpsgd_burn_down",
    "dpsgd_epsilon",
    "dpsgd_event",
    "dpsgd_profile",
    "epsilon_by_order",
    "event_from_json",
    "event_to_json",
    "from_opacus",
    "privacy_profile",
    "read_ledger",
    "restricted_path",
    "sum_curves",
    "verify",
]

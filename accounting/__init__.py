"""accounting: ledger, dp-accounting composition, budget filter, DP-SGD accounting.

Imports nothing else of this project (ARCHITECTURE.md): ``pmixed`` builds the events and writes the
ledger; ``audit`` and ``reports`` read what is here.
"""

from accounting.accountant import PMixEDAccountant, Spent, compose, sum_curves
from accounting.budget import BudgetExhausted, PrivacyBudget, RenyiFilter
from accounting.dpsgd import DpsgdAccounting, dpsgd_epsilon, dpsgd_event, from_opacus
from accounting.events import (
    PMixEDQueryEvent,
    PublicStepEvent,
    RdpCurveEvent,
    curve_at,
    event_from_json,
    event_to_json,
)
from accounting.ledger import (
    Ledger,
    LedgerContents,
    LedgerCorrupt,
    Receipt,
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
    "compose",
    "curve_at",
    "dpsgd_epsilon",
    "dpsgd_event",
    "event_from_json",
    "event_to_json",
    "from_opacus",
    "read_ledger",
    "restricted_path",
    "sum_curves",
    "verify",
]

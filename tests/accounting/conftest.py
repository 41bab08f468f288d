"""Fixtures shared by the accounting tests: small ledgers built by the real writer."""

from __future__ import annotations

import pytest

from accounting import Ledger, PublicStepEvent, RdpCurveEvent

ORDERS = (2, 3, 4, 6, 8)


def curve(label: str = "", scale: float = 1e-3, orders=ORDERS) -> RdpCurveEvent:
    """A simple increasing RDP curve (like a Gaussian's: scale·k)."""
    return RdpCurveEvent(orders=orders, rdp=tuple(scale * k for k in orders), label=label)


def new_ledger(path, *, budget=None, seed=None, fsync=False, mode="custom", status="certified"):
    return Ledger.create(
        path,
        mode=mode,
        relation="add_remove",
        status=status,
        orders=ORDERS,
        calibration={"epsilon": 4.0, "delta": 1e-5},
        budget=budget,
        seeded=seed is not None,
        seed=seed,
        fsync=fsync,
    )


@pytest.fixture
def mixed_ledger(tmp_path):
    """A 40-query ledger with three events, public steps and restricted records."""
    path = tmp_path / "ledger.jsonl"
    with new_ledger(path, seed=3) as led:
        a, b, pub = curve("a"), curve("b", 2e-3), PublicStepEvent()
        for i in range(40):
            r = led.append((a, b, pub)[i % 3])
            if i % 4 == 0:
                led.append_restricted(r, {"subset": [i % 5, 7], "lambdas": [0.25, 1.0]})
    return path

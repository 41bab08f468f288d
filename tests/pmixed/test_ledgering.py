"""The bridge from a Calibration to ledger events and header: public fields only, costs exact."""

from __future__ import annotations

import json

import pytest

from accounting import read_ledger
from pmixed import PMixEDConfig
from pmixed.ledgering import CALIBRATION_KEYS, create_ledger, public_calibration, query_event
from tests.small import SMALL

CONFIGS = [
    PMixEDConfig(**SMALL),
    PMixEDConfig(**SMALL, mode="capped", lambda_max=0.3),
    PMixEDConfig(**SMALL, mode="reference", reference_sampler="with_replacement"),
    PMixEDConfig(**SMALL, relation="replace_one", constraint_grid="coarse"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["certified", "capped", "reference", "ro-coarse"])
def test_event_and_header_carry_exactly_the_calibrated_public_values(tmp_path, cfg):
    cal = cfg.calibrate()
    ev = query_event(cal)
    assert ev.rdp == cal.per_query_rdp_values and ev.orders == cal.orders
    assert ev.mode == cfg.mode and ev.relation == cfg.relation and ev.beta == cal.beta
    summary = public_calibration(cal)
    assert set(summary) == CALIBRATION_KEYS
    with create_ledger(tmp_path / "l.jsonl", cal, seed=11) as led:
        led.append(ev)
    contents = read_ledger(tmp_path / "l.jsonl")
    assert contents.header["calibration"]["planned_epsilon"] == cal.planned_epsilon
    assert contents.header["seeded"] is True and contents.header["status"] == cal.status
    assert contents.counted_events() == [(ev, 1)]
    restricted = (tmp_path / "l.restricted.jsonl").read_text().splitlines()
    assert json.loads(restricted[0])["seed"] == 11

"""PrivacyBudget and the Rényi filter: exact admission, nothing written on refusal, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from hypothesis import given
from hypothesis import strategies as st

from accounting import (
    BudgetExhausted,
    Ledger,
    PrivacyBudget,
    PublicStepEvent,
    RdpCurveEvent,
    RenyiFilter,
    compose,
    read_ledger,
    verify,
)
from pmixed import PMixEDConfig
from pmixed.ledgering import create_ledger, query_event
from tests.accounting.conftest import ORDERS, new_ledger

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(
    n_members=4,
    sampling_rate=0.1,
    epsilon=8.0,
    delta=1e-5,
    query_budget=200,
    orders=tuple(range(2, 13)),
)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": float("inf")}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"orders": (3, 2)}, "orders"),
        ({"orders": (1, 2)}, "orders"),
        ({"orders": ()}, "orders"),
    ],
)
def test_budget_rejects_bad_input_naming_the_parameter(kw, match):
    with pytest.raises(ValueError, match=match):
        PrivacyBudget(**{"epsilon": 1.0, "delta": 1e-5, "orders": (2, 3), **kw})


@given(st.floats(0.1, 50), st.floats(1e-12, 0.1), st.integers(2, 256))
def test_budget_limit_converts_back_to_epsilon_at_its_order(eps, delta, k):
    b = PrivacyBudget(eps, delta, (k,)).limits()[0]
    if b > 0 and delta**2 + np.expm1(-b) <= 0:  # outside dp-accounting's KL shortcut
        assert compute_epsilon([k], [b], delta)[0] == pytest.approx(eps, rel=1e-12, abs=1e-12)


CONFIGS = [
    PMixEDConfig(**SMALL),
    PMixEDConfig(**SMALL, mode="capped", lambda_max=0.3),
    PMixEDConfig(**SMALL, relation="replace_one"),
    PMixEDConfig(**SMALL, mode="reference"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["certified", "capped", "replace_one", "reference"])
def test_filter_admits_exactly_the_planned_queries_then_writes_nothing(tmp_path, cfg):
    cal = cfg.calibrate()
    ev = query_event(cal)
    budget = PrivacyBudget(cfg.epsilon, cfg.delta, cal.orders)
    plan = RenyiFilter.for_plan(budget, ev, cfg.query_budget)
    assert plan.monitored == (cal.planned_order,)
    path = tmp_path / "l.jsonl"
    filt = RenyiFilter.for_plan(
        budget, ev, cfg.query_budget, ledger=create_ledger(path, cal, budget=plan.header_record())
    )
    for _ in range(cfg.query_budget):
        filt.charge(ev)
        plan.charge(ev)
    before = path.read_bytes()
    for f in (filt, plan):
        assert not f.can_pay(ev)
        with pytest.raises(BudgetExhausted, match="order"):
            f.charge(ev)
    assert path.read_bytes() == before
    filt.charge(PublicStepEvent())  # the public fallback is always affordable
    spent = compose(path, cfg.delta)
    assert spent.steps == cfg.query_budget + 1 and spent.public_steps == 1
    assert spent.epsilon <= cfg.epsilon
    k = cal.orders.index(cal.planned_order)
    assert spent.rdp[k] <= budget.limits([cal.planned_order])[0] == filt.limits[0]
    assert (filt.remaining() >= 0).all()


def test_a_restarted_filter_recomputes_what_was_spent(tmp_path):
    ev = RdpCurveEvent(orders=ORDERS, rdp=(0.01,) * 5)
    budget = PrivacyBudget(4.0, 1e-5, ORDERS)
    limit = budget.limits([8])[0]
    allowed = int(limit // 0.01)
    path = tmp_path / "l.jsonl"
    record = RenyiFilter(budget, [8]).header_record()
    with new_ledger(path, budget=record) as led:
        f = RenyiFilter(budget, [8], ledger=led)
        for _ in range(100):
            f.charge(ev)
    with new_ledger(tmp_path / "other.jsonl", budget=None) as other, pytest.raises(ValueError):
        RenyiFilter(budget, [8], ledger=other)
    with pytest.raises(ValueError, match="budget"):
        RenyiFilter(PrivacyBudget(5.0, 1e-5, ORDERS), [8], ledger=Ledger(path))
    with Ledger(path) as led:
        f = RenyiFilter(budget, [8], ledger=led)
        np.testing.assert_allclose(f.spent(), [1.0])
        n = 0
        while f.can_pay(ev):
            f.charge(ev)
            n += 1
    assert 100 + n == read_ledger(path).n_queries
    assert 100 + n in (allowed, allowed + 1)  # fsum decides the boundary case exactly
    assert (100 + n) * 0.01 <= limit + 1e-12


def test_monitored_orders_must_belong_to_the_budget():
    b = PrivacyBudget(1.0, 1e-5, ORDERS)
    for bad in ([], [5], [2, 2]):
        with pytest.raises(ValueError, match="monitored_orders"):
            RenyiFilter(b, bad)
    with pytest.raises(ValueError, match="<= 0"):
        RenyiFilter(PrivacyBudget(0.01, 1e-5, ORDERS), [2])


WRITER = """
import sys
from pathlib import Path
from accounting import BudgetExhausted, Ledger, PrivacyBudget, RdpCurveEvent, RenyiFilter
ORDERS = (2, 3, 4, 6, 8)
budget = PrivacyBudget(2.0, 1e-5, ORDERS)
ev = RdpCurveEvent(orders=ORDERS, rdp=(float(sys.argv[2]),) * 5)
with Ledger(Path(sys.argv[1])) as led:
    f = RenyiFilter(budget, [8], ledger=led)
    print("ready", flush=True)
    try:
        while True:
            r = f.charge(ev)
            led.append_restricted(r, {"subset": [r.seq % 7]})
    except BudgetExhausted:
        print("exhausted", flush=True)
"""


def test_sigkilled_writers_never_corrupt_the_ledger_nor_overspend(tmp_path):
    budget = PrivacyBudget(2.0, 1e-5, ORDERS)
    limit = budget.limits([8])[0]
    cost = float(limit) / 6000  # about 6000 charges fit: ~20 kills land on running writers
    path = tmp_path / "ledger.jsonl"
    new_ledger(path, budget=RenyiFilter(budget, [8]).header_record(), fsync=True).close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = np.random.default_rng(20261128)
    counts = []
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), repr(cost)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = proc.stdout.readline().strip()
        assert line == "ready", (line, proc.wait(), proc.stderr.read())
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        result = verify(path, restricted=True)
        assert result.ok, result
        counts.append(result.queries)
    assert counts == sorted(counts) and counts[-1] > counts[0]  # the kills hit running writers
    # The last writer runs to exhaustion: the total never exceeds the budget.
    out = subprocess.run(
        [sys.executable, str(script), str(path), repr(cost)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.stdout.split() == ["ready", "exhausted"], (out.returncode, out.stderr)
    spent = compose(path, 1e-5)
    assert spent.rdp[ORDERS.index(8)] <= limit
    assert spent.steps >= 5999


@given(
    st.lists(st.sampled_from([0.0, 0.05, 0.2, 0.7, 1.3, "public"]), max_size=60),
    st.sampled_from([[2], [8], [3, 6]]),
)
def test_spent_never_exceeds_the_limit_on_any_path_and_refusals_are_exact(costs, monitored):
    budget = PrivacyBudget(12.0, 1e-5, ORDERS)
    f = RenyiFilter(budget, monitored)
    for c in costs:
        ev = PublicStepEvent() if c == "public" else RdpCurveEvent(orders=ORDERS, rdp=(c,) * 5)
        before = f.spent()
        after = before + (0.0 if c == "public" else c)
        try:
            f.charge(ev)
        except BudgetExhausted:
            assert not (after <= f.limits - 1e-12).all()  # refused: it did not clearly fit
            np.testing.assert_array_equal(f.spent(), before)
        else:
            assert (after <= f.limits + 1e-12).all()  # admitted: it fits
        assert (f.spent() <= f.limits).all()

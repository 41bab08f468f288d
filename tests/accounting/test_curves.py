"""Report curves from a ledger: burn-down, per-query costs, per-order conversion, profile."""

from __future__ import annotations

import math

import pytest

from accounting import (
    PrivacyBudget,
    PublicStepEvent,
    RenyiFilter,
    burn_down,
    compose,
    cost_trace,
    epsilon_by_order,
    privacy_profile,
)
from pmixed import PMixEDConfig
from pmixed.ledgering import create_ledger, query_event


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    cfg = PMixEDConfig(n_members=8, sampling_rate=0.2, epsilon=4.0, delta=1e-5, query_budget=40)
    cal = cfg.calibrate()
    budget = PrivacyBudget(cfg.epsilon, cfg.delta, cal.orders)
    plan = RenyiFilter.for_plan(budget, query_event(cal), cfg.query_budget)
    path = tmp_path_factory.mktemp("curves") / "l.jsonl"
    filt = RenyiFilter(
        budget, plan.monitored, ledger=create_ledger(path, cal, budget=plan.header_record())
    )
    for i in range(30):
        filt.charge(PublicStepEvent() if i % 7 == 3 else query_event(cal))
    return path, cal


def test_burn_down_is_nondecreasing_and_ends_at_the_composed_epsilon(ledger):
    path, _ = ledger
    rows = burn_down(path, 1e-5, points=10)
    assert [r["queries"] for r in rows][-1] == 30 and len(rows) == 10
    eps = [r["epsilon"] for r in rows]
    assert all(a <= b + 1e-12 for a, b in zip(eps, eps[1:]))
    assert eps[-1] == compose(path, 1e-5).epsilon and rows[-1]["public_steps"] == 4


def test_cost_trace_sums_to_the_ledger_total_and_marks_public_steps(ledger):
    path, _ = ledger
    spent = compose(path, 1e-5)
    order = spent.optimal_order
    trace = cost_trace(path, order)
    assert sum(trace["public"]) == 4 and trace["rdp"][3] == 0.0 and trace["public"][3]
    total = spent.rdp[spent.orders.index(order)]
    assert math.fsum(trace["rdp"]) == pytest.approx(total, rel=1e-12)


def test_per_order_conversion_attains_the_reported_epsilon_at_the_optimal_order(ledger):
    path, _ = ledger
    spent = compose(path, 1e-5)
    by_order = epsilon_by_order(spent.orders, spent.rdp, 1e-5)
    assert min(by_order) == pytest.approx(spent.epsilon, rel=1e-12)
    assert by_order[spent.orders.index(spent.optimal_order)] == pytest.approx(spent.epsilon)
    profile = privacy_profile(spent.orders, spent.rdp, [1e-3, 1e-5, 1e-7])
    assert profile[1]["epsilon"] == pytest.approx(spent.epsilon, rel=1e-12)
    assert profile[0]["epsilon"] < profile[1]["epsilon"] < profile[2]["epsilon"]

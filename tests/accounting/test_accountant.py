"""The RdpAccountant subclass and ``compose``: contract tests and the independent recomputation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation, UnsupportedEventError
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant, compute_epsilon
from hypothesis import given
from hypothesis import strategies as st

from accounting import LedgerCorrupt, PMixEDAccountant, PublicStepEvent, RdpCurveEvent, compose
from pmixed import PMixEDConfig
from pmixed.ledgering import create_ledger, query_event
from tests.accounting.conftest import ORDERS, curve

DEFAULTS = dict(n_members=80, sampling_rate=0.03, epsilon=8.0, delta=1e-5, query_budget=10_000)


@given(st.integers(1, 10**6), st.lists(st.floats(0, 10), min_size=5, max_size=5))
def test_composing_n_copies_equals_compute_epsilon_of_n_times_the_curve(n, rdp):
    ev = RdpCurveEvent(orders=ORDERS, rdp=tuple(rdp))
    acc = PMixEDAccountant(ORDERS).compose(ev, n)
    want = compute_epsilon(ORDERS, [n * r for r in rdp], 1e-5)
    assert acc.get_epsilon_and_optimal_order(1e-5) == want


def test_other_events_are_deferred_to_dp_accounting_and_add_up():
    gauss = dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.0))
    mine = PMixEDAccountant(ORDERS).compose(gauss, 100)
    theirs = RdpAccountant(list(ORDERS)).compose(gauss, 100)
    np.testing.assert_array_equal(mine.rdp, theirs.rdp)
    mine.compose(curve(), 3).compose(PublicStepEvent(), 5)
    np.testing.assert_allclose(mine.rdp, theirs.rdp + 3e-3 * np.array(ORDERS), rtol=1e-15)


def test_unsupported_subevent_is_refused_before_anything_changes():
    acc = PMixEDAccountant(ORDERS)
    bad = dp_event.ComposedDpEvent([curve(), dp_event.UnsupportedDpEvent()])
    with pytest.raises(UnsupportedEventError):
        acc.compose(bad)
    assert (acc.rdp == 0).all() and acc.status == "certified"
    ro = RdpCurveEvent(orders=ORDERS, rdp=(0.1,) * 5, relation="replace_one")
    with pytest.raises(UnsupportedEventError, match="relation"):
        acc.compose(ro)
    assert (acc.rdp == 0).all()
    assert PMixEDAccountant(ORDERS, NeighboringRelation.REPLACE_ONE).compose(ro).rdp[0] == 0.1


def test_status_is_the_weakest_composed():
    acc = PMixEDAccountant(tuple(range(2, 13)))
    small = dict(
        DEFAULTS, n_members=4, sampling_rate=0.1, query_budget=64, orders=tuple(range(2, 13))
    )
    tight = PMixEDConfig(**small, amplification="tight", accept_unproven_amplification=True)
    acc.compose(query_event(PMixEDConfig(**small).calibrate()))
    assert acc.status == "certified"
    acc.compose(query_event(tight.calibrate()))
    assert acc.status == "conditional"
    acc.compose(query_event(PMixEDConfig(**small, mode="reference").calibrate()))
    assert acc.status == "UNCERTIFIED" and not acc.certified
    acc.compose(query_event(PMixEDConfig(**small).calibrate()))
    assert acc.status == "UNCERTIFIED"


@pytest.fixture(scope="module")
def big_ledger(tmp_path_factory):
    """10^4 queries written by the code: certified charges, a second curve, public steps."""
    cal = PMixEDConfig(**DEFAULTS).calibrate()
    path = tmp_path_factory.mktemp("big") / "ledger.jsonl"
    ev = query_event(cal)
    other = RdpCurveEvent(orders=cal.orders, rdp=tuple(1e-4 * k for k in cal.orders), label="x")
    with create_ledger(path, cal, fsync=False) as led, led.transaction() as tx:
        for i in range(10_000):
            tx.append(ev if i % 10 else (other if i % 20 else PublicStepEvent()))
    return path, cal


def test_ten_thousand_query_ledger_matches_an_independent_fsum_to_1e9(big_ledger):
    path, cal = big_ledger
    spent = compose(path, 1e-5)
    # Independent path: plain json, every query record's curve summed with fsum, compute_epsilon.
    records = [json.loads(line) for line in path.read_text().splitlines()]
    events = {r["seq"]: r["event"] for r in records if r["kind"] == "event"}
    curves = []
    for r in records:
        if r["kind"] == "query":
            e = events[r["event_seq"]]
            curves.append(
                [math.inf if x == "inf" else x for x in e["rdp"]]
                if "rdp" in e
                else [0.0] * len(cal.orders)
            )
    total = [math.fsum(col) for col in zip(*curves)]
    eps, order = compute_epsilon(list(cal.orders), total, 1e-5)
    assert len(curves) == spent.steps == 10_000 and spent.public_steps == 500
    assert spent.epsilon == pytest.approx(eps, rel=1e-9, abs=1e-9)
    assert spent.optimal_order == order
    assert spent.epsilon == pytest.approx(spent.epsilon_cross_check, rel=1e-9)
    np.testing.assert_allclose(spent.rdp, total, rtol=1e-12)
    assert spent.certified and spent.status == "certified" and spent.relation == "add_remove"


def test_compose_refuses_a_corrupt_ledger_and_bad_delta(mixed_ledger):
    assert compose(mixed_ledger, 1e-5).steps == 40
    with pytest.raises(ValueError, match="delta"):
        compose(mixed_ledger, 0.0)
    data = bytearray(mixed_ledger.read_bytes())
    data[len(data) // 2] ^= 0x01
    mixed_ledger.write_bytes(bytes(data))
    with pytest.raises(LedgerCorrupt):
        compose(mixed_ledger, 1e-5)

"""Events: validated at construction, JSON round trip, decoding never imports, curve rounding."""

from __future__ import annotations

import math
import sys

import attr
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from accounting import (
    PublicStepEvent,
    RdpCurveEvent,
    curve_at,
    event_from_json,
    event_to_json,
)
from pmixed import PMixEDConfig
from pmixed.ledgering import query_event
from tests.small import SMALL

CONFIGS = {
    "certified": PMixEDConfig(**SMALL),
    "capped": PMixEDConfig(**SMALL, mode="capped", lambda_max=0.3),
    "reference": PMixEDConfig(**SMALL, mode="reference"),
    "replace_one": PMixEDConfig(**SMALL, relation="replace_one"),
    "tight": PMixEDConfig(**SMALL, amplification="tight", accept_unproven_amplification=True),
    "coarse": PMixEDConfig(**SMALL, constraint_grid="coarse"),
}


@pytest.fixture(scope="module")
def events():
    return {name: query_event(cfg.calibrate()) for name, cfg in CONFIGS.items()}


def test_query_event_from_every_mode_matches_its_calibration(events):
    for name, cfg in CONFIGS.items():
        ev, cal = events[name], cfg.calibrate()
        assert ev.rdp == cal.per_query_rdp_values
        assert ev.status == cal.status
        assert ev.certified is (name != "reference")
    assert events["reference"].status == "UNCERTIFIED" and events["reference"].beta is None
    assert events["tight"].status == "conditional"


def test_json_round_trip_is_identity_for_every_mode(events):
    for ev in [
        *events.values(),
        PublicStepEvent(),
        RdpCurveEvent(orders=(1.5, 2.0), rdp=(0, math.inf)),
    ]:
        js = event_to_json(ev)
        assert event_from_json(js) == ev
        if "rdp" in js:  # strict JSON: +inf is spelled "inf"
            assert ("inf" in js["rdp"]) == (math.inf in ev.rdp)


def _replace(ev, **kw):
    return lambda: attr.evolve(ev, **kw)


BAD = [
    ("mode", {"mode": "Paper mode"}),
    ("relation", {"relation": "user"}),
    ("sampling_rate", {"sampling_rate": 0.0}),
    ("sampling_rate", {"sampling_rate": 1.5}),
    ("sampling_rate", {"sampling_rate": math.nan}),
    ("beta", {"beta": -0.1}),
    ("beta", {"beta": math.nan}),
    ("n_members", {"n_members": 0}),
    ("n_members", {"n_members": True}),
    ("orders", {"orders": (2, 2, 3), "rdp": (0.1, 0.1, 0.1)}),
    ("orders", {"orders": (1, 2), "rdp": (0.1, 0.1)}),
    ("orders", {"orders": (2.5, 3), "rdp": (0.1, 0.1)}),
    ("rdp", {"rdp": (0.1,)}),
    ("rdp values", {"rdp": (math.nan,) * 11}),
    ("rdp values", {"rdp": (-1e-9,) * 11}),
    ("status", {"status": "certifiable"}),
    ("certified", {"status": "UNCERTIFIED"}),
    ("certified", {"certified": False}),
    ("certified", {"certified": 1}),
    ("lambda_max", {"lambda_max": 1.5}),
    ("reference_alpha", {"reference_alpha": 99}),
    ("constraint_grid", {"constraint_grid": "Single grid"}),
]


@pytest.mark.parametrize(("name", "change"), BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_invalid_field_raises_at_construction_naming_it(events, name, change):
    with pytest.raises(ValueError, match=name.split()[0]):
        attr.evolve(events["certified"], **change)


def test_an_uncertified_event_says_so_in_both_fields(events):
    ref = events["reference"]
    with pytest.raises(ValueError, match="certified"):
        attr.evolve(ref, status="certified")
    with pytest.raises(ValueError, match="certified"):
        attr.evolve(ref, certified=True)
    assert attr.evolve(ref, status="certified", certified=True).certified  # a mode's business


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=3, max_size=3))
def test_curve_event_accepts_exactly_nonnegative_or_inf_values(values):
    ok = all(not math.isnan(v) and v >= 0 for v in values)
    try:
        RdpCurveEvent(orders=(2, 3, 4), rdp=tuple(values))
    except ValueError:
        assert not ok
    else:
        assert ok


@given(
    st.lists(st.floats(1.01, 256), min_size=1, max_size=8, unique=True).map(sorted),
    st.data(),
)
def test_curve_event_json_round_trip_property(orders, data):
    rdp = data.draw(
        st.lists(
            st.one_of(st.floats(0, 1e6), st.just(math.inf)),
            min_size=len(orders),
            max_size=len(orders),
        )
    )
    ev = RdpCurveEvent(orders=tuple(orders), rdp=tuple(rdp), certified=data.draw(st.booleans()))
    assert event_from_json(event_to_json(ev)) == ev


def test_decoding_rejects_unknown_types_and_fields_without_importing(events):
    assert "this" not in sys.modules
    for bad in [
        {"type": "this"},
        {"type": "os.system"},
        {"module_name": "this", "class_name": "X"},
        {**event_to_json(events["certified"]), "subset": [1, 2]},
        {k: v for k, v in event_to_json(events["certified"]).items() if k != "beta"},
    ]:
        with pytest.raises(ValueError):
            event_from_json(bad)
    assert "this" not in sys.modules


def test_curve_at_rounds_orders_up_to_the_grid():
    ev = RdpCurveEvent(orders=(2, 4, 8), rdp=(1.0, 2.0, 3.0))
    np.testing.assert_array_equal(curve_at(ev, [2, 3, 4, 5, 8, 9]), [1, 2, 2, 3, 3, math.inf])
    np.testing.assert_array_equal(curve_at(PublicStepEvent(), [2, 3]), [0, 0])
    with pytest.raises(TypeError):
        curve_at(object(), [2])

"""The one charge-before-release path: only ``pmixed.deployment`` pays for queries; reopening a
deployment rebuilds its calibration from the ledger; calibration never builds a list of T floats."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accounting import read_ledger
from pmixed import PMixEDConfig
from pmixed.deployment import Deployment, InvalidRequest
from pmixed.privacy import compose

ROOT = Path(__file__).resolve().parents[2]
CFG = PMixEDConfig(
    n_members=3,
    sampling_rate=0.5,
    epsilon=8.0,
    delta=1e-5,
    query_budget=10,
    orders=tuple(range(2, 17)),
)


def test_no_module_but_the_deployment_calls_the_budget_filters_charge():
    callers = []
    for folder in ("pmixed", "audit", "reports", "benchmarks", "accounting"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\.charge\(", line) and not line.lstrip().startswith(("#", '"')):
                    callers.append(f"{path.relative_to(ROOT)}:{i}")
    assert callers and all(c.startswith("pmixed/deployment.py:") for c in callers), callers


def test_serve_charges_before_it_computes_and_records_before_it_releases(tmp_path):
    dep = Deployment.create(tmp_path / "l.jsonl", CFG.calibrate(), seed=2)
    seen = []

    def private(rng):
        seen.append(read_ledger(dep.ledger.path).n_queries)  # the charge is already on disk
        return 7, {"subset": [0]}

    dep.before_release = lambda value: seen.append(
        len(dep.ledger.restricted_path.read_text().splitlines())
    )
    answer = dep.serve(private, lambda rng: 0)
    assert (answer.value, answer.private, answer.refused) == (7, True, False)
    assert seen == [1, 2]  # charged before compute; restricted record before release


def test_a_failed_check_spends_nothing_and_refusal_touches_no_member(tmp_path):
    dep = Deployment.create(tmp_path / "l.jsonl", CFG.calibrate(), on_exhausted="refuse")
    before = dep.ledger.path.read_bytes()

    def bad():
        raise InvalidRequest("temperature", "must be > 0", 0)

    with pytest.raises(InvalidRequest, match="temperature must be > 0"):
        dep.serve(lambda rng: (1, {}), check=bad)
    assert dep.ledger.path.read_bytes() == before
    for _ in range(CFG.query_budget):
        dep.serve(lambda rng: (1, {}))
    answer = dep.serve(lambda rng: pytest.fail("a member was computed"), lambda rng: 0)
    assert answer.refused and read_ledger(dep.ledger.path).n_queries == CFG.query_budget


def test_open_rebuilds_the_calibration_and_refuses_another_one(tmp_path):
    path = tmp_path / "l.jsonl"
    Deployment.create(path, CFG.calibrate()).close()
    with Deployment.open(path) as dep:
        assert dep.calibration.config == CFG and not dep.seeded
    other = PMixEDConfig(**{**CFG.__dict__, "epsilon": 4.0}).calibrate()
    with pytest.raises(ValueError, match="another configuration"):
        Deployment.open(path, calibration=other)
    with pytest.raises(InvalidRequest, match="seed"):
        Deployment.create(tmp_path / "m.jsonl", CFG.calibrate(), seed=-1)
    assert not (tmp_path / "m.jsonl").exists()


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-12, 10.0), st.integers(0, 5000))
def test_composing_t_queries_is_the_exact_sum_rounded_once(c, n):
    assert compose(np.array([c]), n)[0] == math.fsum([c] * n)


def test_calibration_at_a_billion_queries_builds_no_list():
    curve = np.array([1e-9, 2e-9, math.inf])
    total = compose(curve, 10**9)  # math.fsum([c] * 10**9) would allocate 8 GB
    assert total[0] == 1e-9 * 10**9 and total[2] == math.inf
    with pytest.raises(ValueError, match="n_queries"):
        compose(curve, 2**53)

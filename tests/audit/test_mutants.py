"""Planted violations are caught; their sound twins are not (false alarms over 100 seeds)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from audit.exact import pair_laws
from audit.mutants import MUTANTS, register, run_mutants
from audit.worstcase import configuration_worst_case, ro_laws, worst_member
from pmixed import PMixEDConfig

logging.getLogger("absl").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_the_registry_holds_the_issues_minimum_set():
    assert {
        "seed_dpsgd",
        "dpsgd_noise_div4",
        "pmixed_reference",
        "pmixed_beta_x4",
        "pmixed_unmollified",
        "generator_skips_tenth_charge",
    } <= set(MUTANTS)
    with pytest.raises(ValueError, match="already registered"):
        register("seed_dpsgd", "x", "y")(lambda *a: {})


def test_every_mutant_is_detected_and_no_twin_is():
    result = run_mutants("quick", seed=0, repetitions=0)
    missed = [n for n, r in result["mutants"].items() if not r["detected"]]
    assert result["all_detected"] and not missed, missed
    assert result["twins_clean"], [n for n, r in result["mutants"].items() if r["twin_detected"]]
    assert result["detected"] == result["total"] == len(MUTANTS)


@pytest.mark.parametrize(
    "repetitions", [20, pytest.param(100, marks=pytest.mark.slow)], ids=["20", "100"]
)
def test_cheap_twins_false_alarm_rate_is_at_most_5_percent(repetitions):
    """20 seeds in ``make test`` (one alarm fails it); the 100-seed rate under ``make test-all``."""
    names = [n for n, m in MUTANTS.items() if m.cheap]
    assert names == list(MUTANTS)  # every twin is measured, the DP-SGD ones included
    result = run_mutants("test", seed=10, repetitions=repetitions, names=names)
    for name, row in result["mutants"].items():
        assert row["twin_repetitions"] == repetitions
        assert row["twin_false_alarm_rate"] <= 0.05, (name, row)


def test_the_worst_case_search_stays_within_a_sound_claim_and_breaks_an_unmollified_one():
    rng = np.random.default_rng(0)
    p0 = 1 / np.arange(1, 101) ** 1.1
    p0 /= p0.sum()
    others = np.log(p0[None] * np.exp(0.3 * rng.standard_normal((2, 100))))
    others -= np.log(np.exp(others).sum(axis=1, keepdims=True))
    cal = PMixEDConfig(
        n_members=3,
        sampling_rate=0.05,
        epsilon=8.0,
        delta=1e-5,
        query_budget=1024,
        orders=tuple(range(2, 17)),
    ).calibrate()
    charged = np.asarray(cal.per_query_rdp_add_remove)
    sound = worst_member(others, np.log(p0), cal, charged, rng=rng, evaluations=60)
    bad = worst_member(others, np.log(p0), cal, charged, rng=rng, evaluations=60, unmollified=True)
    assert 0 < sound.ratio <= 1 < bad.ratio
    assert np.isclose(np.exp(sound.member).sum(), 1.0)


def test_the_configuration_search_breaks_reference_mode_and_stays_within_certified():
    """(d): p0, the other members and the member all free on a 3-token toy. Reference mode at one
    member (PMIXED_MATH.md R2, R3) exceeds its charge; certified accounting at two does not."""
    ref = PMixEDConfig(
        n_members=1, sampling_rate=0.1, epsilon=8.0, delta=1e-5, query_budget=100, mode="reference"
    ).calibrate()
    cert = PMixEDConfig(
        n_members=2, sampling_rate=0.1, epsilon=8.0, delta=1e-5, query_budget=100
    ).calibrate()
    kw = dict(starts=30, refine=1, iterations=60)
    bad = configuration_worst_case(ref, rng=np.random.default_rng(0), **kw)
    good = configuration_worst_case(cert, rng=np.random.default_rng(0), **kw)
    assert bad["alarm"] and bad["ratio"] > 1.2 and bad["order"] == 3
    assert not good["alarm"] and 0.1 < good["ratio"] <= 1.0
    for r in (bad, good):
        assert max(x for x in r["per_order_ratio"] if x is not None) == pytest.approx(r["ratio"])
        assert np.isclose(sum(r["toy"]["p0"]), 1.0) and np.isclose(sum(r["toy"]["candidate"]), 1.0)
    assert bad["toy"]["others"] is None and good["members"] == 2
    assert bad["relation"] == good["relation"] == "add_remove"


def _toy_config(**kw):
    base = dict(n_members=2, sampling_rate=0.1, epsilon=8.0, delta=1e-5, query_budget=100)
    return PMixEDConfig(**{**base, **kw}).calibrate()


def test_the_configuration_search_under_replace_one():
    """RO on the toy: the member and its replacement both free, N fixed. Reference mode's claim
    (the paper's, per record: with fixed partitions a record replaces one member) breaks; a
    certified replace_one deployment's charge holds; an AR-certified charge is refused."""
    ref, cert = _toy_config(mode="reference"), _toy_config(relation="replace_one")
    kw = dict(starts=30, refine=1, iterations=60, relation="replace_one")
    bad = configuration_worst_case(ref, rng=np.random.default_rng(0), **kw)
    good = configuration_worst_case(cert, rng=np.random.default_rng(0), **kw)
    assert bad["alarm"] and bad["ratio"] > 2.0 and bad["order"] == 3
    assert not good["alarm"] and 0.05 < good["ratio"] <= 1.0
    for r in (bad, good):
        assert r["relation"] == "replace_one"
        assert max(x for x in r["per_order_ratio"] if x is not None) == pytest.approx(r["ratio"])
        for name in ("p0", "others", "candidate", "replacement"):
            assert np.isclose(sum(r["toy"][name]), 1.0)
    with pytest.raises(ValueError, match="needs a replace_one deployment"):
        configuration_worst_case(_toy_config(), rng=np.random.default_rng(0), **kw)
    with pytest.raises(ValueError, match="relation must be"):
        configuration_worst_case(ref, rng=np.random.default_rng(0), relation="replace")


@pytest.mark.parametrize("kw", [dict(mode="reference"), dict(relation="replace_one")])
def test_ro_laws_equal_the_exact_audits_pair_laws(kw):
    """Two paths to the RO pair's laws (the worst case's one solve of N + 1 rows, and the exact
    audit's two worlds): the same floats."""
    cal = _toy_config(n_members=4, **kw)
    rng = np.random.default_rng(1)
    lp = np.log(rng.dirichlet(np.ones(6), size=6))
    lp0, others, member, rep = lp[0], lp[1:4], lp[4], lp[5]
    law, other = ro_laws(others, member, rep, lp0, cal)
    world = np.vstack([others, member[None]])[None]
    ref_law, ref_other = pair_laws(world, lp0[None], cal, member=3, replacement=rep[None])
    np.testing.assert_array_equal(law, ref_law[0])
    np.testing.assert_array_equal(other, ref_other[0])
    assert not np.array_equal(law, other)

"""Controls C1-C3 and the alarm rule."""

from __future__ import annotations

import pytest

from audit.bounds import Bound
from audit.controls import alarms, identical_worlds, non_private, randomized_response


def test_c1_identical_worlds_pass_in_at_least_95_of_100_seeds():
    passed = sum(identical_worlds(1000, delta=1e-5, seed=s)["passed"] for s in range(100))
    assert passed >= 95


@pytest.mark.parametrize("eps", [1.0, 4.0])
def test_c2_randomized_response_exact_pair_is_epsilon_and_the_bound_stays_below(eps):
    res = randomized_response(eps, 10_000, delta=1e-5, seed=0)
    assert res["passed"] and res["exceedances"] <= res["allowed_exceedances"]
    assert res["epsilon_pair"] == pytest.approx(eps, abs=2e-3)
    # AUDIT.md §6.6 at expected counts: 0.96 (ε = 1) and 3.9 (ε = 4) at n = 10^4
    assert 0.85 * eps < res["epsilon_lb_median"] <= eps


def test_c2_bound_exceeds_epsilon_in_about_eta_of_repeats_at_most():
    res = randomized_response(2.0, 2000, delta=1e-5, seed=1, repeats=100)
    assert res["exceedances"] <= 10  # η = 5%: expected at most 5 (both rates must be unlucky)


def test_c3_non_private_release_reaches_the_cap():
    res = non_private(1000, delta=1e-5, seed=0)
    assert res["passed"] and res["epsilon_lb"] == pytest.approx(5.6, abs=0.1)


def test_alarm_names_every_bound_above_the_claim():
    out = alarms({"pair": 9.0, "cp": Bound(1.0, "clopper_pearson", 1e-5, 0.95)}, 8.0)
    assert [a["bound"] for a in out] == ["pair"] and "exceeds the claim" in out[0]["message"]
    assert alarms({"pair": 8.0}, 8.0) == []

"""Invariants 13-17 and 19 (PMIXED_MATH.md §13): base bounds, Zhu–Wang, calibration, conversion."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pmixed import InfeasibleBudget, PMixEDConfig
from pmixed.amplification import (
    base_rdp_certified,
    poisson_subsampled_rdp,
    rdp_budget,
    rdp_to_epsilon,
)

DEFAULTS = dict(n_members=80, sampling_rate=0.03, epsilon=8.0, delta=1e-5, query_budget=1024)


def mp_zhu_wang(eps, q, alpha, tight):
    with mpmath.workdps(60):
        q = mpmath.mpf(q)
        total = (1 - q) ** (alpha - 1) * (1 + (alpha - 1) * q)
        for k in range(2, alpha + 1):
            term = mpmath.binomial(alpha, k) * (1 - q) ** (alpha - k) * q**k
            term *= mpmath.e ** ((k - 1) * mpmath.mpf(eps[k]))
            total += term * (1 if (tight or k == 2) else 3)
        return float(mpmath.log(total) / (alpha - 1))


# ------------------------------------------------------------------ base bound and amplification


@given(beta=st.floats(0, 2), k=st.integers(2, 64))
@example(beta=4.838829099976072e-20, k=18)  # logaddexp(0, x) - log 2 cancelled to noise here
def test_base_bound_is_zero_at_zero_and_nondecreasing_in_beta_and_k(beta, k):
    assert base_rdp_certified(0.0, np.array([k]))[0] == 0.0
    b = base_rdp_certified(beta, np.array([k, k + 1]))
    assert b[1] >= b[0]
    assert base_rdp_certified(beta * 1.1 + 1e-9, np.array([k]))[0] >= b[0]


@given(beta=st.floats(1e-4, 1), k=st.integers(2, 64))
def test_certified_mixture_term_attains_the_max(beta, k):
    mixture = (np.logaddexp(0, (k - 1) * 4 * beta * k) - math.log(2)) / (k - 1)
    assert base_rdp_certified(beta, np.array([k]))[0] == pytest.approx(mixture, rel=1e-15)
    assert mixture >= 2 * beta * k * (1 - 1e-12)  # Jensen


@settings(max_examples=200)
@given(
    q=st.floats(1e-4, 0.99),
    beta=st.floats(1e-3, 1.0),
    alpha=st.integers(2, 8),
    tight=st.booleans(),
)
def test_zhu_wang_log_space_matches_mpmath(q, beta, alpha, tight):
    base = base_rdp_certified(beta, np.maximum(np.arange(alpha + 1), 2))
    got = poisson_subsampled_rdp(base, q, np.array([alpha]), tight=tight)[0]
    assert got == pytest.approx(mp_zhu_wang(base, q, alpha, tight), rel=1e-10)


@settings(max_examples=100)
@given(q=st.floats(1e-4, 0.999), beta=st.floats(1e-3, 1.0))
def test_general_bound_dominates_tight_and_stays_finite_at_64(q, beta):
    orders = np.arange(2, 65)
    base = base_rdp_certified(beta, np.maximum(np.arange(65), 2))
    general = poisson_subsampled_rdp(base, q, orders)
    tight = poisson_subsampled_rdp(base, q, orders, tight=True)
    assert np.isfinite(general).all()
    assert (general >= tight).all()


def test_amplification_edge_cases_q_zero_and_q_one():
    base = base_rdp_certified(0.2, np.maximum(np.arange(11), 2))
    orders = np.arange(2, 11)
    assert (poisson_subsampled_rdp(base, 0.0, orders) == 0).all()
    np.testing.assert_allclose(poisson_subsampled_rdp(base, 1.0, orders, tight=True), base[orders])
    general = poisson_subsampled_rdp(base, 1.0, orders)
    np.testing.assert_allclose(general[1:], base[orders[1:]] + math.log(3) / (orders[1:] - 1))


@settings(max_examples=100)
@given(q=st.floats(0.001, 0.5), beta=st.floats(1e-3, 0.5))
def test_amplification_is_nondecreasing_in_q_and_in_the_base_curve(q, beta):
    orders = np.arange(2, 17)
    base = base_rdp_certified(beta, np.maximum(np.arange(17), 2))
    lo = poisson_subsampled_rdp(base, q, orders)
    assert (poisson_subsampled_rdp(base, min(1.0, q * 1.5), orders) >= lo - 1e-15).all()
    assert (poisson_subsampled_rdp(base * 1.2, q, orders) >= lo - 1e-15).all()


@pytest.mark.parametrize(("q", "floor"), [(0.03, 2.7e-5), (0.1, 1.0e-3), (0.25, 1.5e-2)])
def test_general_bound_with_zero_base_equals_the_section5_floor(q, floor):
    alpha = 3
    got = poisson_subsampled_rdp(np.zeros(4), q, np.array([alpha]))[0]
    closed = math.log1p(2 * math.comb(3, 3) * q**3) / (alpha - 1)
    assert got == pytest.approx(closed, rel=1e-12)
    assert got == pytest.approx(floor, rel=0.05)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.5])
@pytest.mark.parametrize("q", [0.01, 0.1, 0.5])
def test_tight_form_equals_dp_accounting_subsampled_gaussian(sigma, q):
    """Invariant 15: with ε(k) = k/(2σ²) the tight form is dp-accounting's exact Gaussian RDP."""
    orders = np.arange(2, 33)
    base = np.maximum(np.arange(33), 2) / (2 * sigma**2)
    ours = poisson_subsampled_rdp(base, q, orders, tight=True)
    acc = rdp_lib.RdpAccountant(orders=list(map(float, orders)))
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)))
    np.testing.assert_allclose(ours, acc._rdp, rtol=1e-12)


# ------------------------------------------------------------------------ conversion and budget


@settings(max_examples=100)
@given(eps=st.floats(0.5, 20), delta=st.floats(1e-10, 1e-2), k=st.integers(2, 64))
def test_budget_round_trips_through_compute_epsilon(eps, delta, k):
    b = rdp_budget(eps, delta, np.array([k]))[0]
    if b <= 0 or delta**2 + math.expm1(-b) > 0:
        return
    got, order = rdp_to_epsilon([k], [b], delta)
    assert order == k
    assert got == pytest.approx(eps, rel=1e-10)


def test_negative_rdp_is_refused_before_conversion():
    with pytest.raises(ValueError, match="rdp must be >= 0"):
        rdp_to_epsilon([2, 3], [0.1, -0.1], 1e-5)


# ----------------------------------------------------------------------------------- calibration


def test_acceptance_certified_defaults_spend_between_7_9_and_8():
    cal = PMixEDConfig(**DEFAULTS, mode="certified").calibrate()
    total = np.array([math.fsum([c] * 1024) for c in cal.per_query_rdp])
    eps, _ = rdp_lib.compute_epsilon(list(cal.orders), list(total), 1e-5)
    assert 7.9 <= eps <= 8.0


def test_certified_worked_numbers_section5():
    cal = PMixEDConfig(**DEFAULTS).calibrate()
    assert cal.beta == pytest.approx(0.1707, abs=1e-4)
    assert cal.planned_order == 3
    assert cal.per_query_rdp[cal.orders.index(3)] == pytest.approx(3.123e-3, rel=1e-3)
    assert cal.certified and cal.status == "certified"


@pytest.mark.parametrize(
    ("override", "beta"),
    [
        ({"epsilon": 2.0}, 0.0174),
        ({"epsilon": 4.0}, 0.0810),
        ({"epsilon": 10.0}, 0.2005),
        ({"query_budget": 512}, 0.2128),
        ({"query_budget": 8192}, 0.0494),
        ({"sampling_rate": 0.1}, 0.0252),
        ({"relation": "replace_one"}, 0.0652),
        ({"mode": "capped", "lambda_max": 0.1}, 0.5068),
        ({"mode": "capped", "lambda_max": 0.5}, 0.3977),
        ({"amplification": "tight", "accept_unproven_amplification": True}, 0.1938),
    ],
)
def test_worked_sweeps_reproduce_to_1e_4(override, beta):
    cal = PMixEDConfig(**{**DEFAULTS, **override}).calibrate()
    assert cal.beta == pytest.approx(beta, abs=1e-4)
    assert cal.planned_epsilon <= cal.config.epsilon


def test_beta_is_nondecreasing_in_epsilon_and_nonincreasing_in_queries():
    betas_eps = [PMixEDConfig(**{**DEFAULTS, "epsilon": e}).calibrate().beta for e in (3, 5, 7)]
    betas_t = [
        PMixEDConfig(**{**DEFAULTS, "query_budget": t}).calibrate().beta for t in (256, 2048)
    ]
    assert betas_eps == sorted(betas_eps)
    assert betas_t[0] > betas_t[1]


def test_replace_one_curve_is_infinite_above_half_the_orders():
    cal = PMixEDConfig(**{**DEFAULTS, "relation": "replace_one"}).calibrate()
    orders = np.array(cal.orders)
    assert np.isinf(cal.per_query_rdp[2 * orders > 64]).all()
    assert np.isfinite(cal.per_query_rdp[2 * orders <= 64]).all()


@pytest.mark.parametrize(
    "override",
    [
        {"sampling_rate": 0.25},  # the amplification floor (§5)
        {"epsilon": 2.0, "mode": "capped", "lambda_max": 0.3},  # L too large (§6)
        {"epsilon": 1e-3, "delta": 1e-12},  # B(k) <= 0 everywhere
    ],
)
def test_infeasible_settings_raise_with_a_reason(override):
    with pytest.raises(InfeasibleBudget):
        PMixEDConfig(**{**DEFAULTS, **override}).calibrate()


def test_a_floor_reached_only_by_a_vanishing_charge_is_infeasible_not_an_arithmetic_error():
    """β ≈ 1e-12 meets ε through the (0, δ) route (the order-2 charge rounds to almost nothing)
    while every useful β spends 8.25 > 8: no budget the filter can hold exists, so the one-line
    InfeasibleBudget names the floor (was ArithmeticError: the re-check could never pass)."""
    cfg = PMixEDConfig(n_members=16, sampling_rate=0.15, epsilon=8.0, delta=1e-5, query_budget=1024)
    with pytest.raises(InfeasibleBudget, match=r"spends epsilon=8\.2\d* > 8\.0 .*sampling_rate"):
        cfg.calibrate()


def test_reference_beta_by_size_reproduces_the_paper_code():
    """Acceptance: n = 1..6 at α = 3 gives the main-branch per-size β to 1e-3 (here 1e-4)."""
    cal = PMixEDConfig(**DEFAULTS, mode="reference").calibrate()
    expected = [0.5652, 0.1938, 0.2236, 0.2436, 0.2583, 0.2699]
    np.testing.assert_allclose(cal.beta_by_size[:6], expected, atol=1e-4)
    assert cal.status == "UNCERTIFIED" and not cal.certified
    assert np.isinf(cal.per_query_rdp[3:]).all()
    assert cal.per_query_rdp[1] == pytest.approx(3.123e-3, rel=1e-3)


def test_charged_cost_is_infinite_where_no_constraint_is_enforced():
    """Invariant 29: reference mode constrains only α = 3, so orders above claim nothing finite."""
    cal = PMixEDConfig(**DEFAULTS, mode="reference").calibrate()
    above = np.array(cal.orders) > 3
    assert np.isinf(cal.per_query_rdp[above]).all()


# ----------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"sampling_rate": 1.5}, r"sampling_rate must be in \(0, 1\]. Found 1.5"),
        ({"sampling_rate": float("nan")}, "sampling_rate must be in"),
        ({"epsilon": -1}, "epsilon must be finite and > 0. Found -1"),
        ({"delta": 0}, r"delta must be in \(0, 1\). Found 0"),
        ({"query_budget": 0}, "query_budget must be an integer >= 1. Found 0"),
        ({"n_members": 0}, "n_members must be an integer >= 1"),
        ({"n_members": True}, "n_members must be an integer >= 1"),
        ({"mode": "fast"}, "mode must be one of"),
        ({"relation": "user"}, "relation must be one of"),
        ({"orders": (3, 2)}, "orders must be strictly increasing"),
        ({"orders": (1.5, 2)}, "orders must be"),
        ({"mode": "capped"}, r"lambda_max must be in \(0, 1\) in capped mode"),
        ({"lambda_max": 0.2}, "lambda_max applies to mode 'capped' only"),
        ({"amplification": "tight"}, "accept_unproven_amplification=True"),
        ({"mode": "reference", "relation": "replace_one"}, "not available in reference mode"),
    ],
)
def test_bad_config_raises_value_error_naming_the_parameter(override, message):
    with pytest.raises(ValueError, match=message):
        PMixEDConfig(**{**DEFAULTS, **override})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        PMixEDConfig(n_members=80, sampling_rate=1.5, epsilon=-1, delta=0, query_budget=0)
    text = str(err.value)
    for name in ("sampling_rate", "epsilon", "delta", "query_budget"):
        assert name in text
    assert "\n" not in text

"""Bounds against independent values: SciPy root-finding, the one-run paper's caps, AUDIT.md §6.6."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize, stats

from audit.bounds import (
    BonferroniAll,
    Fixed,
    Split,
    cp_epsilon,
    cp_lower,
    cp_upper,
    empirical_epsilon,
    exposure_epsilon,
    one_run_epsilon,
    one_run_p,
)

DELTA = 1e-5


def binomial_inversion_upper(k, n, level):
    """The CP upper limit by definition: the p with P[Bin(n, p) <= k] = level (no beta function)."""
    return optimize.brentq(lambda p: stats.binom.cdf(k, n, p) - level, 1e-15, 1 - 1e-15, xtol=1e-14)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (17, 100), (999, 1000), (0, 10000)])
def test_clopper_pearson_matches_binomial_inversion(k, n):
    assert cp_upper(k, n, 0.025) == pytest.approx(binomial_inversion_upper(k, n, 0.025), rel=1e-8)
    # lower limit: P[Bin(n, p) >= k] = level
    if k:
        lo = optimize.brentq(
            lambda p: stats.binom.sf(k - 1, n, p) - 0.05, 1e-15, 1 - 1e-15, xtol=1e-14
        )
        assert cp_lower(k, n, 0.05) == pytest.approx(lo, rel=1e-8)
    assert cp_upper(n, n, 0.025) == 1.0 and cp_lower(0, n, 0.05) == 0.0


def test_zero_errors_give_the_closed_form():
    for n in (10, 100, 1000):
        fpr_u = 1 - 0.025 ** (1 / n)
        expected = math.log(1 - DELTA - fpr_u) - math.log(fpr_u)
        assert cp_epsilon(0, n, 0, n, delta=DELTA) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(
    ("n", "expected"), [(10, 0.81), (100, 3.3), (1000, 5.6), (10**4, 7.9), (10**5, 10.2)]
)
def test_perfect_attack_table_of_audit_md(n, expected):
    """AUDIT.md §6.6, first table: ε_lb ≈ ln(n/3.7) with zero errors (rounded to 0.1)."""
    assert cp_epsilon(0, n, 0, n, delta=DELTA) == pytest.approx(expected, abs=0.06)


@pytest.mark.parametrize(
    ("eps", "n", "expected"),
    [
        (1, 10**3, 0.86),
        (1, 10**4, 0.96),
        (4, 10**3, 3.5),
        (4, 10**4, 3.9),
        (8, 10**4, 7.0),
        (8, 10**5, 7.7),
    ],
)
def test_rr_shaped_table_of_audit_md(eps, n, expected):
    """AUDIT.md §6.6, RR table: expected counts FPR = FNR = 1/(1+e^ε), rounded."""
    k = round(n / (1 + math.exp(eps)))
    assert cp_epsilon(k, n, k, n, delta=DELTA) == pytest.approx(expected, abs=0.1)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "expected"),
    [
        (1000, 100, 100, 0.0, 3.49),
        (1000, 100, 100, DELTA, 3.47),
        (1000, 1000, 1000, 0.0, 5.81),
        (1000, 1000, 1000, DELTA, 5.78),
        (10**4, 10**4, 10**4, 0.0, 8.11),
        (10**4, 10**4, 10**4, DELTA, 7.83),
        (10**5, 10**4, 10**4, DELTA, 5.82),
        (1000, 1000, 990, DELTA, 4.1),
        (1000, 1000, 900, DELTA, 2.0),
        (1000, 1000, 750, DELTA, 1.0),
    ],
)
def test_one_run_caps_of_audit_md(m, r, v, delta, expected):
    """AUDIT.md §6.6 one-run caps (Steinke, Nasr, Jagielski 2023, η = 0.05)."""
    got = one_run_epsilon(m, r, v, delta=delta).epsilon
    assert got == pytest.approx(expected, abs=0.051 if expected >= 3 else 0.1)


def test_one_run_perfect_guesses_at_delta_zero_are_the_binomial_root():
    # p(ε) = q^r; sup{ε : q^r ≤ η} = logit(η^(1/r))
    q = 0.05 ** (1 / 100)
    assert one_run_epsilon(1000, 100, 100, delta=0).epsilon == pytest.approx(
        math.log(q / (1 - q)), rel=1e-9
    )


@given(st.integers(1, 200), st.data())
def test_one_run_p_is_nondecreasing_in_epsilon(r, data):
    v = data.draw(st.integers(0, r))
    e1, e2 = sorted(data.draw(st.lists(st.floats(0, 10), min_size=2, max_size=2)))
    assert one_run_p(e1, 2 * r, r, v, DELTA) <= one_run_p(e2, 2 * r, r, v, DELTA) + 1e-12


def test_exposure_examples_of_audit_md():
    """§6.3: K+1 = 1000; 100/100 successes give 6.9 and 10/100 give 4.0."""
    assert exposure_epsilon(100, 100, 999, delta=DELTA).epsilon == pytest.approx(6.9, abs=0.05)
    assert exposure_epsilon(10, 100, 999, delta=DELTA).epsilon == pytest.approx(4.0, abs=0.05)
    assert exposure_epsilon(0, 100, 999, delta=DELTA).epsilon == 0.0


@given(st.integers(1, 300), st.integers(1, 300), st.data())
def test_cp_epsilon_is_nonnegative_and_nonincreasing_in_errors(n0, n1, data):
    k_fp = data.draw(st.integers(0, n0))
    k_fn = data.draw(st.integers(0, n1))
    e = cp_epsilon(k_fp, n0, k_fn, n1, delta=DELTA)
    assert e >= 0
    if k_fp < n0:
        assert cp_epsilon(k_fp + 1, n0, k_fn, n1, delta=DELTA) <= e + 1e-12
    if k_fn < n1:
        assert cp_epsilon(k_fp, n0, k_fn + 1, n1, delta=DELTA) <= e + 1e-12


def test_fixed_threshold_counts_and_strategies_agree_on_separated_scores():
    s_in, s_out = np.arange(100) + 1000.0, np.arange(100) * 1.0
    fixed = empirical_epsilon(s_in, s_out, delta=DELTA, strategy=Fixed(500.0))
    assert (fixed.detail["k_fp"], fixed.detail["k_fn"]) == (0, 0)
    assert fixed.epsilon == pytest.approx(cp_epsilon(0, 100, 0, 100, delta=DELTA))
    bonf = empirical_epsilon(s_in, s_out, delta=DELTA, strategy=BonferroniAll())
    assert 0 < bonf.epsilon < fixed.epsilon  # the price of looking at every threshold
    split = empirical_epsilon(s_in, s_out, delta=DELTA, strategy=Split(0.5, seed=1))
    assert split.detail["n0"] == 50 and split.epsilon == pytest.approx(
        cp_epsilon(0, 50, 0, 50, delta=DELTA)
    )


def test_identical_worlds_stay_at_zero_in_95_of_100_repetitions():
    """Negative control (issue acceptance): ε_lb ≤ 0.05 in at least 95 of 100 seeded repetitions."""
    for strategy in (BonferroniAll(), Split(0.5, seed=0), Fixed(0.0)):
        ok = 0
        for seed in range(100):
            rng = np.random.default_rng(seed)
            b = empirical_epsilon(
                rng.normal(size=500), rng.normal(size=500), delta=DELTA, strategy=strategy
            )
            ok += b.epsilon <= 0.05
        assert ok >= 95, (strategy, ok)


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match="delta must be in"):
        cp_epsilon(0, 10, 0, 10, delta=1.5)
    with pytest.raises(ValueError, match="eta must be in"):
        cp_epsilon(0, 10, 0, 10, delta=0.0, eta=0.0)
    with pytest.raises(ValueError, match="in_scores"):
        empirical_epsilon([np.nan], [1.0], delta=DELTA, strategy=Fixed(0))
    with pytest.raises(ValueError, match="one-run counts"):
        one_run_epsilon(10, 5, 6, delta=DELTA)
    with pytest.raises(ValueError, match="strategy"):
        empirical_epsilon([1.0], [0.0], delta=DELTA, strategy="best")

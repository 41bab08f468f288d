"""Risk metrics against brute force; the GDP estimate against AUDIT.md §6.4's reference values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit.risk import auc, gdp_delta, gdp_epsilon, gdp_estimate, risk_metrics, roc, tpr_at_fpr

scores = st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=30)


@given(scores, scores)
def test_auc_equals_pair_counting_with_ties_as_half(a, b):
    x, y = np.array(a)[:, None], np.array(b)[None, :]
    brute = ((x > y).sum() + 0.5 * (x == y).sum()) / (x.size * y.size)
    assert auc(a, b) == pytest.approx(brute, abs=1e-12)


@given(scores, scores, st.floats(0, 1))
def test_tpr_at_fpr_dominates_every_roc_point_at_or_below_that_fpr(a, b, f):
    fpr, tpr = roc(a, b)
    got = tpr_at_fpr(a, b, f)
    assert (tpr[fpr <= f] <= got + 1e-12).all()
    assert 0.0 <= got <= 1.0


def test_identical_scores_give_auc_half_and_separated_scores_auc_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=4000)
    assert auc(x[:2000], x[2000:]) == pytest.approx(0.5, abs=0.03)
    assert auc(x + 100, x) == 1.0
    assert tpr_at_fpr(x + 100, x, 0.001) == 1.0


@pytest.mark.parametrize(("eps", "mu"), [(1, 0.268), (2, 0.502), (4, 0.925), (8, 1.666)])
def test_gdp_conversion_matches_the_reference_values(eps, mu):
    """AUDIT.md §6.4 at δ = 1e-5 (μ rounded to 3 decimals there)."""
    assert gdp_epsilon(mu, 1e-5) == pytest.approx(eps, rel=0.01)
    assert gdp_delta(gdp_epsilon(mu, 1e-5), mu) == pytest.approx(1e-5, rel=1e-6)


def test_gdp_estimate_is_about_zero_on_null_scores_and_labelled():
    """The |μ| shortcut returned ε ≈ 3.5 on null scores (jax_privacy PR #270); ours must not."""
    rng = np.random.default_rng(1)
    est = gdp_estimate(rng.normal(size=2000), rng.normal(size=2000), delta=1e-5)
    assert est["epsilon"] < 0.5 and "estimate" in est["label"]
    shifted = gdp_estimate(rng.normal(size=2000) + 2.0, rng.normal(size=2000), delta=1e-5)
    assert 1.0 < shifted["mu_lb"] < 2.0  # the true μ is 2


def test_risk_metrics_report_intervals_and_warn_when_fpr_is_unreachable():
    rng = np.random.default_rng(2)
    out = risk_metrics(rng.normal(size=200) + 1, rng.normal(size=200), seed=3, resamples=200)
    lo, hi = out["auc"]["ci"]
    assert lo <= out["auc"]["value"] <= hi and 0.7 < out["auc"]["value"] < 0.85
    assert any("0.001" in w for w in out["warnings"]) and out["seed"] == 3

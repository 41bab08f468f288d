"""Risk metrics and the GDP estimate: descriptions of attack success, never bounds (AUDIT.md §6.4-6.5).

* :func:`auc`: area under the ROC curve, ties counted ½ (the Mann–Whitney statistic).
* :func:`tpr_at_fpr`: TPR at a target FPR on the ROC convex hull (randomising between two
  thresholds is allowed, so the hull is achievable).
* :func:`risk_metrics`: both, with stratified-bootstrap intervals labelled as such, and a warning
  when n0·FPR < 10 makes a TPR at that FPR meaningless.
* :func:`gdp_estimate`: μ_lb from Clopper–Pearson rates, each direction on its own thresholds under
  one Bonferroni budget, converted to ε at δ; an *estimate* resting on a Gaussian-shape assumption.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats

from audit.bounds import _as_scores, _candidates, _counts, _rate_bounds

__all__ = ["auc", "gdp_epsilon", "gdp_estimate", "risk_metrics", "roc", "roc_summary", "tpr_at_fpr"]

FPR_TARGETS = (0.001, 0.01)


def auc(in_scores: object, out_scores: object) -> float:
    """P[score(in) > score(out)] + ½·P[tie]."""
    s_in, s_out = _as_scores(in_scores, "in_scores"), _as_scores(out_scores, "out_scores")
    ranks = stats.rankdata(np.concatenate([s_in, s_out]))  # average ranks: ties count ½
    u = ranks[: s_in.size].sum() - s_in.size * (s_in.size + 1) / 2.0
    return float(u / (s_in.size * s_out.size))


def roc(in_scores: object, out_scores: object) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) over every threshold, from (0, 0) to (1, 1), FPR nondecreasing."""
    s_in, s_out = _as_scores(in_scores, "in_scores"), _as_scores(out_scores, "out_scores")
    ts = np.concatenate([[-np.inf], _candidates(s_in, s_out)])
    k_fp, k_fn = _counts(s_in, s_out, ts)
    fpr, tpr = k_fp / s_out.size, 1.0 - k_fn / s_in.size
    return fpr[::-1], tpr[::-1]


def _hull(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper convex hull of the ROC points (monotone chain)."""
    pts: list[tuple[float, float]] = []
    for x, y in sorted(set(zip(fpr.tolist(), tpr.tolist()))):
        while len(pts) >= 2:
            (x1, y1), (x2, y2) = pts[-2], pts[-1]
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0:  # pts[-1] is under the chord
                pts.pop()
            else:
                break
        pts.append((x, y))
    hx, hy = map(np.array, zip(*pts))
    return hx, hy


def tpr_at_fpr(in_scores: object, out_scores: object, fpr: float) -> float:
    """TPR at ``fpr`` on the ROC convex hull."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1]. Found {fpr}.")
    hx, hy = _hull(*roc(in_scores, out_scores))
    return float(np.interp(fpr, hx, hy))


def risk_metrics(
    in_scores: object, out_scores: object, *, seed: int, resamples: int = 1000, level: float = 0.95
) -> dict:
    """AUC and TPR at FPR 0.1% and 1% with stratified-bootstrap intervals (percentile method)."""
    s_in, s_out = _as_scores(in_scores, "in_scores"), _as_scores(out_scores, "out_scores")
    rng = np.random.default_rng(seed)
    point = {"auc": auc(s_in, s_out)} | {
        f"tpr_at_fpr_{f:g}": tpr_at_fpr(s_in, s_out, f) for f in FPR_TARGETS
    }
    draws = {k: [] for k in point}
    for _ in range(resamples):
        b_in = s_in[rng.integers(0, s_in.size, s_in.size)]
        b_out = s_out[rng.integers(0, s_out.size, s_out.size)]
        draws["auc"].append(auc(b_in, b_out))
        for f in FPR_TARGETS:
            draws[f"tpr_at_fpr_{f:g}"].append(tpr_at_fpr(b_in, b_out, f))
    tail = (1.0 - level) / 2.0 * 100
    out = {
        "n1": int(s_in.size),
        "n0": int(s_out.size),
        "ci_method": f"stratified bootstrap, {resamples} resamples, percentile {level:g}",
        "seed": seed,
    }
    for k, v in point.items():
        lo, hi = np.percentile(draws[k], [tail, 100 - tail])
        out[k] = {"value": v, "ci": [float(lo), float(hi)]}
    out["warnings"] = [
        f"n0*FPR = {s_out.size * f:g} < 10: TPR at FPR {f:g} is not meaningful"
        for f in FPR_TARGETS
        if s_out.size * f < 10
    ]
    out["roc"] = roc_summary(s_in, s_out)
    return out


def roc_summary(in_scores: object, out_scores: object, points: int = 33) -> dict:
    """The ROC hull at ``points`` log-spaced FPRs from 1/n0 to 1: an aggregate fit to publish and
    plot (never the per-example scores)."""
    s_in, s_out = _as_scores(in_scores, "in_scores"), _as_scores(out_scores, "out_scores")
    hx, hy = _hull(*roc(s_in, s_out))
    fpr = np.geomspace(1.0 / s_out.size, 1.0, points)
    return {"fpr": fpr.tolist(), "tpr": np.interp(fpr, hx, hy).tolist(), "kind": "convex hull"}


def gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2), in log space."""
    a = stats.norm.logcdf(-epsilon / mu + mu / 2.0)
    b = epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2.0)
    return float(math.exp(a) * -math.expm1(b - a)) if b < a else 0.0


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at which μ-GDP gives ``delta`` (0 when μ = 0)."""
    if mu <= 0.0:
        return 0.0
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2.0
    return float(optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-12))


def gdp_estimate(in_scores: object, out_scores: object, *, delta: float, eta: float = 0.05) -> dict:
    """μ_lb = max over thresholds and both directions of Φ⁻¹(1−FPR_u) − Φ⁻¹(FNR_u), Bonferroni.

    Each direction (in-scores high, and in-scores low) is searched on its own thresholds; the
    budget η is split over both directions, both rates and every threshold. (Swapping the roles of
    FPR and FNR gives the same μ, so it is not a direction of its own.) Labelled an estimate: the
    conversion to ε assumes a Gaussian trade-off curve.
    """
    s_in, s_out = _as_scores(in_scores, "in_scores"), _as_scores(out_scores, "out_scores")
    level = eta / (4.0 * _candidates(s_in, s_out).size)  # two rates, two directions, thresholds
    best = 0.0
    for a, b in ((s_in, s_out), (-s_in, -s_out)):  # the second direction: low = member
        _, _, fpr_u, fnr_u = _rate_bounds(a, b, _candidates(a, b), level, level)
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = stats.norm.ppf(1.0 - fpr_u) - stats.norm.ppf(fnr_u)
        mu = mu[np.isfinite(mu)]
        if mu.size:
            best = max(best, float(mu.max()))
    return {
        "label": "estimate (assumes a Gaussian trade-off curve)",
        "mu_lb": best,
        "epsilon": gdp_epsilon(best, delta),
        "delta": delta,
        "confidence": 1.0 - eta,
    }

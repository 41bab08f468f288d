"""Lower bounds on ε from attack outcomes: pure functions of scores or counts (AUDIT.md §6).

Every bound here is a rigorous statement at confidence 1 − η about the mechanism that produced the
trials, at the claim's δ:

* :func:`cp_epsilon`: Clopper–Pearson upper bounds on FPR and FNR at one threshold, turned into ε
  through FPR + e^ε·FNR ≥ 1 − δ and FNR + e^ε·FPR ≥ 1 − δ (Kairouz, Oh, Viswanath 2015).
* :func:`empirical_epsilon`: the same from two score samples, with a threshold strategy declared
  before the scores exist (:class:`Fixed`, :class:`Split`, :class:`BonferroniAll`). The best
  threshold chosen after the fact without a correction is not offered.
* :func:`one_run_epsilon`: the one-run audit of Steinke, Nasr and Jagielski (2023, Thm 5.2).
* :func:`exposure_epsilon`: rank of an inserted secret among K fresh references (exact null).

All results are clamped at 0 and computed in float64 logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

__all__ = [
    "BonferroniAll",
    "Bound",
    "Fixed",
    "Split",
    "cp_epsilon",
    "cp_lower",
    "cp_upper",
    "empirical_epsilon",
    "exposure_epsilon",
    "one_run_epsilon",
    "one_run_p",
]


@dataclass(frozen=True)
class Bound:
    """One empirical lower bound and what it rests on (all public: counts and parameters)."""

    epsilon: float
    method: str
    delta: float
    confidence: float
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "epsilon_lb": self.epsilon,
            "method": self.method,
            "delta": self.delta,
            "confidence": self.confidence,
            **self.detail,
        }


def _check_unit(name: str, value: float, *, closed_low: bool = False) -> float:
    ok = (0.0 <= value < 1.0) if closed_low else (0.0 < value < 1.0)
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}. Found {value!r}.")
    return float(value)


def _check_counts(k: int, n: int, name: str) -> None:
    if not (int(k) == k and int(n) == n and 0 <= k <= n and n >= 1):
        raise ValueError(f"{name} must satisfy 0 <= k <= n and n >= 1. Found k={k}, n={n}.")


def cp_upper(k: int, n: int, level: float) -> float:
    """One-sided Clopper–Pearson upper bound: P[p > bound] ≤ ``level`` for k successes in n."""
    _check_counts(k, n, "cp_upper counts")
    return 1.0 if k == n else float(stats.beta.ppf(1.0 - level, k + 1, n - k))


def cp_lower(k: int, n: int, level: float) -> float:
    """One-sided Clopper–Pearson lower bound: P[p < bound] ≤ ``level`` for k successes in n."""
    _check_counts(k, n, "cp_lower counts")
    return 0.0 if k == 0 else float(stats.beta.ppf(level, k, n - k + 1))


def _epsilon_from_rates(fpr_u: float, fnr_u: float, delta: float) -> float:
    """max{ln(1−δ−FPR_u) − ln FNR_u, ln(1−δ−FNR_u) − ln FPR_u, 0}; terms with a bad log dropped."""
    best = 0.0
    for a, b in ((fpr_u, fnr_u), (fnr_u, fpr_u)):
        if 1.0 - delta - a > 0.0 and b > 0.0:
            best = max(best, math.log(1.0 - delta - a) - math.log(b))
    return best


def cp_epsilon(
    k_fp: int,
    n0: int,
    k_fn: int,
    n1: int,
    *,
    delta: float,
    eta: float = 0.05,
    level: tuple[float, float] | None = None,
) -> float:
    """ε lower bound from false positives among n0 trials of D' and false negatives among n1 of D.

    Both rates are bounded at η/2 each (union bound), unless ``level`` gives the two levels.
    """
    _check_unit("delta", delta, closed_low=True)
    _check_unit("eta", eta)
    lv0, lv1 = level if level is not None else (eta / 2.0, eta / 2.0)
    return _epsilon_from_rates(cp_upper(k_fp, n0, lv0), cp_upper(k_fn, n1, lv1), delta)


# --- threshold strategies ---------------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """Predict "member" iff score ≥ ``threshold``; chosen before the scores exist."""

    threshold: float
    name: str = "fixed"


@dataclass(frozen=True)
class Split:
    """Choose the threshold on a random ``frac`` of each world, bound on the rest."""

    frac: float = 0.5
    seed: int = 0
    name: str = "split"


@dataclass(frozen=True)
class BonferroniAll:
    """Every threshold at once: each FPR bound at η/(2·n0), each FNR bound at η/(2·n1).

    With n0 out-scores, the false-positive count changes at most n0 times as the threshold moves, so
    the family of FPR statements has at most n0 distinct non-trivial members (the count n0 gives
    the trivial bound 1); a union over them costs a factor n0 (likewise n1 for FNR). Conservative.
    """

    name: str = "bonferroni_all"


def _counts(in_scores: np.ndarray, out_scores: np.ndarray, thresholds: np.ndarray):
    """(k_fp, k_fn) per threshold: out-scores ≥ t are false positives, in-scores < t misses."""
    out_sorted, in_sorted = np.sort(out_scores), np.sort(in_scores)
    k_fp = out_sorted.size - np.searchsorted(out_sorted, thresholds, side="left")
    k_fn = np.searchsorted(in_sorted, thresholds, side="left")
    return k_fp, k_fn


def _candidates(in_scores: np.ndarray, out_scores: np.ndarray) -> np.ndarray:
    """One threshold per distinct split of the pooled scores: midpoints between neighbours.

    Midpoints (rather than the scores themselves) keep a chosen threshold away from the samples
    it was chosen on, which matters when it is applied to fresh scores (:class:`Split`).
    """
    u = np.unique(np.concatenate([in_scores, out_scores]))
    a, b = u[:-1], u[1:]
    with np.errstate(invalid="ignore"):
        mids = np.where(np.isfinite(a) & np.isfinite(b), a / 2 + b / 2, b)
    return np.unique(np.concatenate([u[:1], mids, [np.inf]]))


def _rate_bounds(in_s, out_s, thresholds, level0, level1) -> tuple[np.ndarray, ...]:
    """(k_fp, k_fn, FPR_u, FNR_u) per threshold: Clopper–Pearson upper bounds, vectorised."""
    k_fp, k_fn = _counts(in_s, out_s, thresholds)

    def upper(k, n, level):
        return np.where(k == n, 1.0, stats.beta.ppf(1.0 - level, k + 1, np.maximum(n - k, 1)))

    return k_fp, k_fn, upper(k_fp, out_s.size, level0), upper(k_fn, in_s.size, level1)


def _best(in_s, out_s, delta, level0, level1) -> tuple[float, float, int, int]:
    """(ε, threshold, k_fp, k_fn) maximising the CP bound over every candidate threshold."""
    ts = _candidates(in_s, out_s)
    k_fp, k_fn, fpr_u, fnr_u = _rate_bounds(in_s, out_s, ts, level0, level1)
    eps = np.array([_epsilon_from_rates(a, b, delta) for a, b in zip(fpr_u, fnr_u)])
    i = int(np.argmax(eps))
    return float(eps[i]), float(ts[i]), int(k_fp[i]), int(k_fn[i])


def _as_scores(x: object, name: str) -> np.ndarray:
    a = np.asarray(x, np.float64).ravel()
    if a.size == 0 or np.isnan(a).any():
        raise ValueError(f"{name} must be a non-empty array of scores without NaN.")
    return a


def empirical_epsilon(
    in_scores: object,
    out_scores: object,
    *,
    delta: float,
    eta: float = 0.05,
    strategy: Fixed | Split | BonferroniAll,
) -> Bound:
    """Clopper–Pearson ε lower bound from scores under D (``in``) and D' (``out``); higher = D.

    Trials must be independent draws of the whole mechanism in each world.
    """
    s_in, s_out = _as_scores(in_scores, "in_scores"), _as_scores(out_scores, "out_scores")
    _check_unit("delta", delta, closed_low=True)
    _check_unit("eta", eta)
    if not isinstance(strategy, (Fixed, Split, BonferroniAll)):
        raise ValueError(f"strategy must be Fixed, Split or BonferroniAll. Found {strategy!r}.")
    detail: dict = {"strategy": strategy.name, "n1": int(s_in.size), "n0": int(s_out.size)}
    if isinstance(strategy, Fixed):
        (k_fp,), (k_fn,) = _counts(s_in, s_out, np.array([strategy.threshold]))
        eps = cp_epsilon(int(k_fp), s_out.size, int(k_fn), s_in.size, delta=delta, eta=eta)
        detail |= {"threshold": strategy.threshold, "k_fp": int(k_fp), "k_fn": int(k_fn)}
    elif isinstance(strategy, BonferroniAll):
        lv0, lv1 = eta / (2 * s_out.size), eta / (2 * s_in.size)
        eps, t, k_fp, k_fn = _best(s_in, s_out, delta, lv0, lv1)
        detail |= {"threshold": t, "k_fp": k_fp, "k_fn": k_fn}
    else:  # Split
        _check_unit("Split.frac", strategy.frac)
        rng = np.random.default_rng(strategy.seed)
        a_in, b_in = _split(s_in, strategy.frac, rng)
        a_out, b_out = _split(s_out, strategy.frac, rng)
        _, t, _, _ = _best(a_in, a_out, delta, eta / 2, eta / 2)
        (k_fp,), (k_fn,) = _counts(b_in, b_out, np.array([t]))
        eps = cp_epsilon(int(k_fp), b_out.size, int(k_fn), b_in.size, delta=delta, eta=eta)
        detail |= {
            "threshold": t,
            "k_fp": int(k_fp),
            "k_fn": int(k_fn),
            "seed": strategy.seed,
            "n1": int(b_in.size),
            "n0": int(b_out.size),
            "frac": strategy.frac,
        }
    return Bound(eps, "clopper_pearson", delta, 1.0 - eta, detail)


def _split(a: np.ndarray, frac: float, rng: np.random.Generator):
    if a.size < 2:
        raise ValueError(f"Split needs at least 2 scores per world. Found {a.size}.")
    perm = rng.permutation(a.size)
    cut = min(max(1, round(frac * a.size)), a.size - 1)
    return a[perm[:cut]], a[perm[cut:]]


# --- one-run audit ----------------------------------------------------------------------------


def one_run_p(epsilon: float, m: int, r: int, v: int, delta: float) -> float:
    """p(ε) = P[Bin(r,q) ≥ v] + 2mδ·max_i (P[Bin(r,q) ≥ v−i] − P[Bin(r,q) ≥ v]) / i, q = e^ε/(1+e^ε)."""
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = stats.binom.sf(v - 1, r, q)  # P[X ≥ v]
    if delta == 0.0 or v == 0:
        return float(tail)
    i = np.arange(1, v + 1)
    gaps = (stats.binom.sf(v - i - 1, r, q) - tail) / i
    return float(tail + 2.0 * m * delta * np.max(gaps))


def one_run_epsilon(m: int, r: int, v: int, *, delta: float, eta: float = 0.05) -> Bound:
    """Steinke–Nasr–Jagielski one-run bound: sup{ε : p(ε) ≤ η} for v correct of r guesses.

    m canaries, each included independently with probability ½; r non-abstaining guesses, v right.
    """
    if not (0 <= v <= r <= m and m >= 1):
        raise ValueError(f"one-run counts must satisfy 0 <= v <= r <= m, m >= 1. Found {m, r, v}.")
    _check_unit("delta", delta, closed_low=True)
    _check_unit("eta", eta)
    detail = {"m": m, "r": r, "v": v}
    if one_run_p(0.0, m, r, v, delta) > eta:
        return Bound(0.0, "one_run", delta, 1.0 - eta, detail)
    hi = 1.0
    while one_run_p(hi, m, r, v, delta) <= eta:
        hi *= 2.0
        if hi > 1e3:
            raise ArithmeticError("one-run bound did not bracket; counts are inconsistent.")
    root = optimize.brentq(lambda e: one_run_p(e, m, r, v, delta) - eta, 0.0, hi, xtol=1e-12)
    return Bound(float(root), "one_run", delta, 1.0 - eta, detail)


# --- exposure with an exact null --------------------------------------------------------------


def exposure_epsilon(
    k: int, n: int, n_references: int, *, delta: float, eta: float = 0.05
) -> Bound:
    """ε ≥ ln((K+1)·(TPR_lo − δ)) when the secret ranked first in k of n independent trials.

    Under D' the secret is exchangeable with K uniform references, so it ranks first with
    probability exactly 1/(K+1) (ties broken at random).
    """
    _check_counts(k, n, "exposure counts")
    if n_references < 1:
        raise ValueError(f"n_references must be >= 1. Found {n_references}.")
    _check_unit("delta", delta, closed_low=True)
    _check_unit("eta", eta)
    lo = cp_lower(k, n, eta)
    eps = math.log((n_references + 1) * (lo - delta)) if lo - delta > 0 else 0.0
    detail = {"k": k, "n": n, "n_references": n_references, "tpr_lower": lo}
    return Bound(max(0.0, eps), "exposure_rank", delta, 1.0 - eta, detail)

"""Planted violations (mutation testing of privacy) and their sound twins (AUDIT.md §15).

Each **mutant** is a real pipeline with one known defect and an unchanged claim; each runs through
the same audit as the real mechanism and must be *detected*: an alarm (an exact per-query
divergence above the charged cost, or an empirical ε_lb above the claim) or a ledger/release
mismatch. Each has a **sound twin**, the same pipeline without the defect, which must not be
detected; where a run is cheap its false-alarm rate is measured over ``repetitions`` seeds.

Registered here (one :func:`register` call each, so a new mutant is one function):

* ``seed_dpsgd`` — the seed's DP-SGD and its claim (:mod:`audit.testbeds.seed`);
* ``dpsgd_noise_div4`` — corrected DP-SGD with σ/4 and the claim of σ (many-run white-box audit);
* ``pmixed_reference`` — the paper code's accounting (exact audit; N = 1 is where R2 bites);
* ``pmixed_beta_x4`` — certified mollifier at 4β while the ledger charges the calibrated cost;
* ``pmixed_unmollified`` — one member left unmollified (λ = 1);
* ``generator_skips_tenth_charge`` — a deployment that skips the charge of every tenth query
  (caught by comparing released answers with the ledger's queries).

PMixED mutants are audited on a public toy (Zipf p0 over 300 tokens, other members perturbed
copies, seeded): the exact audit needs no trained model, and :func:`audit.worstcase.worst_member`
plays the poisoned member.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accounting import read_ledger
from audit.canaries import child_rng
from audit.manyrun import ManyRunPlan, corrected_dpsgd_audit, seed_dpsgd_audit
from audit.worstcase import ar_ratio, worst_member
from pmixed import PMixEDConfig
from pmixed.deployment import Answer, Deployment
from pmixed.mechanism import step
from pmixed.privacy import Calibration
from pmixed.standard_modes import R2_ALPHA, R2_MEMBER, R2_PUBLIC, R2_SETTINGS

__all__ = ["MUTANTS", "Mutant", "register", "run_mutants"]


@dataclass(frozen=True)
class Mutant:
    """A planted defect: ``run(defective, seed, scale)`` returns ``{"detected", "evidence", ...}``
    for the mutant (``defective=True``) or its sound twin (``False``). ``cheap``: the twin's
    false-alarm rate is measured over the repetitions (at the "test" scale). Every registered
    twin is: a DP-SGD twin at "test" scale is a batched many-run audit of 400 runs per world,
    about 0.5 s once its σ is calibrated (100 repetitions: 46 s and 53 s on 2 cores)."""

    name: str
    defect: str
    audit: str
    run: Callable[[bool, int, str], dict]
    cheap: bool = True  # the twin's false-alarm rate is measured over repetitions


MUTANTS: dict[str, Mutant] = {}


def register(name: str, defect: str, audit: str, *, cheap: bool = True):
    """Decorator: ``@register("name", "what is wrong", "how it is caught")``."""

    def deco(fn):
        if name in MUTANTS:
            raise ValueError(f"mutant {name!r} is already registered.")
        MUTANTS[name] = Mutant(name, defect, audit, fn, cheap)
        return fn

    return deco


#: Runs per world of the DP-SGD many-run audit, and worst-case search evaluations, by scale.
_RUNS = {"test": 400, "quick": 2000, "full": 10_000}
_EVALS = {"test": 20, "quick": 150, "full": 300}


@register(
    "seed_dpsgd",
    "the seed's DP-SGD: clipped mean gradient, absolute noise sigma, and a "
    "claim with sigma in the numerator",
    "white-box many-run CP vs its own claim",
)
def _seed(defective: bool, seed: int, scale: str) -> dict:
    if not defective:  # the twin is the corrected algorithm at the same claimed epsilon
        return _dpsgd(False, seed, scale, claim=0.5)
    r = seed_dpsgd_audit(runs=_RUNS[scale], seed=seed)
    lb = max(b["epsilon_lb"] for b in r["bounds"].values())
    return {
        "detected": r["violation"],
        "epsilon_lb": lb,
        "claim": r["claimed_epsilon"],
        "evidence": f"epsilon_lb {lb:.3g} > claimed {r['claimed_epsilon']:.3g}",
    }


def _dpsgd(defective: bool, seed: int, scale: str, claim: float = 2.0) -> dict:
    plan = ManyRunPlan(
        claims=(claim,),
        runs=_RUNS[scale],
        pilot_runs=_RUNS[scale],
        seed=seed,
        noise_scale=0.25 if defective else 1.0,
        one_run_canaries=0,
    )
    (row,) = corrected_dpsgd_audit(plan)
    lb, eps = row["epsilon_lb"], row["claim"]["epsilon"]
    return {
        "detected": lb > eps,
        "epsilon_lb": lb,
        "claim": eps,
        "evidence": f"epsilon_lb {lb:.3g} {'>' if lb > eps else '<='} claim {eps:.3g}",
    }


register(
    "dpsgd_noise_div4",
    "corrected DP-SGD with the noise multiplier divided by 4, claim unchanged",
    "white-box many-run CP vs the claim",
)(_dpsgd)


def _toy(seed: int, n_members: int, vocab: int = 300):
    """A public toy context: Zipf p0 and n_members − 1 perturbed copies (the other members)."""
    rng = child_rng(seed, "mutants/toy")
    p0 = 1 / np.arange(1, vocab + 1) ** 1.1
    p0 /= p0.sum()
    others = p0 * np.exp(0.3 * rng.standard_normal((n_members - 1, vocab)))
    others /= others.sum(axis=1, keepdims=True)
    return np.log(p0), np.log(others), rng


_TOY = dict(
    n_members=4,
    sampling_rate=0.05,
    epsilon=8.0,
    delta=1e-5,
    query_budget=1024,
    orders=tuple(range(2, 33)),
)


@functools.lru_cache(maxsize=8)
def _calibrated(**kw) -> Calibration:
    """Calibrations are pure functions of public parameters: computed once per process."""
    return PMixEDConfig(**{**kw, "orders": tuple(kw["orders"])}).calibrate()


def _pmixed_search(
    mechanism: Calibration,
    claim: Calibration,
    seed: int,
    scale: str,
    n_members: int,
    unmollified: bool = False,
) -> dict:
    lp0, others, rng = _toy(seed, n_members, vocab=100 if scale == "test" else 300)
    evals = _EVALS[scale]
    charged = np.asarray(claim.per_query_rdp_add_remove)
    wc = worst_member(
        others, lp0, mechanism, charged, rng=rng, evaluations=evals, unmollified=unmollified
    )
    return {
        "detected": wc.ratio > 1.0,
        "exact_over_charged": wc.ratio,
        "order": wc.order,
        "evidence": f"exact/charged {wc.ratio:.3g} at order {wc.order} ({wc.family} member)",
    }


@register(
    "pmixed_beta_x4",
    "certified mollifier at 4x the calibrated beta; the ledger charges the calibrated cost",
    "exact audit, optimiser-chosen poisoned member",
)
def _beta_x4(defective: bool, seed: int, scale: str) -> dict:
    cal = _calibrated(**_TOY)
    mech = PMixEDConfig(**_TOY).calibration_for_beta(4 * cal.beta) if defective else cal
    return _pmixed_search(mech, cal, seed, scale, _TOY["n_members"])


@register(
    "pmixed_unmollified",
    "one member left unmollified (lambda = 1)",
    "exact audit, optimiser-chosen poisoned member",
)
def _unmollified(defective: bool, seed: int, scale: str) -> dict:
    cal = _calibrated(**_TOY)
    return _pmixed_search(cal, cal, seed, scale, _TOY["n_members"], unmollified=defective)


@register(
    "pmixed_reference",
    "the paper code's reference accounting (beta from the realised subset size, one order)",
    "exact audit of the R2 pair and an optimised member",
)
def _reference(defective: bool, seed: int, scale: str) -> dict:
    kw = {"mode": "reference", "reference_alpha": R2_ALPHA} if defective else {}
    cal = _calibrated(**R2_SETTINGS, **kw)
    lp0 = np.log(np.array(R2_PUBLIC))
    member = np.log(np.array(R2_MEMBER))
    charged = np.asarray(cal.per_query_rdp_add_remove)
    fixed, k = ar_ratio(np.zeros((0, 3)), member, lp0, cal, charged)
    rng = child_rng(seed, "mutants/reference")
    wc = worst_member(np.zeros((0, 3)), lp0, cal, charged, rng=rng, evaluations=_EVALS[scale])
    ratio = max(fixed, wc.ratio)
    return {
        "detected": ratio > 1.0,
        "exact_over_charged": ratio,
        "order": k,
        "evidence": f"exact/charged {ratio:.3g} (R2 pair {fixed:.3g}, search {wc.ratio:.3g})",
    }


class _SkippingDeployment(Deployment):
    """The generator bug: every tenth query is computed and released without being charged."""

    _count = 0

    def serve(self, private, public=None, *, check=None):
        self._count += 1
        if self._count % 10:
            return super().serve(private, public, check=check)
        if check is not None:
            check()
        value, _ = private(self._rng)  # the defect: no charge, no restricted record
        return Answer(value, True, False)


_GEN = dict(
    n_members=3,
    sampling_rate=0.5,
    epsilon=8.0,
    delta=1e-5,
    query_budget=40,
    orders=tuple(range(2, 17)),
)


@register(
    "generator_skips_tenth_charge",
    "a deployment that releases every tenth private token without charging it",
    "released answers against the ledger's queries",
)
def _skips(defective: bool, seed: int, scale: str) -> dict:
    cls = _SkippingDeployment if defective else Deployment
    rng = child_rng(seed, "mutants/generator")
    p0 = rng.dirichlet(np.ones(8))
    pm = rng.dirichlet(np.ones(8), size=3)
    with tempfile.TemporaryDirectory() as d:
        dep = cls.create(Path(d) / "l.jsonl", _calibrated(**_GEN), seed=seed, fsync=False)
        released = 0
        for _ in range(30):
            answer = dep.serve(lambda g: (step(pm, p0, dep.calibration, g).token, {}))
            released += answer.private
        queries = read_ledger(dep.ledger.path).n_queries
        dep.close()
    return {
        "detected": released != queries,
        "released": released,
        "ledger_queries": queries,
        "evidence": f"{released} private answers released, {queries} charged",
    }


def run_mutants(
    scale: str = "quick",
    *,
    seed: int = 0,
    repetitions: int = 100,
    names: list[str] | None = None,
    progress=None,
) -> dict:
    """Every registered mutant and its sound twin; the twins' false alarms over ``repetitions``
    seeds (where cheap at this scale). Returns the public ``power.mutants`` section."""
    if scale not in _RUNS:
        raise ValueError(f"scale must be one of {sorted(_RUNS)}. Found {scale!r}.")
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's trial-noise chatter
    rows = {}
    for i, name in enumerate(names or list(MUTANTS)):
        m = MUTANTS[name]
        result = m.run(True, seed, scale)
        twin = m.run(False, seed, scale)
        reps = repetitions if m.cheap else 0
        alarms = sum(bool(m.run(False, seed + 1 + r, "test")["detected"]) for r in range(reps))
        rows[name] = {
            "defect": m.defect,
            "audit": m.audit,
            "detected": bool(result["detected"]),
            "evidence": result["evidence"],
            "twin_detected": bool(twin["detected"]),
            "twin_evidence": twin["evidence"],
            "twin_repetitions": reps,
            "twin_false_alarms": alarms,
            "twin_false_alarm_rate": alarms / reps if reps else None,
        }
        if progress is not None:
            progress(i + 1)
    detected = sum(r["detected"] for r in rows.values())
    return {
        "scale": scale,
        "seed": seed,
        "detected": detected,
        "total": len(rows),
        "all_detected": detected == len(rows),
        "twins_clean": not any(r["twin_detected"] for r in rows.values()),
        "mutants": rows,
    }

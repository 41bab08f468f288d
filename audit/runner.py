"""The audit of a trained run: signals once, then exact pairs, risk metrics and controls.

:func:`audit_models` receives loaded models (``reports/`` loads them and writes the files) and
returns two dicts: the public result (aggregates, bounds, controls, alarms) and the restricted
annex (which member was audited, per-order divergence sums, raw per-example scores), which derives
from private data and is not covered by the guarantee.

What this version audits:

* every PMixED mechanism (certified AR, certified RO, reference): the exact pair over C teacher-
  forced held-out contexts (AR: the member farthest from the public model dropped; RO: that member
  replaced by the public model, a legitimate neighbour since the analysis covers any replacement),
  compared with the charged cost, ε_pair from optimistic PLDs, and a χ² conformance test of the
  real sampler on the first context;
* the public model, the non-private fine-tune and DP-SGD: loss and reference-calibrated attacks on
  training blocks against held-out blocks: risk metrics only. Train/held-out membership is not an
  independent draw of the mechanism per trial, so no ε bound is derived from it;
* the PMixED black-box game through the real ``PrivateGenerator`` against the ``replace_one``
  deployment, with a poisoned canary member (:mod:`audit.game`);
* DP-SGD with Poisson(½)-included canaries and the non-private positive control on the same
  canaries (:func:`audit.dpsgd.canary_audit`): the one-run bound, AUC and TPR at low FPR;
* controls C1-C3 on synthetic arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from audit.attacks import loss, reference_calibrated
from audit.controls import alarms, identical_worlds, non_private, randomized_response
from audit.dpsgd import CanaryPlan, canary_audit
from audit.exact import conformance, exact_pair_audit
from audit.game import GamePlan, pmixed_game
from audit.risk import risk_metrics
from audit.signals import block_logprobs, pmixed_contexts
from pmixed.privacy import Calibration

__all__ = ["AUDIT_SCHEMA", "AuditPlan", "audit_models"]

AUDIT_SCHEMA = 1
STATEMENT = "audits give lower bounds and cannot certify differential privacy"


@dataclass(frozen=True)
class AuditPlan:
    """Pre-registered sizes, fixed before any signal is computed."""

    n_contexts: int = 256
    mia_blocks: int = 256
    conformance_samples: int = 2000
    bootstrap: int = 1000
    eta: float = 0.05
    seed: int = 0
    canaries: CanaryPlan = field(default_factory=CanaryPlan)
    game: GamePlan = field(default_factory=GamePlan)


def _farthest_member(lp0: np.ndarray, lps: np.ndarray) -> int:
    """The member with the largest mean KL(p_i ‖ p0) over the contexts (data-dependent: restricted)."""
    p = np.exp(lps)  # [C, N, V]
    with np.errstate(invalid="ignore"):
        kl = np.where(p > 0, p * (lps - lp0[:, None, :]), 0.0).sum(-1)
    return int(np.argmax(kl.mean(0)))


def _pmixed(lp0, lps, cal: Calibration, claim: Mapping, plan: AuditPlan, member: int):
    replacement = None if cal.config.relation == "add_remove" else lp0
    pair = exact_pair_audit(lps, lp0, cal, member=member, replacement=replacement)
    conf = conformance(lps[0], lp0[0], cal, n_samples=plan.conformance_samples,
                       rng=np.random.default_rng(plan.seed))  # fmt: skip
    eps_ub = claim["epsilon"]
    found = alarms({"exact_pair": pair.epsilon_pair}, eps_ub)
    if pair.alarm:
        found.append(
            {
                "bound": "exact_per_query_rdp",
                "worst_ratio": pair.worst_ratio,
                "message": f"exact per-query RDP is {pair.worst_ratio:.3g}x the charged cost",
            }
        )
    public = {
        "relation": cal.config.relation, "unit": claim["unit"], "delta": cal.delta,
        "claim": {"epsilon_ub": eps_ub, "accountant": claim["accountant"],
                  "certified": claim["certified"], "status": cal.status,
                  "queries": cal.config.query_budget},
        "exact_pair": {"pair": "member dropped" if replacement is None
                       else "member replaced by the public model",
                       "contexts": pair.n_queries, "epsilon_pair": pair.epsilon_pair,
                       "delta": pair.delta, "worst_ratio_exact_over_charged": pair.worst_ratio,
                       "comparable": pair.comparable, "pld_rounding": "optimistic",
                       "alarm": pair.alarm},
        "ratios": {"epsilon_pair_over_ub": pair.epsilon_pair / eps_ub if eps_ub else None},
        "conformance": conf,
        "conformance_passed": conf["token_p_value"] > 1e-3 and conf["subset_size_p_value"] > 1e-3
        and (cal.config.reference_sampler != "poisson" or conf["duplicate_members"] == 0),
        "alarms": found,
    }  # fmt: skip
    if not cal.certified:
        public["note"] = "UNCERTIFIED reference accounting: the claim is the paper code's, not ours"
    restricted = {"member": member, "summed_forward": pair.summed_forward.tolist(),
                  "summed_backward": pair.summed_backward.tolist(),
                  "per_query_max": pair.per_query.max(axis=0).tolist(),
                  "orders": list(pair.orders)}  # fmt: skip
    return public, restricted


def _mia(model, adapter, train, held, reference: tuple[np.ndarray, np.ndarray], plan: AuditPlan):
    """Risk metrics of ``adapter`` on training against held-out blocks; ``reference`` holds the
    public model's per-token log-probs on the same blocks (computed once for every adapter)."""
    ref_in, ref_out = reference
    if adapter is None:
        lp_in, lp_out = ref_in, ref_out
    else:
        lp_in = block_logprobs(model, adapter, train)
        lp_out = block_logprobs(model, adapter, held)
    scores = {"loss": (loss(lp_in), loss(lp_out)),
              "reference": (reference_calibrated(lp_in, ref_in),
                            reference_calibrated(lp_out, ref_out))}  # fmt: skip
    public = {name: risk_metrics(a, b, seed=plan.seed, resamples=plan.bootstrap)
              for name, (a, b) in scores.items()}  # fmt: skip
    if adapter is None:  # the reference is the target itself: the score is identically 0
        public.pop("reference")
    restricted = {name: {"in": a.tolist(), "out": b.tolist()} for name, (a, b) in scores.items()}
    return public, restricted


def audit_models(
    model: torch.nn.Module,
    members: list[str],
    train_blocks: torch.Tensor,
    held_blocks: torch.Tensor,
    calibrations: Mapping[str, Calibration],
    claims: Mapping[str, Mapping],
    plan: AuditPlan,
    progress: Callable[[str, int], Callable[[int], None]],
    *,
    dpsgd: Mapping | None = None,
    tokenizer=None,
) -> tuple[dict, dict]:
    """(public audit result, restricted annex) for one trained run.

    ``dpsgd``: the demo's DP-SGD settings (``lora``, ``epsilon``, ``delta``, ``batch_size``, ``lr``,
    ``max_grad_norm``, ``vocab``) to run the canary audit with; None skips it. ``tokenizer`` (with
    ``dpsgd`` for its LoRA settings) runs the PMixED game against the ``replace_one`` deployment.
    """
    bar = progress("audit: signals", 1)
    lp0, lps = pmixed_contexts(model, members, held_blocks, plan.n_contexts)
    bar(1)
    member = _farthest_member(lp0, lps)
    mechanisms, restricted = {}, {"schema": AUDIT_SCHEMA}
    bar = progress("audit: PMixED exact pairs", len(calibrations))
    for i, (name, cal) in enumerate(calibrations.items()):
        mechanisms[name], restricted[name] = _pmixed(lp0, lps, cal, claims[name], plan, member)
        bar(i + 1)
    ro = "pmixed_certified_replace_one"
    if tokenizer is not None and dpsgd is not None and ro in calibrations:
        game, restricted["game"] = pmixed_game(model, members, tokenizer, calibrations[ro],
                                               plan.game, seed=plan.seed, member=member,
                                               lora=dpsgd["lora"], progress=progress)  # fmt: skip
        mechanisms[ro]["game"] = game
        bounds = {f"game_{e['score']}": e["epsilon_lb"] for e in game["empirical"]}
        mechanisms[ro]["alarms"] += alarms({**bounds, "game_pair": game["epsilon_pair"]},
                                           mechanisms[ro]["claim"]["epsilon_ub"])  # fmt: skip
    n = min(plan.mia_blocks, len(train_blocks), len(held_blocks))
    reference = (block_logprobs(model, None, train_blocks[:n]),
                 block_logprobs(model, None, held_blocks[:n]))  # fmt: skip
    bar = progress("audit: membership inference", 3)
    for i, (name, adapter) in enumerate((("public", None), ("finetuned", "finetuned"),
                                         ("dpsgd", "dpsgd"))):  # fmt: skip
        risk, raw = _mia(model, adapter, train_blocks[:n], held_blocks[:n], reference, plan)
        claim = claims[name]
        mechanisms[name] = {
            "relation": claim["relation"], "unit": claim["unit"], "delta": claim["delta"],
            "claim": {"epsilon_ub": claim["epsilon"], "accountant": claim["accountant"],
                      "certified": claim["certified"]},
            "risk": risk, "members": "training blocks", "non_members": "held-out users' blocks",
            "empirical": [],
            "note": "risk metrics only: train/held-out membership is one draw of the training "
                    "run, not independent trials, so no epsilon lower bound is derived from it",
        }  # fmt: skip
        restricted[name] = raw
        bar(i + 1)
    controls = [identical_worlds(1000, delta=1e-5, seed=plan.seed),
                randomized_response(1.0, 10_000, delta=1e-5, seed=plan.seed),
                non_private(1000, delta=1e-5, seed=plan.seed)]  # fmt: skip
    if dpsgd is not None:
        canary, restricted["canaries"] = canary_audit(
            model, train_blocks, plan.canaries, seed=plan.seed, progress=progress, **dpsgd
        )
        target, control = canary["audit-dpsgd"], canary["audit-finetuned"]
        found = alarms({"one_run": target["one_run"]["epsilon_lb"]},
                       target["claim"]["epsilon_ub"])  # fmt: skip
        mechanisms["dpsgd"]["empirical"].append({"target": "DP-SGD run on the canary audit set",
                                                 **target, "design": canary["design"]})  # fmt: skip
        mechanisms["dpsgd"]["alarms"] = found
        mechanisms["finetuned"]["empirical"].append(
            {"target": "non-private positive control", **control, "design": canary["design"]}
        )
        lb = control["one_run"]["epsilon_lb"]
        controls.append(
            {
                "id": "C3-lm",
                "name": "non-private fine-tune with canaries (one-run)",
                "expected": "epsilon_lb >= 1",
                "epsilon_lb": lb,
                "passed": lb >= 1.0,
            }
        )
    all_alarms = [dict(a, mechanism=k) for k, m in mechanisms.items() for a in m.get("alarms", [])]
    public = {"schema": AUDIT_SCHEMA, "statement": STATEMENT,
              "plan": {**asdict(plan), "member_choice": "largest mean KL from the public model"},
              "mechanisms": mechanisms, "controls": controls,
              "controls_passed": all(c["passed"] for c in controls),
              "alarms": all_alarms}  # fmt: skip
    return public, restricted

"""The audit of a trained run: signals once, then exact pairs, games, risk metrics and controls.

:func:`audit_models` receives loaded models (``reports/`` loads them and writes the files) and
returns two dicts: the public result (aggregates, bounds, controls, alarms) and the restricted
annex (which member was audited, the canary token, per-order divergence sums, raw per-example
scores), which derives from private data and is not covered by the guarantee.

What this version audits:

* the canary: member j (the one farthest from the public model over the held-out contexts) is
  retrained on its partition plus a canary user's blocks with the deployment's own recipe
  (:func:`audit.game.plant_canary`);
* every PMixED mechanism (certified AR, certified RO, reference): the exact pair over the canary
  context and C teacher-forced held-out contexts (AR: the canary member dropped; RO: the canary
  member against the member retrained without its canaries, i.e. the deployed one), compared with
  the charged cost, ε_pair from optimistic PLDs, and a χ² conformance test of the real sampler;
  the same pair with a poisoned member (its partition holds the canary user's records only) and
  the worst cases of :mod:`audit.worstcase` (query control, an optimised member);
* the PMixED black-box game and the exposure of random secrets through the real
  ``PrivateGenerator`` against the ``replace_one`` deployment (:mod:`audit.game`,
  :mod:`audit.exposure`), with the non-private release of the same member as exposure control;
* the public model, the non-private fine-tune and DP-SGD: loss and reference-calibrated attacks on
  training blocks against held-out blocks: risk metrics only. Train/held-out membership is not an
  independent draw of the mechanism per trial, so no ε bound is derived from it;
* DP-SGD with Poisson(½)-included canaries and the non-private positive control on the same
  canaries, scored by the reference attack and offline LiRA with shadow models
  (:func:`audit.dpsgd.canary_audit`): the one-run bound, AUC and TPR at low FPR;
* controls C1-C3 on synthetic arrays, C3-lm and C3-exposure on the real models.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from audit.attacks import loss, reference_calibrated
from audit.canaries import MemberRecipe, drop_adapter
from audit.controls import alarms, identical_worlds, non_private, randomized_response
from audit.dpsgd import CanaryPlan, canary_audit
from audit.exact import conformance, exact_pair_audit
from audit.exposure import ExposurePlan, exposure_audit, synthetic_control
from audit.game import GamePlan, plant_canary, pmixed_game, poison_member
from audit.risk import risk_metrics
from audit.signals import block_logprobs, pmixed_contexts
from audit.worstcase import pmixed_worst_case
from pmixed.privacy import Calibration

__all__ = ["AUDIT_SCHEMA", "AuditPlan", "audit_models"]

AUDIT_SCHEMA = 6
STATEMENT = "audits give lower bounds and cannot certify differential privacy"


@dataclass(frozen=True)
class AuditPlan:
    """Pre-registered sizes, fixed before any signal is computed."""

    n_contexts: int = 256
    mia_blocks: int = 256
    conformance_samples: int = 1000
    bootstrap: int = 1000
    eta: float = 0.05
    seed: int = 0
    worst_case_evaluations: int = 120
    canaries: CanaryPlan = field(default_factory=CanaryPlan)
    game: GamePlan = field(default_factory=GamePlan)
    exposure: ExposurePlan = field(default_factory=ExposurePlan)


def _farthest_member(lp0: np.ndarray, lps: np.ndarray) -> int:
    """The member with the largest mean KL(p_i ‖ p0) over the contexts (data-dependent: restricted)."""
    p = np.exp(lps)  # [C, N, V]
    with np.errstate(invalid="ignore"):
        kl = np.where(p > 0, p * (lps - lp0[:, None, :]), 0.0).sum(-1)
    return int(np.argmax(kl.mean(0)))


def _poisoned_pair(lp0, lps, cal: Calibration, member: int, poisoned: np.ndarray, eps_ub):
    """Threat model (b): the exact pair with the member trained on canary records only."""
    world = lps.copy()
    world[:, member] = poisoned
    replacement = None if cal.config.relation == "add_remove" else lps[:, member]
    pair = exact_pair_audit(world, lp0, cal, member=member, replacement=replacement)
    return {
        "pair": "the member trained on the canary user's records only, against "
        + ("its absence" if replacement is None else "the deployed member"),
        "contexts": pair.n_queries,
        "epsilon_pair": pair.epsilon_pair,
        "ratio_to_claim": pair.epsilon_pair / eps_ub if eps_ub else None,
        "exact_over_charged": pair.worst_ratio if pair.comparable else None,
        "alarm": pair.alarm,
    }


def _audit_pmixed(
    lp0,
    lps,
    cal: Calibration,
    claim: Mapping,
    plan: AuditPlan,
    member: int,
    canary: np.ndarray,
    poisoned: np.ndarray,
):
    """Exact pair: D has ``canary`` ``[C, V]`` as member ``member``; D' drops it (AR) or has the
    deployed member (RO); the same with the ``poisoned`` member (canary records only). The χ²
    conformance runs on the deployed ensemble at the first context."""
    world = lps.copy()
    world[:, member] = canary
    replacement = None if cal.config.relation == "add_remove" else lps[:, member]
    pair = exact_pair_audit(world, lp0, cal, member=member, replacement=replacement)
    conf = conformance(
        lps[-1],
        lp0[-1],
        cal,
        n_samples=plan.conformance_samples,
        rng=np.random.default_rng(plan.seed),
    )
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
    worst, worst_restricted = pmixed_worst_case(
        lp0,
        world,
        cal,
        member=member,
        replacement=replacement,
        pair=pair,
        rng=np.random.default_rng(plan.seed),
        # reference mode mollifies every member at every subset size: a quarter of the budget
        evaluations=plan.worst_case_evaluations // (1 if cal.beta is not None else 4),
    )
    for case in ("query_control", "optimised_member"):
        worst[case]["ratio_to_claim"] = worst[case]["epsilon_pair"] / eps_ub if eps_ub else None
    if worst["optimised_member"]["alarm"]:
        found.append(
            {
                "bound": "worst_case_member",
                "worst_ratio": worst["optimised_member"]["ratio"],
                "message": "an optimised member exceeds the charged cost "
                f"{worst['optimised_member']['ratio']:.3g}x",
            }
        )
    worst["poisoned_member"] = poisoned_pair = _poisoned_pair(
        lp0, lps, cal, member, poisoned, eps_ub
    )
    if poisoned_pair["alarm"]:
        ratio = poisoned_pair["exact_over_charged"]
        found.append(
            {
                "bound": "poisoned_member",
                "worst_ratio": ratio,
                "message": "the member "
                f"trained on canary records only exceeds the charged cost {ratio:.3g}x",
            }
        )
    if eps_ub is not None and worst["query_control"]["epsilon_pair"] > eps_ub:
        found.append(
            {
                "bound": "query_control_epsilon_pair",
                "message": "the repeated worst context's exact pair exceeds the claim",
            }
        )
    public = {
        "worst_case": worst,
        "relation": cal.config.relation,
        "unit": claim["unit"],
        "delta": cal.delta,
        "claim": {
            "epsilon_ub": eps_ub,
            "accountant": claim["accountant"],
            "certified": claim["certified"],
            "status": cal.status,
            "queries": cal.config.query_budget,
        },
        "exact_pair": {
            "pair": "canary member dropped"
            if replacement is None
            else "canary member vs the member retrained without its canaries",
            "contexts_kind": "the canary prompt, then held-out teacher-forced contexts",
            "contexts": pair.n_queries,
            "epsilon_pair": pair.epsilon_pair,
            "delta": pair.delta,
            "worst_ratio_exact_over_charged": pair.worst_ratio,
            "comparable": pair.comparable,
            "pld_rounding": "optimistic",
            "alarm": pair.alarm,
        },
        "ratios": {"epsilon_pair_over_ub": pair.epsilon_pair / eps_ub if eps_ub else None},
        "empirical": [],
        "empirical_note": "the black-box game and exposure run against the replace_one "
        "deployment; the exact pair bounds any attack on these contexts",
        "conformance": conf,
        "conformance_passed": conf["token_p_value"] > 1e-3
        and conf["subset_size_p_value"] > 1e-3
        and (cal.config.reference_sampler != "poisson" or conf["duplicate_members"] == 0),
        "alarms": found,
    }
    if not cal.certified:
        public["note"] = "UNCERTIFIED reference accounting: the claim is the paper code's, not ours"
    restricted = {
        "member": member,
        "worst_case": worst_restricted,
        "summed_forward": pair.summed_forward.tolist(),
        "summed_backward": pair.summed_backward.tolist(),
        "per_query_max": pair.per_query.max(axis=0).tolist(),
        "orders": list(pair.orders),
    }
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
    scores = {
        "loss": (loss(lp_in), loss(lp_out)),
        "reference": (reference_calibrated(lp_in, ref_in), reference_calibrated(lp_out, ref_out)),
    }
    public = {
        name: risk_metrics(a, b, seed=plan.seed, resamples=plan.bootstrap)
        for name, (a, b) in scores.items()
    }
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
    partitions: Sequence[torch.Tensor],
    recipe: MemberRecipe,
    tokenizer,
    dpsgd: Mapping | None = None,
    base: str | os.PathLike | None = None,
    executor: object | None = None,
) -> tuple[dict, dict]:
    """(public audit result, restricted annex) for one trained run.

    ``partitions``: each member's training blocks, and ``recipe`` how the members were trained (the
    canary member is retrained with them). ``dpsgd``: the demo's DP-SGD settings (``lora``,
    ``epsilon``, ``delta``, ``batch_size``, ``lr``, ``max_grad_norm``, ``vocab``) for the canary
    audit, whose training runs load the public model from the folder ``base`` and run on
    ``executor`` (default local); None skips it.
    """
    if dpsgd is not None and base is None:
        raise ValueError("base (the public model's folder) is needed for the DP-SGD canary audit.")
    if len(partitions) != len(members):
        raise ValueError(f"partitions must hold one tensor per member ({len(members)}).")
    budget = min(c.config.query_budget for c in calibrations.values())
    if plan.n_contexts + 1 > budget:  # the pairs compose the canary context and n_contexts
        raise ValueError(
            f"n_contexts must be <= query_budget - 1 = {budget - 1}. Found {plan.n_contexts}."
        )
    bar = progress("audit: signals", 1)
    lp0, lps = pmixed_contexts(model, members, held_blocks, plan.n_contexts)
    bar(1)
    member = _farthest_member(lp0, lps)
    ro = "pmixed_certified_replace_one"
    chooser = calibrations.get(ro) or next(c for c in calibrations.values() if c.certified)
    canary = plant_canary(
        model,
        members,
        tokenizer,
        chooser,
        plan.game,
        member=member,
        partition=partitions[member],
        recipe=recipe,
    )
    lc = pmixed_contexts(model, [canary.adapter], held_blocks, plan.n_contexts)[1][:, 0]
    bar = progress("audit: poisoned member", 1)
    poison_at_prompt = poison_member(model, canary, partition=partitions[member], recipe=recipe)
    lpz = pmixed_contexts(model, ["poisoned-member"], held_blocks, plan.n_contexts)[1][:, 0]
    drop_adapter(model, "poisoned-member")
    bar(1)
    lp0 = np.concatenate([canary.logp_public[None], lp0])
    lps = np.concatenate([canary.logp_members[None], lps])
    lc = np.concatenate([canary.logp_canary[None], lc])
    lpz = np.concatenate([poison_at_prompt[None], lpz])
    mechanisms, restricted = {}, {"schema": AUDIT_SCHEMA, "member": member}
    bar = progress("audit: PMixED exact pairs", len(calibrations))
    for i, (name, cal) in enumerate(calibrations.items()):
        mechanisms[name], restricted[name] = _audit_pmixed(
            lp0, lps, cal, claims[name], plan, member, lc, lpz
        )
        bar(i + 1)
    if ro in calibrations:
        cal = calibrations[ro]
        game, restricted["game"] = pmixed_game(
            model, members, tokenizer, cal, plan.game, canary, seed=plan.seed, progress=progress
        )
        expo, restricted["exposure"] = exposure_audit(
            model,
            members,
            tokenizer,
            cal,
            plan.exposure,
            seed=plan.seed,
            member=member,
            partition=partitions[member],
            recipe=recipe,
            progress=progress,
        )
        mechanisms[ro]["game"], mechanisms[ro]["exposure"] = game, expo
        mechanisms[ro]["empirical"] = [
            *(
                {"method": "clopper_pearson", "target": f"black-box game ({e['score']} score)", **e}
                for e in game["empirical"]
            ),
            {
                "method": "exposure_rank",
                "target": "random secrets through PMixED",
                **expo["pmixed"],
            },
        ]
        bounds = {f"game_{e['score']}": e["epsilon_lb"] for e in game["empirical"]}
        mechanisms[ro]["alarms"] += alarms(
            {**bounds, "game_pair": game["epsilon_pair"], "exposure": expo["pmixed"]["epsilon_lb"]},
            mechanisms[ro]["claim"]["epsilon_ub"],
        )
    drop_adapter(model, canary.adapter)
    n = min(plan.mia_blocks, len(train_blocks), len(held_blocks))
    reference = (
        block_logprobs(model, None, train_blocks[:n]),
        block_logprobs(model, None, held_blocks[:n]),
    )
    bar = progress("audit: membership inference", 3)
    for i, (name, adapter) in enumerate(
        (("public", None), ("finetuned", "finetuned"), ("dpsgd", "dpsgd"))
    ):
        risk, raw = _mia(model, adapter, train_blocks[:n], held_blocks[:n], reference, plan)
        claim = claims[name]
        mechanisms[name] = {
            "relation": claim["relation"],
            "unit": claim["unit"],
            "delta": claim["delta"],
            "claim": {
                "epsilon_ub": claim["epsilon"],
                "accountant": claim["accountant"],
                "certified": claim["certified"],
            },
            "risk": risk,
            "members": "training blocks",
            "non_members": "held-out users' blocks",
            "empirical": [],
            "note": "risk metrics only: train/held-out membership is one draw of the training "
            "run, not independent trials, so no epsilon lower bound is derived from it",
        }
        restricted[name] = raw
        bar(i + 1)
    controls = [
        identical_worlds(1000, delta=1e-5, seed=plan.seed),
        randomized_response(1.0, 10_000, delta=1e-5, seed=plan.seed),
        non_private(1000, delta=1e-5, seed=plan.seed),
    ]
    if dpsgd is not None:
        canary, restricted["canaries"] = canary_audit(
            model,
            train_blocks,
            plan.canaries,
            seed=plan.seed,
            progress=progress,
            base=base,
            executor=executor,
            **dpsgd,
        )
        target, control = canary["audit-dpsgd"], canary["audit-finetuned"]
        found = alarms({"one_run": target["one_run"]["epsilon_lb"]}, target["claim"]["epsilon_ub"])
        mechanisms["dpsgd"]["empirical"].append(
            {"target": "DP-SGD run on the canary audit set", **target, "design": canary["design"]}
        )
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
    controls.append(synthetic_control(plan.exposure, delta=1e-5, seed=plan.seed))
    all_alarms = [dict(a, mechanism=k) for k, m in mechanisms.items() for a in m.get("alarms", [])]
    public = {
        "schema": AUDIT_SCHEMA,
        "statement": STATEMENT,
        "plan": {**asdict(plan), "member_choice": "largest mean KL from the public model"},
        "mechanisms": mechanisms,
        "controls": controls,
        "controls_passed": all(c["passed"] for c in controls),
        "alarms": all_alarms,
    }
    return public, restricted

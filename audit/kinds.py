"""The two registered audit kinds: ``pmixed`` (a deployment of the ensemble) and ``lm`` (one model).

* ``pmixed``: the exact pair over the canary context and C teacher-forced held-out contexts (AR:
  the canary member dropped; RO: the canary member against the member retrained without its
  canaries, i.e. the deployed one), compared with the charged cost, ε_pair from optimistic PLDs,
  a χ² conformance test of the real sampler, the same pair with a poisoned member and the worst
  cases of :mod:`audit.worstcase` (query control, an optimised member at the real contexts, and
  the configuration's worst case on a public toy); a ``black_box`` target
  also plays the black-box game and the exposure audit through the real ``PrivateGenerator``.
* ``lm``: the plan's attacks (``AuditPlan.attacks``, resolved through ``ATTACKS``) on training
  against held-out blocks: risk metrics only. Train/held-out membership is not an independent draw
  of the mechanism per trial, so no ε bound is derived from it. A target with a canary role gets
  the DP-SGD canary audit's one-run result (the DP-SGD run, or the non-private positive control).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from audit.attacks import ATTACKS
from audit.canaries import child_rng
from audit.context import AuditContext, AuditPlan
from audit.controls import alarms
from audit.exact import conformance, exact_pair_audit
from audit.exposure import exposure_audit
from audit.game import pmixed_game
from audit.results import PMixEDAudit, RiskAudit
from audit.risk import risk_metrics
from audit.signals import block_logprobs
from audit.targets import AuditTarget, register_kind
from audit.worstcase import configuration_worst_case, pmixed_worst_case
from pmixed.executor import Job

__all__ = ["audit_lm", "audit_pmixed", "exact_evidence"]


def _poisoned_pair(lp0, lps, cal, member: int, poisoned: np.ndarray, eps_ub):
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


def _alarm(bound: str, message: str, ratio: float | None = None) -> dict:
    return {"bound": bound, **({} if ratio is None else {"worst_ratio": ratio}), "message": message}


def _start_pmixed(target: AuditTarget, ctx: AuditContext) -> None:
    """Submits the target's exact evidence (pure NumPy on the shared signals) as one job."""
    s = ctx.ensemble
    args = (target, ctx.plan, s.logp_public, s.logp_members, s.member, s.logp_canary)
    ctx.submit(f"exact/{target.name}", [Job(exact_evidence, (*args, s.logp_poisoned))])


@register_kind("pmixed", calibrated=True, start=_start_pmixed)
def audit_pmixed(target: AuditTarget, ctx: AuditContext) -> tuple[PMixEDAudit, dict]:
    """The exact evidence (:func:`exact_evidence`, started by the kind's ``start`` hook), then
    for a ``black_box`` target the game and the exposure audit through the real generator."""
    bar = ctx.progress(f"audit: exact pair, {target.name}", 1)
    [(result, restricted)] = ctx.collect(f"exact/{target.name}")
    bar(1)
    if target.black_box:
        result = _black_box(target, ctx, result)
    return result, restricted


def exact_evidence(
    target: AuditTarget,
    plan: AuditPlan,
    lp0: np.ndarray,
    lps: np.ndarray,
    member: int,
    logp_canary: np.ndarray,
    logp_poisoned: np.ndarray,
) -> tuple[PMixEDAudit, dict]:
    """(public, restricted) exact evidence for a PMixED target from the signals
    (:class:`audit.context.EnsembleSignals`' arrays): exact pair, D with the canary member as
    the audited member and D' without it (AR) or with the deployed member (RO); the same with the
    poisoned member; the χ² conformance on the deployed ensemble at the last context; the worst
    cases. A job: it reads no model and no shared state."""
    cal = target.calibration
    world = lps.copy()
    world[:, member] = logp_canary
    replacement = None if cal.config.relation == "add_remove" else lps[:, member]
    pair = exact_pair_audit(world, lp0, cal, member=member, replacement=replacement)
    conf = conformance(
        lps[-1],
        lp0[-1],
        cal,
        n_samples=plan.conformance_samples,
        rng=np.random.default_rng(plan.seed),
    )
    eps_ub = target.claim.epsilon_ub
    found = alarms({"exact_pair": pair.epsilon_pair}, eps_ub)
    if pair.alarm:
        found.append(
            _alarm(
                "exact_per_query_rdp",
                f"exact per-query RDP is {pair.worst_ratio:.3g}x the charged cost",
                pair.worst_ratio,
            )
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
        ratio = worst["optimised_member"]["ratio"]
        found.append(
            _alarm(
                "worst_case_member",
                f"an optimised member exceeds the charged cost {ratio:.3g}x",
                ratio,
            )
        )
    worst["poisoned_member"] = poisoned = _poisoned_pair(
        lp0, lps, cal, member, logp_poisoned, eps_ub
    )
    if poisoned["alarm"]:
        ratio = poisoned["exact_over_charged"]
        found.append(
            _alarm(
                "poisoned_member",
                f"the member trained on canary records only exceeds the charged cost {ratio:.3g}x",
                ratio,
            )
        )
    # (d) the configuration: p0, the other members and the member all chosen on a public toy
    starts = plan.configuration_starts
    worst["configuration"] = conf_wc = configuration_worst_case(
        cal,
        rng=child_rng(plan.seed, "audit/configuration"),
        starts=starts,
        refine=max(1, starts // 30),
        iterations=2 * starts,
    )
    if conf_wc["alarm"]:
        found.append(
            _alarm(
                "configuration_worst_case",
                "toy models chosen by an optimiser exceed the charged cost "
                f"{conf_wc['ratio']:.3g}x at this configuration (any deployed models)",
                conf_wc["ratio"],
            )
        )
    if eps_ub is not None and worst["query_control"]["epsilon_pair"] > eps_ub:
        found.append(
            _alarm(
                "query_control_epsilon_pair",
                "the repeated worst context's exact pair exceeds the claim",
            )
        )
    result = PMixEDAudit(
        claim=target.claim,
        status=cal.status,
        queries=cal.config.query_budget,
        relation=cal.config.relation,
        delta=cal.delta,
        worst_case=worst,
        exact_pair={
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
        conformance=conf,
        conformance_passed=conf["token_p_value"] > 1e-3
        and conf["subset_size_p_value"] > 1e-3
        and (cal.config.reference_sampler != "poisson" or conf["duplicate_members"] == 0),
        alarms=tuple(found),
        empirical_note="the black-box game and exposure run against the replace_one "
        "deployment; the exact pair bounds any attack on these contexts",
        note=None
        if cal.certified
        else "UNCERTIFIED reference accounting: the claim is the paper code's, not ours",
    )
    restricted = {
        "member": member,
        "worst_case": worst_restricted,
        "summed_forward": pair.summed_forward.tolist(),
        "summed_backward": pair.summed_backward.tolist(),
        "per_query_max": pair.per_query.max(axis=0).tolist(),
        "orders": list(pair.orders),
    }
    return result, restricted


def _black_box(target: AuditTarget, ctx: AuditContext, result: PMixEDAudit) -> PMixEDAudit:
    """The game and the exposure audit through the real generator, added to ``result``."""
    cal, plan, s = target.calibration, ctx.plan, ctx.ensemble
    members, model, tok = list(s.members), ctx.model, ctx.tokenizer
    game, ctx.restricted["game"] = pmixed_game(
        model, members, tok, cal, plan.game, s.canary, seed=plan.seed, progress=ctx.progress
    )
    expo, ctx.restricted["exposure"] = exposure_audit(
        model,
        members,
        tok,
        cal,
        plan.exposure,
        seed=plan.seed,
        member=s.member,
        partition=ctx.partitions[s.member],
        recipe=ctx.recipe,
        progress=ctx.progress,
    )
    empirical = (
        *(
            {"method": "clopper_pearson", "target": f"black-box game ({e['score']} score)", **e}
            for e in game["empirical"]
        ),
        {"method": "exposure_rank", "target": "random secrets through PMixED", **expo["pmixed"]},
    )
    bounds = {f"game_{e['score']}": e["epsilon_lb"] for e in game["empirical"]}
    found = alarms(
        {**bounds, "game_pair": game["epsilon_pair"], "exposure": expo["pmixed"]["epsilon_lb"]},
        target.claim.epsilon_ub,
    )
    return replace(
        result, empirical=empirical, alarms=(*result.alarms, *found), game=game, exposure=expo
    )


@register_kind("lm", calibrated=False)
def audit_lm(target: AuditTarget, ctx: AuditContext) -> tuple[RiskAudit, dict]:
    """Risk metrics of the plan's attacks on ``target.model`` (an adapter, None: the base model)
    on training against held-out blocks; ``reference`` is the public model's per-token log-probs
    on the same blocks, computed once for every target."""
    plan = ctx.plan
    bar = ctx.progress(f"audit: membership inference, {target.name}", 1)
    train, held = ctx.membership_blocks
    ref_in, ref_out = ctx.reference
    if target.model is None:
        lp_in, lp_out = ref_in, ref_out
    else:
        lp_in = block_logprobs(ctx.model, target.model, train)
        lp_out = block_logprobs(ctx.model, target.model, held)
    scores = {}
    for name in plan.attacks:
        attack = ATTACKS[name]
        if target.model is None and "reference" in attack.needs:
            continue  # the reference is the target itself: the score is identically 0
        texts = ctx.texts if "texts" in attack.needs else ([], [])
        scores[name] = tuple(
            attack.score(lp, {"reference": ref, "texts": tx})
            for lp, ref, tx in ((lp_in, ref_in, texts[0]), (lp_out, ref_out, texts[1]))
        )
    bar(1)
    risk = {
        name: risk_metrics(a, b, seed=plan.seed, resamples=plan.bootstrap)
        for name, (a, b) in scores.items()
    }
    restricted = {name: {"in": a.tolist(), "out": b.tolist()} for name, (a, b) in scores.items()}
    empirical, found = (), None
    if target.canaries is not None and ctx.canary_audit is not None:
        canary = ctx.canary_audit
        if target.canaries == "dpsgd":
            run = canary["audit-dpsgd"]
            empirical = (
                {"target": "DP-SGD run on the canary audit set", **run, "design": canary["design"]},
            )
            found = tuple(
                alarms({"one_run": run["one_run"]["epsilon_lb"]}, run["claim"]["epsilon_ub"])
            )
        else:
            run = canary["audit-finetuned"]
            empirical = (
                {"target": "non-private positive control", **run, "design": canary["design"]},
            )
    result = RiskAudit(
        claim=target.claim,
        risk=risk,
        note="risk metrics only: train/held-out membership is one draw of the training "
        "run, not independent trials, so no epsilon lower bound is derived from it",
        empirical=empirical,
        alarms=found,
    )
    return result, restricted

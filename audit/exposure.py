"""Exposure of random-secret canaries in PMixED, with an exact null (AUDIT.md §4, §5.3, §6.3).

Format: the public prompt ``EXPOSURE_PROMPT`` followed by a one-token secret. The secret space R is
every token whose public probability after the prompt lies in a band (decided from the public model
alone). Each trial is independent: a fresh secret s and K fresh references, uniform on R (with
replacement); member j retrained on its partition plus a canary user's blocks carrying s; a fresh
``replace_one`` deployment (own ledger, budget and seed) answers the prompt T times with one token
each. The attacker counts each candidate among the released tokens and ranks s among
{s, r_1..r_K} (ties at random). Under D' (the deployed member, which never saw s) the rank is
uniform, so s ranks first with probability exactly 1/(K+1), and k first places in n trials give
ε ≥ ln((K+1)·(TPR_lo − δ)) (:func:`audit.bounds.exposure_epsilon`).

A PMixED query releases one token, so the secret is one token; the design's digit strings would
spread one secret over several queries without changing the argument.

Reported beside it: the same retrained member released without PMixED (λ = 1, no subsampling), T
tokens sampled from it directly: what the canary alone leaks. That depends on how well the recipe
memorises (quick-size members barely do), so the positive control of the exposure pipeline is
:func:`synthetic_control` (C3-exposure): a release that emits the secret with a known probability,
through the same counts, ranks and bound, which must give ε_lb ≥ 1.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from audit.attacks import exposure_rank
from audit.bounds import exposure_epsilon
from audit.canaries import (
    MemberRecipe,
    canary_block,
    child_rng,
    drop_adapter,
    retrain_with_canaries,
)
from audit.game import logprobs_at, play
from pmixed.models import EnsembleLM
from pmixed.privacy import Calibration

__all__ = ["EXPOSURE_PROMPT", "ExposurePlan", "exposure_audit", "secret_space", "synthetic_control"]

#: The fixed format's public prefix; the secret is the next token.
EXPOSURE_PROMPT = "The access code is"


@dataclass(frozen=True)
class ExposurePlan:
    """Pre-registered: independent trials, references per trial, queries per trial, R's band."""

    trials: int = 30
    references: int = 99
    queries: int = 32
    band: tuple[float, float] = (1e-6, 1e-2)
    copies_per_block: float = 1.0
    eta: float = 0.05


def secret_space(logp_public: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Token ids whose public probability after the prompt lies in ``band`` (public only)."""
    p0 = np.exp(np.asarray(logp_public, np.float64))
    space = np.flatnonzero((p0 >= band[0]) & (p0 <= band[1]))
    if space.size < 2:
        raise ValueError(f"fewer than 2 tokens have p0 in {band} after the exposure prompt.")
    return space


def _rank(tokens: np.ndarray, secret: int, refs: np.ndarray, rng: np.random.Generator) -> int:
    counts = np.bincount(tokens, minlength=int(max(secret, refs.max())) + 1)
    return exposure_rank(float(counts[secret]), counts[refs].astype(np.float64), rng)


def _summary(ranks: np.ndarray, plan: ExposurePlan, delta: float) -> dict:
    k = int((ranks == 1).sum())
    bound = exposure_epsilon(k, ranks.size, plan.references, delta=delta, eta=plan.eta)
    bits = math.log2(plan.references + 1) - np.log2(ranks)
    return {
        **bound.to_json(),
        "first_places": k,
        "trials": int(ranks.size),
        "mean_exposure_bits": float(bits.mean()),
        "max_exposure_bits": math.log2(plan.references + 1),
    }


def synthetic_control(
    plan: ExposurePlan, *, delta: float, seed: int, space: int = 1000, leak: float = 0.25
) -> dict:
    """C3-exposure: each of the T released tokens is the secret with probability ``leak``, else
    uniform on a space of ``space`` tokens; the same ranking and bound as the real audit."""
    rng = child_rng(seed, "controls/C3-exposure")
    ranks = []
    for _ in range(plan.trials):
        s, refs = int(rng.integers(space)), rng.integers(space, size=plan.references)
        tokens = np.where(
            rng.random(plan.queries) < leak, s, rng.integers(space, size=plan.queries)
        )
        ranks.append(_rank(tokens, s, refs, rng))
    result = _summary(np.array(ranks), plan, delta)
    return {
        "id": "C3-exposure",
        "name": f"release leaking the secret with probability {leak}",
        "expected": "epsilon_lb >= 1",
        "epsilon_lb": result["epsilon_lb"],
        "first_places": result["first_places"],
        "trials": result["trials"],
        "passed": result["epsilon_lb"] >= 1.0,
    }


def exposure_audit(
    model,
    members: list[str],
    tok,
    cal: Calibration,
    plan: ExposurePlan,
    *,
    seed: int,
    member: int,
    partition: torch.Tensor,
    recipe: MemberRecipe,
    progress,
) -> tuple[dict, dict]:
    """(public, restricted): exposure through the ``replace_one`` deployment ``cal``, and C3."""
    if plan.queries > cal.config.query_budget:
        raise ValueError(f"plan.queries must be <= query_budget={cal.config.query_budget}.")
    if plan.trials < 1 or plan.references < 1:
        raise ValueError(
            f"trials and references must be >= 1. Found {plan.trials}, {plan.references}."
        )
    prompt = tok(EXPOSURE_PROMPT)["input_ids"]
    space = secret_space(logprobs_at(model, prompt, ["__base__"])[0], plan.band)
    draws = child_rng(seed, "exposure/secrets")
    ties = child_rng(seed, "exposure/ties")
    control_rng = child_rng(seed, "exposure/control")
    deploy_rng = child_rng(seed, "exposure/deployments")
    copies = max(1, round(plan.copies_per_block * len(partition)))
    ranks, control, secrets = [], [], []
    bar = progress("audit: PMixED exposure", plan.trials)
    with tempfile.TemporaryDirectory() as d:
        for i in range(plan.trials):
            s = int(space[draws.integers(space.size)])
            refs = space[draws.integers(space.size, size=plan.references)]
            block = canary_block([*prompt, s], partition.shape[1])
            retrain_with_canaries(
                model, "exposure-member", member, partition, block, copies, recipe
            )
            world = [*members[:member], "exposure-member", *members[member + 1 :]]
            lm = EnsembleLM(model, world, tok.eos_token_id)
            tokens = play(lm, cal, prompt, plan.queries, int(deploy_rng.integers(2**31)), Path(d))
            ranks.append(_rank(tokens, s, refs, ties))
            p = np.exp(logprobs_at(model, prompt, ["exposure-member"])[0])
            direct = control_rng.choice(p.size, size=plan.queries, p=p / p.sum())
            control.append(_rank(direct, s, refs, ties))
            secrets.append(s)
            drop_adapter(model, "exposure-member")
            bar(i + 1)
    ranks, control = np.array(ranks), np.array(control)
    public = {
        "format": f"{EXPOSURE_PROMPT} <secret token>",
        "secret_space": {
            "size": int(space.size),
            "band_p0": list(plan.band),
            "rule": "tokens with public p0 after the prompt in the band",
        },
        "queries_per_trial": plan.queries,
        "references": plan.references,
        "canary_copies_per_partition_block": plan.copies_per_block,
        "score": "count of each candidate among the released tokens; rank 1 = most frequent",
        "pmixed": _summary(ranks, plan, cal.delta),
        "non_private_release": _summary(control, plan, cal.delta),
        "seed_paths": [
            "exposure/secrets",
            "exposure/ties",
            "exposure/control",
            "exposure/deployments",
        ],
    }
    restricted = {
        "member": member,
        "secrets": secrets,
        "ranks": ranks.tolist(),
        "control_ranks": control.tolist(),
        "copies": copies,
    }
    return public, restricted

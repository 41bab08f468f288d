"""PMixED's black-box distinguishing game through the real ``PrivateGenerator`` (AUDIT.md §3, §5.2).

The canary goes into ONE partition (:func:`plant_canary`): a canary user whose records are the
public context x followed by a rare target token y*, as many blocks as partition j already holds;
member j is retrained on its partition plus those blocks with the deployment's own recipe. Worlds:
D has that **canary member** in slot j; D' is the deployed ensemble, whose member j is the same
recipe on the partition without the canaries (bit-identical to a retrain without them). Changing
one partition's data changes one member, which is what ``replace_one`` bounds.
Each trial is a fresh deployment: its own ledger, budget and generator seed, T queries of the same
prompt x, one released token each. The attacker sees the T tokens and scores them by the count of
y* and by the exact log-likelihood ratio of the two worlds' released laws at x (Neyman–Pearson
optimal for this pair). Clopper–Pearson with a Bonferroni correction over every threshold turns
n trials per world into ε_lb; the exact pair (Rényi check and optimistic PLD over the T queries)
gives what the game could at best reveal.

y* is chosen before any training, from the deployed models at x only: among tokens with p0(y*|x) in
a band, the one where a member near one-hot on y* would give the largest exact per-query divergence
at the planned order (restricted: the choice reads the members).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from audit.attacks import pmixed_count, pmixed_llr
from audit.bounds import BonferroniAll, empirical_epsilon
from audit.canaries import MemberRecipe, canary_block, child_rng, retrain_with_canaries
from audit.exact import exact_pair_audit, pair_epsilon
from audit.risk import risk_metrics
from pmixed.deployment import Deployment
from pmixed.generator import PrivateGenerator
from pmixed.mechanism import exact_released_log_law
from pmixed.models import EnsembleLM
from pmixed.privacy import Calibration

__all__ = [
    "CANARY_PROMPT",
    "GamePlan",
    "PlantedCanary",
    "choose_target",
    "logprobs_at",
    "plant_canary",
    "play",
    "pmixed_game",
    "poison_member",
]

#: The public canary context (no private text is needed to audit PMixED).
CANARY_PROMPT = "The secret word of the day is"


@dataclass(frozen=True)
class GamePlan:
    """Pre-registered: trials per world, queries per trial, the p0 band of y*, canary copies (as a
    multiple of partition j's block count)."""

    trials: int = 50
    queries: int = 32
    band: tuple[float, float] = (1e-6, 1e-2)
    candidates: int = 32
    copies_per_block: float = 1.0
    eta: float = 0.05


def _poisoned(lp0: np.ndarray, y: int, mass: float = 0.99) -> np.ndarray:
    p = (1 - mass) * np.exp(lp0)
    p[y] += mass
    return np.log(p / p.sum())


def choose_target(
    lp0: np.ndarray, lps: np.ndarray, cal: Calibration, member: int, plan: GamePlan
) -> int:
    """y* in the band maximising the exact per-query divergence of the poisoned pair at the
    planned order (public model and members at x; the choice reads no trial)."""
    p0 = np.exp(lp0)
    band = np.flatnonzero((p0 >= plan.band[0]) & (p0 <= plan.band[1]))
    if band.size == 0:
        raise ValueError(f"no token has p0 in {plan.band} at the canary context.")
    band = band[np.argsort(p0[band])]
    picks = band[np.unique(np.linspace(0, band.size - 1, plan.candidates).round().astype(int))]
    k = cal.orders.index(cal.planned_order)
    best, best_d = int(picks[0]), -1.0
    for y in picks:
        pair = exact_pair_audit(
            lps[None], lp0[None], cal, member=member, replacement=_poisoned(lp0, int(y))[None]
        )
        if pair.per_query[0, k] > best_d:
            best, best_d = int(y), float(pair.per_query[0, k])
    return best


@torch.no_grad()
def logprobs_at(model, prompt: list[int], adapters: list[str]) -> np.ndarray:
    """``[len(adapters), V]`` next-token log-probs after ``prompt`` (``"__base__"``: public)."""
    x = torch.tensor([prompt]).repeat(len(adapters), 1)
    logits = model(input_ids=x, adapter_names=adapters, logits_to_keep=1).logits[:, -1]
    return torch.log_softmax(logits.double(), -1).numpy()


@dataclass(frozen=True)
class PlantedCanary:
    """Member ``member`` retrained with a canary user's blocks, as adapter ``adapter``."""

    adapter: str
    member: int
    prompt: list[int]
    target: int
    copies: int
    logp_public: np.ndarray  # [V] at the prompt
    logp_members: np.ndarray  # [N, V] the deployed members at the prompt
    logp_canary: np.ndarray  # [V] the canary member at the prompt


def plant_canary(
    model,
    members: list[str],
    tok,
    cal: Calibration,
    plan: GamePlan,
    *,
    member: int,
    partition: torch.Tensor,
    recipe: MemberRecipe,
    adapter: str = "canary-member",
) -> PlantedCanary:
    """Chooses y*, retrains member ``member`` on ``partition`` plus the canary blocks."""
    prompt = tok(CANARY_PROMPT)["input_ids"]
    logp = logprobs_at(model, prompt, ["__base__", *members])
    y = choose_target(logp[0], logp[1:], cal, member, plan)
    copies = max(1, round(plan.copies_per_block * len(partition)))
    block = canary_block([*prompt, y], partition.shape[1])
    retrain_with_canaries(model, adapter, member, partition, block, copies, recipe)
    lc = logprobs_at(model, prompt, [adapter])[0]
    return PlantedCanary(adapter, member, prompt, y, copies, logp[0], logp[1:], lc)


def poison_member(
    model,
    canary: PlantedCanary,
    *,
    partition: torch.Tensor,
    recipe: MemberRecipe,
    adapter: str = "poisoned-member",
) -> np.ndarray:
    """Threat model (b): member ``canary.member``'s partition holds the canary user's records only
    (as many canary blocks as the partition holds blocks, so training sees as many batches),
    trained by the deployment's own recipe as adapter ``adapter``. Returns its log-probs at the
    canary prompt ``[V]``: the member as far from the public model as this training pushes it."""
    block = canary_block([*canary.prompt, canary.target], partition.shape[1])
    retrain_with_canaries(
        model, adapter, canary.member, partition[:0], block, len(partition), recipe
    )
    return logprobs_at(model, canary.prompt, [adapter])[0]


def play(
    lm: EnsembleLM, cal: Calibration, prompt: list[int], queries: int, seed: int, folder: Path
) -> np.ndarray:
    """One fresh deployment (own ledger, budget, seed): ``queries`` one-token answers to ``prompt``."""
    with Deployment.create(folder / f"trial-{seed}.jsonl", cal, seed=seed) as deployment:
        out = PrivateGenerator(lm, deployment).generate([prompt] * queries, 1)
    if any(g.private_steps != 1 for g in out):
        raise RuntimeError("a game query was not answered privately (budget too small).")
    return np.array([g.tokens[0] for g in out])


def pmixed_game(
    model,
    members: list[str],
    tok,
    cal: Calibration,
    plan: GamePlan,
    canary: PlantedCanary,
    *,
    seed: int,
    progress,
) -> tuple[dict, dict]:
    """(public, restricted) result of the game against ``cal``'s claim (a replace_one claim)."""
    if plan.queries > cal.config.query_budget:
        raise ValueError(f"plan.queries must be <= query_budget={cal.config.query_budget}.")
    j, y, lp0, lps = canary.member, canary.target, canary.logp_public, canary.logp_members
    world_d = [*members[:j], canary.adapter, *members[j + 1 :]]
    lps_d = lps.copy()
    lps_d[j] = canary.logp_canary
    law_d = exact_released_log_law(lps_d, lp0, cal)
    law_o = exact_released_log_law(lps, lp0, cal)
    pair = exact_pair_audit(lps_d[None], lp0[None], cal, member=j, replacement=lps[j][None])
    laws = (np.repeat(law_d[None], plan.queries, 0), np.repeat(law_o[None], plan.queries, 0))
    eps_pair = pair_epsilon(*laws, cal.delta)
    tokens = {}
    bar = progress("audit: PMixED game", 2 * plan.trials)
    with tempfile.TemporaryDirectory() as d:
        for w, names in (("D", world_d), ("D'", members)):
            lm = EnsembleLM(model, names, tok.eos_token_id)
            rng = child_rng(seed, f"pmixed/game/{w}")
            runs = []
            for i in range(plan.trials):
                runs.append(
                    play(lm, cal, canary.prompt, plan.queries, int(rng.integers(2**31)), Path(d))
                )
                bar(len(tokens) * plan.trials + i + 1)
            tokens[w] = np.stack(runs)
    targets = np.full(plan.queries, y)
    scores = {
        "count": (pmixed_count(tokens["D"], targets), pmixed_count(tokens["D'"], targets)),
        "llr": (pmixed_llr(tokens["D"], *laws), pmixed_llr(tokens["D'"], *laws)),
    }
    empirical = [
        {
            "score": name,
            **empirical_epsilon(
                a, b, delta=cal.delta, eta=plan.eta, strategy=BonferroniAll()
            ).to_json(),
        }
        for name, (a, b) in scores.items()
    ]
    risk = {name: risk_metrics(a, b, seed=seed, resamples=1000) for name, (a, b) in scores.items()}
    public = {
        "relation": "replace_one (member j retrained with a canary user's blocks)",
        "prompt": CANARY_PROMPT,
        "queries_per_trial": plan.queries,
        "trials_per_world": plan.trials,
        "canary_copies_per_partition_block": plan.copies_per_block,
        "epsilon_pair": eps_pair,
        "per_query_worst_ratio": pair.worst_ratio,
        "per_query_alarm": pair.alarm,
        "empirical": empirical,
        "risk": risk,
        "mean_count": {w: float(s.mean()) for w, s in zip(("D", "D'"), scores["count"])},
    }
    # y*, p0(y*) and the canary member's p(y*|x) read the members: restricted.
    restricted = {
        "member": j,
        "target": y,
        "target_p0": float(np.exp(lp0[y])),
        "canary_member_p_target": float(np.exp(canary.logp_canary[y])),
        "deployed_member_p_target": float(np.exp(lps[j][y])),
        "copies": canary.copies,
        "tokens": {w: t.tolist() for w, t in tokens.items()},
    }
    return public, restricted

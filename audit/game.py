"""PMixED's black-box distinguishing game through the real ``PrivateGenerator`` (AUDIT.md §3, §5.2).

Worlds: D has member j replaced by a **poisoned canary member**, a LoRA adapter trained only on a
public canary context x followed by a rare target token y*; D' is the deployed ensemble. That is a
``replace_one`` neighbour (the analysis bounds each mollified member against p0 whatever it is).
Each trial is a fresh deployment: its own ledger, budget and generator seed, T queries of the same
prompt x, one released token each. The attacker sees the T tokens and scores them by the count of
y* and by the exact log-likelihood ratio of the two worlds' released laws at x (Neyman–Pearson
optimal for this pair). Clopper–Pearson with a Bonferroni correction over every threshold turns
n trials per world into ε_lb; the exact pair (Rényi check and optimistic PLD over the T queries)
gives what the game could at best reveal.

y* is chosen in advance from the public model alone: among tokens with p0(y*|x) in a band, the one
whose poisoned member gives the largest exact per-query divergence at the planned order.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from accounting import PrivacyBudget, RenyiFilter
from audit.attacks import pmixed_count, pmixed_llr
from audit.bounds import BonferroniAll, empirical_epsilon
from audit.canaries import child_rng
from audit.exact import exact_pair_audit, pair_epsilon
from pmixed.generator import PrivateGenerator
from pmixed.ledgering import create_ledger, query_event
from pmixed.mechanism import exact_released_log_law
from pmixed.models import EnsembleLM
from pmixed.privacy import Calibration
from pmixed.train import LoraSpec, TrainSpec, add_trained_adapter

__all__ = ["CANARY_PROMPT", "GamePlan", "choose_target", "pmixed_game"]

#: The public canary context (no private text is needed to audit PMixED).
CANARY_PROMPT = "The secret word of the day is"


@dataclass(frozen=True)
class GamePlan:
    """Pre-registered: trials per world, queries per trial, the p0 band of y*, training."""

    trials: int = 50
    queries: int = 32
    band: tuple[float, float] = (1e-6, 1e-2)
    candidates: int = 32
    train_steps: int = 300
    train_lr: float = 1e-2
    eta: float = 0.05


def _poisoned(lp0: np.ndarray, y: int, mass: float = 0.99) -> np.ndarray:
    p = (1 - mass) * np.exp(lp0)
    p[y] += mass
    return np.log(p / p.sum())


def choose_target(lp0: np.ndarray, lps: np.ndarray, cal: Calibration, member: int,
                  plan: GamePlan) -> int:  # fmt: skip
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
        pair = exact_pair_audit(lps[None], lp0[None], cal, member=member,
                                replacement=_poisoned(lp0, int(y))[None])  # fmt: skip
        if pair.per_query[0, k] > best_d:
            best, best_d = int(y), float(pair.per_query[0, k])
    return best


def _trial(lm: EnsembleLM, cal: Calibration, prompt: list[int], queries: int, seed: int,
           folder: Path) -> np.ndarray:  # fmt: skip
    budget = PrivacyBudget(cal.config.epsilon, cal.config.delta, cal.orders)
    plan = RenyiFilter.for_plan(budget, query_event(cal), cal.config.query_budget)
    ledger = create_ledger(folder / f"trial-{seed}.jsonl", cal, budget=plan.header_record(),
                           seed=seed)  # fmt: skip
    gen = PrivateGenerator(lm, cal, RenyiFilter(budget, plan.monitored, ledger=ledger), seed=seed)
    out = gen.generate([prompt] * queries, 1)
    ledger.close()
    if any(g.private_steps != 1 for g in out):
        raise RuntimeError("a game query was not answered privately (budget too small).")
    return np.array([g.tokens[0] for g in out])


def pmixed_game(model, members: list[str], tok, cal: Calibration, plan: GamePlan, *, seed: int,
                member: int, lora: LoraSpec, progress) -> tuple[dict, dict]:  # fmt: skip
    """(public, restricted) result of the game against ``cal``'s claim (a replace_one claim)."""
    if plan.queries > cal.config.query_budget:
        raise ValueError(f"plan.queries must be <= query_budget={cal.config.query_budget}.")
    prompt = tok(CANARY_PROMPT)["input_ids"]
    x = torch.tensor([prompt])
    rows = ["__base__", *members]
    with torch.no_grad():
        logits = model(input_ids=x.repeat(len(rows), 1), adapter_names=rows).logits[:, -1]
    logp = torch.log_softmax(logits.double(), -1).numpy()
    lp0, lps = logp[0], logp[1:]
    y = choose_target(lp0, lps, cal, member, plan)
    block = torch.tensor((prompt + [y]) * (model.config.n_positions // (len(prompt) + 1)))
    add_trained_adapter(
        model,
        "canary-member",
        block.repeat(64, 1),
        lora,
        TrainSpec(steps=plan.train_steps, batch_size=16, lr=plan.train_lr),
        seed + 21,
    )
    with torch.no_grad():
        lc = torch.log_softmax(model(input_ids=x, adapter_names=["canary-member"]).logits[0, -1]
                               .double(), -1).numpy()  # fmt: skip
    world_d = [*members[:member], "canary-member", *members[member + 1 :]]
    lps_d = lps.copy()
    lps_d[member] = lc
    law_d = exact_released_log_law(lps_d, lp0, cal)
    law_o = exact_released_log_law(lps, lp0, cal)
    pair = exact_pair_audit(
        lps_d[None], lp0[None], cal, member=member, replacement=lps[member][None]
    )
    eps_pair = pair_epsilon(np.repeat(law_d[None], plan.queries, 0),
                            np.repeat(law_o[None], plan.queries, 0), cal.delta)  # fmt: skip
    tokens = {}
    bar = progress("audit: PMixED game", 2 * plan.trials)
    with tempfile.TemporaryDirectory() as d:
        for w, names in (("D", world_d), ("D'", members)):
            lm = EnsembleLM(model, names, tok.eos_token_id)
            rng = child_rng(seed, f"pmixed/game/{w}")
            runs = []
            for i in range(plan.trials):
                runs.append(
                    _trial(lm, cal, prompt, plan.queries, int(rng.integers(2**31)), Path(d))
                )
                bar(len(tokens) * plan.trials + i + 1)
            tokens[w] = np.stack(runs)
    model.delete_adapter("canary-member")
    targets = np.full(plan.queries, y)
    laws = (np.repeat(law_d[None], plan.queries, 0), np.repeat(law_o[None], plan.queries, 0))
    scores = {
        "count": (pmixed_count(tokens["D"], targets), pmixed_count(tokens["D'"], targets)),
        "llr": (pmixed_llr(tokens["D"], *laws), pmixed_llr(tokens["D'"], *laws)),
    }
    empirical = [{"score": name, **empirical_epsilon(a, b, delta=cal.delta, eta=plan.eta,
                                                     strategy=BonferroniAll()).to_json()}
                 for name, (a, b) in scores.items()]  # fmt: skip
    public = {"relation": "replace_one (member replaced by a poisoned canary member)",
              "prompt": CANARY_PROMPT, "queries_per_trial": plan.queries,
              "trials_per_world": plan.trials,
              "canary_member_p_target": float(np.exp(lc[y])),
              "epsilon_pair": eps_pair, "per_query_worst_ratio": pair.worst_ratio,
              "per_query_alarm": pair.alarm, "empirical": empirical,
              "mean_count": {w: float(s.mean()) for w, s in zip(("D", "D'"), scores["count"])}}  # fmt: skip
    # y* was chosen with the members' distributions: it, and p0(y*) which names it, stay restricted.
    restricted = {
        "member": member,
        "target": y,
        "target_p0": float(np.exp(lp0[y])),
        "tokens": {w: t.tolist() for w, t in tokens.items()},
    }
    return public, restricted

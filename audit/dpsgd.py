"""The DP-SGD canary audit and its positive control (AUDIT.md §3, §6.2).

m random canaries, each included in the training data with probability ½ (recorded), then:

* **target**: an Opacus DP-SGD LoRA adapter trained on the private blocks plus the included canaries,
  with the demo's settings (record level, Poisson sampling, ε, δ): its claim is what is audited;
* **positive control**: a non-private LoRA fine-tune on the same canaries, which must leak: if the
  audit cannot see it, the attack or the bound is broken.

Each canary is scored by the reference-calibrated attack (target vs the public model, mean over the
canary's tokens); the one-run auditor guesses "in" for the ``k_pos`` highest scores and "out" for
the ``k_neg`` lowest, both fixed in advance, and the one-run theorem turns the number of correct
guesses into ε_lb at the claim's δ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from accounting import from_opacus
from audit.attacks import reference_calibrated
from audit.bounds import one_run_epsilon
from audit.canaries import child_rng, model_canaries, poisson_inclusion
from audit.risk import risk_metrics
from audit.signals import block_logprobs
from pmixed.train import LoraSpec, TrainSpec, add_trained_adapter, train_dpsgd_adapter

__all__ = ["CanaryPlan", "OneRunPlan", "canary_audit", "canary_result", "one_run_audit",
           "one_run_guesses", "score_canaries"]  # fmt: skip


@dataclass(frozen=True)
class OneRunPlan:
    """Pre-registered: canary count, guesses on each side, confidence."""

    m: int = 1000
    k_pos: int = 50
    k_neg: int = 50
    eta: float = 0.05


def one_run_guesses(scores: object, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 for the ``k_pos`` highest scores, −1 for the ``k_neg`` lowest, 0 (abstain) otherwise.

    Ties are broken by canary index (the scores alone decide; the inclusion draw is never read).
    """
    s = np.asarray(scores, np.float64)
    if np.isnan(s).any():
        raise ValueError("scores must not contain NaN.")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > s.size:
        raise ValueError(f"k_pos + k_neg must be in [0, {s.size}]. Found {k_pos} + {k_neg}.")
    order = np.lexsort((np.arange(s.size), -s))  # descending score, then index
    guesses = np.zeros(s.size, np.int8)
    guesses[order[:k_pos]] = 1
    if k_neg:
        guesses[order[s.size - k_neg :]] = -1
    return guesses


def one_run_audit(scores: object, inclusion: object, plan: OneRunPlan, *, delta: float) -> dict:
    """ε_lb from one training run: guesses on ``scores`` against the recorded ``inclusion`` (±1)."""
    s = np.asarray(inclusion)
    guesses = one_run_guesses(scores, plan.k_pos, plan.k_neg)
    r = int((guesses != 0).sum())
    v = int((guesses == s).sum())
    bound = one_run_epsilon(s.size, r, v, delta=delta, eta=plan.eta)
    return {**bound.to_json(), "precision": v / r if r else None, "k_pos": plan.k_pos,
            "k_neg": plan.k_neg}  # fmt: skip


@torch.no_grad()
def score_canaries(model: torch.nn.Module, adapter: str, canaries: torch.Tensor) -> np.ndarray:
    """Reference-calibrated score of each canary: mean log-prob under ``adapter`` minus public."""
    target = block_logprobs(model, adapter, canaries)
    reference = block_logprobs(model, None, canaries)
    return reference_calibrated(target, reference)


def canary_result(scores: np.ndarray, inclusion: np.ndarray, plan: OneRunPlan, *, delta: float,
                  seed: int, bootstrap: int) -> dict:  # fmt: skip
    """The one-run bound plus AUC / TPR at low FPR of the canary scores (in vs out canaries)."""
    inc = np.asarray(inclusion) == 1
    return {"one_run": one_run_audit(scores, inclusion, plan, delta=delta),
            "risk": risk_metrics(scores[inc], scores[~inc], seed=seed, resamples=bootstrap),
            "canaries": {"m": int(inc.size), "included": int(inc.sum()),
                         "kind": "uniformly random token blocks", "inclusion": "Poisson(1/2)"}}  # fmt: skip


@dataclass(frozen=True)
class CanaryPlan:
    """The canary audit's pre-registered design (the training settings come from the demo)."""

    one_run: OneRunPlan = field(default_factory=OneRunPlan)
    dpsgd_epochs: int = 4
    control_steps: int = 300
    control_lr: float = 1e-2
    bootstrap: int = 1000


def canary_audit(model, private_blocks: torch.Tensor, plan: CanaryPlan, *, lora: LoraSpec,
                 epsilon: float, delta: float, batch_size: int, lr: float, max_grad_norm: float,
                 seed: int, vocab: int, progress) -> tuple[dict, dict]:  # fmt: skip
    """(public, restricted) results of the DP-SGD target and the non-private positive control.

    Both train on the same audit set: the included canaries plus as many private blocks (the first
    ones), so each canary is one record of a few hundred; the DP-SGD adapter at (ε, δ) for
    ``dpsgd_epochs`` epochs with the demo's batch, learning rate and clipping; the control without
    noise or clipping for ``control_steps`` steps. The adapters are removed afterwards.
    """
    m, length = plan.one_run.m, private_blocks.shape[1]
    canaries = model_canaries(model, m, length, child_rng(seed, "canary/draw"),
                              first_token_range=(1, vocab))  # fmt: skip
    inclusion = poisson_inclusion(m, child_rng(seed, "canary/inclusion"))
    inc = inclusion == 1
    data = torch.cat([private_blocks[: int(inc.sum())], canaries[torch.from_numpy(inc)]])
    expected = plan.dpsgd_epochs * -(-len(data) // batch_size)
    bar = progress("audit: DP-SGD with canaries", expected)
    run = train_dpsgd_adapter(model, "audit-dpsgd", data, lora, epsilon=epsilon, delta=delta,
                              epochs=plan.dpsgd_epochs, batch_size=batch_size, lr=lr,
                              max_grad_norm=max_grad_norm, seed=seed + 11,
                              progress=lambda step, _total: bar(min(step, expected)))  # fmt: skip
    claim = from_opacus(list(run.history), delta)
    bar = progress("audit: non-private control", plan.control_steps)
    add_trained_adapter(model, "audit-finetuned", data, lora,
                        TrainSpec(steps=plan.control_steps, batch_size=16, lr=plan.control_lr),
                        seed + 12, progress=lambda step, _loss: bar(step + 1))  # fmt: skip
    public, restricted = {}, {"inclusion": inclusion.tolist()}
    for name in ("audit-dpsgd", "audit-finetuned"):
        scores = score_canaries(model, name, canaries)
        public[name] = canary_result(scores, inclusion, plan.one_run, delta=delta, seed=seed,
                                     bootstrap=plan.bootstrap)  # fmt: skip
        restricted[name] = scores.tolist()
        model.delete_adapter(name)
    public["audit-dpsgd"]["claim"] = {
        "epsilon_ub": claim.rdp,
        "delta": delta,
        "accountant": "dp-accounting RDP (Opacus history)",
        "noise_multiplier": run.noise_multiplier,
        "steps": run.steps,
        "sample_rate": run.sample_rate,
    }
    public["audit-finetuned"]["claim"] = {"epsilon_ub": None, "note": "no privacy: the control"}
    public["design"] = {
        "records": len(data),
        "canaries": m,
        "included": int(inc.sum()),
        "canary_kind": "public-model samples, temperature 1, one block each",
        "seed_paths": ["canary/draw", "canary/inclusion"],
        "seed": seed,
        "dpsgd_epochs": plan.dpsgd_epochs,
        "control_steps": plan.control_steps,
        "control_lr": plan.control_lr,
    }
    return public, restricted

"""The DP-SGD canary audit and its positive control (AUDIT.md §3, §6.2).

m random canaries, each included in the training data with probability ½ (recorded), then:

* **target**: an Opacus DP-SGD LoRA adapter trained on the private blocks plus the included canaries,
  with the demo's settings (record level, Poisson sampling, ε, δ): its claim is what is audited;
* **positive control**: a non-private LoRA fine-tune on the same canaries, which must leak: if the
  audit cannot see it, the attack or the bound is broken.

Each canary is scored by two attacks declared in advance: reference-calibrated (target vs the public
model, mean log-prob over the canary's tokens) and offline LiRA with ``shadows`` shadow models per
target, trained by the target's own procedure on the same private blocks plus FRESH canaries (none of
the audited ones; fixed variance, the paper's variant for few shadows). For each score the one-run
auditor guesses "in" for the ``k_pos`` highest and "out" for the ``k_neg`` lowest, and the one-run
theorem turns the correct guesses into ε_lb at the claim's δ, at confidence 1 − η/2 per score
(Bonferroni over the two), so the larger of the two is a valid 1 − η bound.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from accounting import from_opacus
from audit.attacks import lira_offline, loss, reference_calibrated
from audit.bounds import one_run_epsilon
from audit.canaries import child_rng, drop_adapter, model_canaries, poisson_inclusion
from audit.risk import risk_metrics
from audit.signals import block_logprobs
from pmixed.executor import Job, LocalExecutor
from pmixed.train import LoraSpec, TrainSpec
from pmixed.train_jobs import dpsgd_job, finetune_job

__all__ = [
    "CanaryPlan",
    "CanaryRuns",
    "OneRunPlan",
    "canary_result",
    "finish_canary_audit",
    "one_run_audit",
    "one_run_guesses",
    "start_canary_runs",
]


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
    return {
        **bound.to_json(),
        "precision": v / r if r else None,
        "k_pos": plan.k_pos,
        "k_neg": plan.k_neg,
    }


def canary_result(
    scores: dict[str, np.ndarray],
    inclusion: np.ndarray,
    plan: OneRunPlan,
    *,
    delta: float,
    seed: int,
    bootstrap: int,
) -> dict:
    """The one-run bound plus AUC / TPR at low FPR of each score (in vs out canaries).

    Bonferroni over the scores: each one-run bound at η / len(scores); ``one_run`` is the largest.
    """
    inc = np.asarray(inclusion) == 1
    per = replace(plan, eta=plan.eta / len(scores))
    attacks = {
        name: {
            "one_run": one_run_audit(s, inclusion, per, delta=delta),
            "risk": risk_metrics(s[inc], s[~inc], seed=seed, resamples=bootstrap),
        }
        for name, s in scores.items()
    }
    best = max(attacks, key=lambda name: attacks[name]["one_run"]["epsilon_lb"])
    return {
        "one_run": {
            **attacks[best]["one_run"],
            "attack": best,
            "selection": f"largest of {len(scores)} scores, each at eta/{len(scores)}",
        },
        "risk": attacks[best]["risk"],
        "attacks": attacks,
        "canaries": {
            "m": int(inc.size),
            "included": int(inc.sum()),
            "kind": "public-model samples",
            "inclusion": "Poisson(1/2)",
        },
    }


@dataclass(frozen=True)
class CanaryPlan:
    """The canary audit's pre-registered design (the training settings come from the demo)."""

    one_run: OneRunPlan = field(default_factory=OneRunPlan)
    dpsgd_epochs: int = 4
    control_steps: int = 300
    control_lr: float = 1e-2
    shadows: int = 2
    bootstrap: int = 1000


def _audit_set(model, private_blocks: torch.Tensor, m: int, seed: int, path: str, vocab: int):
    """(canaries [m, T], inclusion ±1, training data): included canaries + as many private blocks."""
    canaries = model_canaries(
        model,
        m,
        private_blocks.shape[1],
        child_rng(seed, f"{path}/draw"),
        first_token_range=(1, vocab),
    )
    inclusion = poisson_inclusion(m, child_rng(seed, f"{path}/inclusion"))
    inc = torch.from_numpy(inclusion == 1)
    return canaries, inclusion, torch.cat([private_blocks[: int(inc.sum())], canaries[inc]])


@dataclass(frozen=True)
class CanaryRuns:
    """The canary audit's training runs, started on an executor by :func:`start_canary_runs`:
    the audited canaries and their inclusion, the audit set, and the pending jobs whose adapter
    files land in ``folder`` (removed by :func:`finish_canary_audit`)."""

    canaries: torch.Tensor  # [m, T]
    inclusion: np.ndarray  # [m] ±1
    records: int
    names: tuple[str, ...]  # per set: the DP-SGD run, then its control
    pending: object  # .results(progress) -> the jobs' return values, in ``names`` order
    folder: tempfile.TemporaryDirectory
    plan: CanaryPlan
    lora: LoraSpec
    delta: float
    seed: int

    def cancel(self) -> None:
        """Stops the runs (an audit that failed elsewhere) and removes their folder."""
        try:
            self.pending.cancel()
        finally:
            self.folder.cleanup()


def start_canary_runs(
    model,
    private_blocks: torch.Tensor,
    plan: CanaryPlan,
    *,
    lora: LoraSpec,
    epsilon: float,
    delta: float,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    seed: int,
    vocab: int,
    base: str | os.PathLike,
    executor=None,
) -> CanaryRuns:
    """Draws the audit sets and submits their trainings to ``executor`` (default local: they run
    when collected); :func:`finish_canary_audit` collects and scores them.

    Both runs of a set train on the same audit set: the included canaries plus as many private
    blocks (the first ones), so each canary is one record of a few hundred; the DP-SGD adapter at
    (ε, δ) for ``dpsgd_epochs`` epochs with the demo's batch, learning rate and clipping; the
    control without noise or clipping for ``control_steps`` steps. Each shadow repeats both on its
    own fresh audit set. The runs are independent jobs (:mod:`pmixed.executor`), each loading the
    public base from the folder ``base`` and seeding itself, so the adapters do not depend on
    where, when or beside what they ran.
    """
    m = plan.one_run.m
    if plan.shadows == 1 or plan.shadows < 0:
        raise ValueError(f"shadows must be 0 or >= 2. Found {plan.shadows}.")
    canaries, inclusion, data = _audit_set(model, private_blocks, m, seed, "canary", vocab)
    sets = [("", data, 0)] + [
        (
            f"-shadow{k}",
            _audit_set(model, private_blocks, m, seed, f"canary/shadow/{k}", vocab)[2],
            100 * (k + 1),
        )
        for k in range(plan.shadows)
    ]
    control = TrainSpec(steps=plan.control_steps, batch_size=16, lr=plan.control_lr)
    folder = tempfile.TemporaryDirectory()
    tmp = Path(folder.name)
    jobs, names = [], []
    for tag, d, offset in sets:
        dp = dict(
            epsilon=epsilon,
            delta=delta,
            epochs=plan.dpsgd_epochs,
            batch_size=batch_size,
            lr=lr,
            max_grad_norm=max_grad_norm,
            seed=seed + 11 + offset,
        )
        names += [f"audit-dpsgd{tag}", f"audit-finetuned{tag}"]
        jobs += [
            Job(dpsgd_job, (base, names[-2], d, lora, tmp / names[-2], dp)),
            Job(
                finetune_job,
                (base, names[-1], d, lora, control, seed + 12 + offset, tmp / names[-1]),
            ),
        ]
    try:
        pending = (executor or LocalExecutor()).submit(jobs)
    except BaseException:
        folder.cleanup()
        raise
    return CanaryRuns(
        canaries=canaries,
        inclusion=inclusion,
        records=len(data),
        names=tuple(names),
        pending=pending,
        folder=folder,
        plan=plan,
        lora=lora,
        delta=delta,
        seed=seed,
    )


def finish_canary_audit(model, runs: CanaryRuns, *, progress) -> tuple[dict, dict]:
    """(public, restricted) results of the DP-SGD target and the non-private positive control.

    Waits for the runs, adds their adapters to ``model``, scores every canary on each (reference
    attack, and offline LiRA against the shadows), removes the adapters and the runs' folder.
    """
    plan, seed, delta = runs.plan, runs.seed, runs.delta
    inclusion, canaries, m = runs.inclusion, runs.canaries, runs.plan.one_run.m
    sets = 1 + plan.shadows
    try:
        bar = progress(f"audit: DP-SGD and control runs ({sets} sets)", len(runs.names))
        results = runs.pending.results(progress=bar)
        tmp = Path(runs.folder.name)
        for name in runs.names:
            model.add_adapter(name, runs.lora.config(model))
            set_peft_model_state_dict(model, load_file(tmp / name), adapter_name=name)
    finally:
        runs.folder.cleanup()
    model.eval()
    run = results[0]  # the target's DP-SGD run record
    reference = block_logprobs(model, None, canaries)
    public, restricted = {}, {"inclusion": inclusion.tolist()}
    for name in ("audit-dpsgd", "audit-finetuned"):
        target = block_logprobs(model, name, canaries)
        scores = {"reference": reference_calibrated(target, reference)}
        if plan.shadows:
            outs = np.stack(
                [
                    loss(block_logprobs(model, f"{name}-shadow{k}", canaries))
                    for k in range(plan.shadows)
                ],
                axis=1,
            )
            scores["lira"] = lira_offline(loss(target), outs, fixed_variance=True)
        public[name] = canary_result(
            scores, inclusion, plan.one_run, delta=delta, seed=seed, bootstrap=plan.bootstrap
        )
        restricted[name] = {k: v.tolist() for k, v in scores.items()}
        for tag in ["", *(f"-shadow{k}" for k in range(plan.shadows))]:
            drop_adapter(model, f"{name}{tag}")
    claim = from_opacus(list(run.history), delta)
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
        "records": runs.records,
        "canaries": m,
        "included": int((inclusion == 1).sum()),
        "canary_kind": "public-model samples, temperature 1, one block each",
        "seed_paths": [
            "canary/draw",
            "canary/inclusion",
            *(f"canary/shadow/{k}/{p}" for k in range(plan.shadows) for p in ("draw", "inclusion")),
        ],
        "seed": seed,
        "dpsgd_epochs": plan.dpsgd_epochs,
        "control_steps": plan.control_steps,
        "control_lr": plan.control_lr,
        "scores": ["reference", *(["lira"] if plan.shadows else [])],
        "lira": {
            "shadows_per_target": plan.shadows,
            "variant": "offline, fixed variance",
            "statistic": "mean per-token log-likelihood",
            "shadow_data": "same private blocks plus fresh canaries (no audited canary)",
        },
    }
    return public, restricted

"""Test perplexity of every model, and of PMixED through the real ledger and budget.

PMixED is scored teacher-forced, as in the paper: each next-token prediction on held-out users' text is
one query, served through :meth:`pmixed.deployment.Deployment.serve` (charged to the ledger before it
is scored). Two numbers (PMIXED_MATH.md §10):

* **exact released law**: PPL = exp(−mean_t log P_E(y_t | x_t)), the law users actually sample from;
* **realised subsample mixture** (the paper's kind): p̄_{S_t} for drawn subsets S_t (p0 if empty),
  mean ± sd over ``runs`` independent draws. By Jensen it is never better in expectation.

Perplexities are utility metrics computed on held-out text; they are not covered by the guarantee
(which protects released tokens) and are reported as such.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pmixed._checks import logsumexp
from pmixed.deployment import Deployment
from pmixed.mechanism import lambdas_by_size, released_log_law, sample_subset
from pmixed.mollifier import mix_log

__all__ = ["PMixEDScore", "lm_perplexity", "member_logprobs", "pmixed_perplexity"]


@torch.no_grad()
def lm_perplexity(
    model: torch.nn.Module,
    data: torch.Tensor,
    adapter: str | None,
    *,
    n_predictions: int | None = None,
    batch_size: int = 16,
) -> float:
    """exp(mean next-token NLL) on blocks ``[n, T]``; ``adapter=None`` is the public model.

    ``n_predictions`` keeps the first predictions in block order (block 0 positions 1..T−1, then
    block 1, ...), the same stream :func:`pmixed_perplexity` scores, so the numbers compare.
    """
    nll = []
    for i in range(0, len(data), batch_size):
        x = data[i : i + batch_size]
        names = ["__base__" if adapter is None else adapter] * len(x)
        logits = model(input_ids=x, adapter_names=names).logits[:, :-1].double()
        per = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
        )
        nll.append(per)
        if n_predictions is not None and sum(map(len, nll)) >= n_predictions:
            break
    flat = torch.cat(nll)[:n_predictions]
    if n_predictions is not None and len(flat) < n_predictions:
        raise ValueError(f"data holds {len(flat)} predictions; n_predictions={n_predictions}.")
    return math.exp(flat.mean().item())


@torch.no_grad()
def member_logprobs(model: torch.nn.Module, members: list[str], x: torch.Tensor):
    """(log p0 ``[T, V]``, log p_i ``[N, T, V]``) float64 at every position of one block ``x [T]``.

    One forward over N + 1 rows (public + every member): the exact law needs all of them.
    """
    rows = x.unsqueeze(0).repeat(len(members) + 1, 1)
    logits = model(input_ids=rows, adapter_names=["__base__", *members]).logits.double()
    logp = torch.log_softmax(logits, dim=-1).numpy()
    return logp[0], logp[1:]


@dataclass(frozen=True)
class PMixEDScore:
    """PMixED utility over ``queries`` teacher-forced predictions (``public_steps`` of them fell back)."""

    exact_ppl: float
    realized_ppl_mean: float
    realized_ppl_sd: float
    runs: int
    queries: int
    public_steps: int


def pmixed_perplexity(
    model: torch.nn.Module,
    members: list[str],
    data: torch.Tensor,
    deployment: Deployment,
    *,
    n_queries: int,
    runs: int = 4,
    progress: Callable[[int], None] | None = None,
) -> PMixEDScore:
    """Scores ``n_queries`` next-token predictions from held-out blocks ``data [n, T]``.

    Each prediction is one query of ``deployment`` (charged before it is scored); an exhausted
    budget scores the public model (a zero-cost public step). The realized runs draw their subsets
    from the deployment's generator; the subset and λ of the first run go to the restricted file.
    The members' forward over a whole block runs before its queries (one batched pass); nothing
    derived from it is scored or kept before the query is charged.
    """
    calibration = deployment.calibration
    if len(members) != calibration.config.n_members:
        raise ValueError(
            f"calibration has n_members={calibration.config.n_members}; got {len(members)}."
        )
    cfg = calibration.config
    exact, realized, done, public = [], [[] for _ in range(runs)], 0, 0

    def private(lps, lp0, y, rng):
        # One λ per member and subset size serves the exact law and every realized subset (a
        # member's λ depends only on its own row and the size).
        by_size = lambdas_by_size(lps, lp0, calibration)
        ex = released_log_law(lps, lp0, by_size, cfg.sampling_rate)[y]
        scores, restricted = [], {}
        for k in range(runs):
            s = sample_subset(cfg.n_members, cfg.sampling_rate, rng, sampler=cfg.reference_sampler)
            if len(s) == 0:
                scores.append(lp0[y])
                lam = np.zeros(0)
            else:
                lam = by_size[0 if len(by_size) == 1 else len(s) - 1][s]
                mixed = mix_log(lps[s], lp0[None, :], lam)
                scores.append(logsumexp(mixed[:, y], axis=0) - math.log(len(s)))
            if k == 0:
                restricted = {"subset": s, "lambdas": lam}
        return (ex, scores), restricted

    for block in data:
        if done == n_queries:
            break
        lp0_all, lps_all = member_logprobs(model, members, block)
        for t in range(min(len(block) - 1, n_queries - done)):
            y = int(block[t + 1])
            lp0, lps = lp0_all[t], lps_all[:, t]
            answer = deployment.serve(
                lambda rng, lps=lps, lp0=lp0, y=y: private(lps, lp0, y, rng),
                lambda rng, lp0=lp0, y=y: (lp0[y], [lp0[y]] * runs),
            )
            if answer.refused:
                raise RuntimeError("the evaluation deployment refused a query.")
            ex, scores = answer.value
            exact.append(ex)
            for r, v in zip(realized, scores):
                r.append(v)
            public += not answer.private
            done += 1
            if progress is not None:
                progress(done)
    if done < n_queries:
        raise ValueError(f"data holds {done} predictions; n_queries={n_queries} were asked for.")
    ppl = [math.exp(-float(np.mean(r))) for r in realized]
    return PMixEDScore(
        math.exp(-float(np.mean(exact))),
        float(np.mean(ppl)),
        float(np.std(ppl, ddof=1)) if runs > 1 else 0.0,
        runs,
        done,
        public,
    )

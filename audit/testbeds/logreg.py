"""Logistic-regression DP-SGD as a many-run audit test bed (Nasr et al. 2023, white-box Dirac canary).

The corrected algorithm, as Opacus runs it: each step draws a Poisson(q) batch, clips every example's
gradient to L2 norm C (factor min(1, C / (‖g‖ + 1e-6)), Opacus's), adds N(0, (σC)²) noise to the sum
and divides by the expected batch size q·n. The privacy claim is dp-accounting's for
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), T)`` (PLD; RDP beside it).

:func:`train_batched` runs R independent trainings as one tensor program: weights ``[R, d]``, one
Bernoulli mask ``[R, n]`` and one noise draw ``[R, d]`` per step. Each run has its own subsampling
and noise; a test checks that one batched run equals an Opacus ``GradSampleModule`` +
``DPOptimizer`` run fed the same batches and the same noise generator.

Canary (Dirac, gradient space): coordinate ``c`` of every real example is 0, so no real gradient
touches weight c; the canary is one more example whose clipped gradient is exactly C·e_c whenever
it is sampled (a gradient canary, the adversary's choice in the white-box threat model). World D
holds it, D' does not. The adversary who sees every iterate recovers u_t = b_t + σ·z_t per step
(b_t: the canary was sampled) and scores with the exact log-likelihood ratio
Σ_t log(1 − q + q·exp((2u_t − 1)/(2σ²))); the final-model (black-box) score is Σ_t u_t, read from
the last weight alone.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from dp_accounting import dp_event, pld, rdp

__all__ = [
    "LogRegTask",
    "TrainedRuns",
    "dpsgd_claim",
    "make_task",
    "noise_for_claim",
    "scores",
    "train_batched",
    "train_one_run",
    "update_llr",
]

#: Opacus's clipping guard: factor = min(1, C / (norm + 1e-6)).
_CLIP_EPS = 1e-6


@dataclass(frozen=True)
class LogRegTask:
    """Public synthetic data: ``x [n, d]`` (column ``canary_coordinate`` is 0), labels ``y [n]``."""

    x: torch.Tensor
    y: torch.Tensor
    canary_coordinate: int

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def d(self) -> int:
        return self.x.shape[1]


def make_task(n: int = 200, d: int = 6, seed: int = 0) -> LogRegTask:
    """n examples of d−1 Gaussian features plus an all-zero canary coordinate (the last one);
    labels from a fixed logistic model, so training has something to learn."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, -1] = 0.0
    w = torch.randn(d, generator=g, dtype=torch.float64)
    w[-1] = 0.0
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w)).double()
    return LogRegTask(x, y, d - 1)


@functools.lru_cache(maxsize=256)
def dpsgd_claim(sigma: float, q: float, steps: int, delta: float) -> dict:
    """ε of the corrected algorithm at δ: dp-accounting PLD (the claim) and RDP (beside it)."""
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
    )
    acc = pld.PLDAccountant()
    acc.compose(event)
    racc = rdp.RdpAccountant(orders=list(range(2, 257)))  # integer orders: no fractional series
    racc.compose(event)
    return {
        "epsilon": float(acc.get_epsilon(delta)),
        "epsilon_rdp": float(racc.get_epsilon(delta)),
        "accountant": "dp-accounting PLD (RDP beside it)",
    }


@functools.lru_cache(maxsize=64)
def noise_for_claim(epsilon: float, q: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier σ (to 1e-4 relative) whose PLD claim is ≤ ``epsilon``."""
    lo, hi = 0.05, 200.0
    if dpsgd_claim(hi, q, steps, delta)["epsilon"] > epsilon:
        raise ValueError(f"epsilon={epsilon} is out of reach at q={q}, steps={steps}.")
    while hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        if dpsgd_claim(mid, q, steps, delta)["epsilon"] > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class TrainedRuns:
    """R runs: final weights ``[R, d]`` and the canary coordinate's iterates ``[R, T+1]``."""

    weights: torch.Tensor
    canary_trace: torch.Tensor


def _per_example_grads(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇ of the logistic loss per run and example: ``[R, n, d]`` (bias-free model)."""
    p = torch.sigmoid(w @ x.T)  # [R, n]
    return (p - y)[:, :, None] * x[None, :, :]


def train_batched(
    task: LogRegTask,
    *,
    runs: int,
    steps: int,
    q: float,
    sigma: float,
    clip: float,
    lr: float,
    canary: torch.Tensor | bool,
    generator: torch.Generator,
    chunk: int = 4096,
) -> TrainedRuns:
    """R = ``runs`` DP-SGD trainings at once (``canary``: bool per run, or one value for all).

    Per step and run: mask ~ Bernoulli(q) over the n examples (and the canary, in world D), clip
    each selected gradient, sum, add σ·C·N(0, I_d), scale by lr/(q·n), step. Runs are processed
    in chunks of ``chunk`` (memory R·n·d·8 bytes per chunk); every draw comes from ``generator``.
    """
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1]. Found {q}.")
    flags = torch.as_tensor(canary, dtype=torch.bool).expand(runs)
    x, y, c = task.x, task.y, task.canary_coordinate
    scale = lr / (q * task.n)
    finals, traces = [], []
    for start in range(0, runs, chunk):
        r = min(chunk, runs - start)
        has = flags[start : start + r].double()
        w = torch.zeros(r, task.d, dtype=torch.float64)
        trace = [w[:, c].clone()]
        for _ in range(steps):
            mask = (torch.rand(r, task.n, generator=generator, dtype=torch.float64) < q).double()
            in_canary = (torch.rand(r, generator=generator, dtype=torch.float64) < q).double()
            g = _per_example_grads(w, x, y)
            norms = g.norm(dim=-1)
            factor = (clip / (norms + _CLIP_EPS)).clamp(max=1.0) * mask
            total = torch.einsum("rn,rnd->rd", factor, g)
            total[:, c] += clip * clip / (clip + _CLIP_EPS) * in_canary * has  # the Dirac canary
            noise = torch.randn(r, task.d, generator=generator, dtype=torch.float64)
            w = w - scale * (total + sigma * clip * noise)
            trace.append(w[:, c].clone())
        finals.append(w)
        traces.append(torch.stack(trace, dim=1))
    return TrainedRuns(torch.cat(finals), torch.cat(traces))


def scores(
    runs: TrainedRuns, *, q: float, sigma: float, clip: float, lr: float, n: int
) -> dict[str, np.ndarray]:
    """White-box (every iterate, exact LLR) and black-box (final weight) scores; higher = D."""
    step = runs.canary_trace.diff(dim=1)  # [R, T]
    u = (-step * (q * n) / (lr * clip)).numpy()  # = b_t·C/(C+1e-6) + σ·z_t
    return {"white_box": update_llr(u, q, sigma), "black_box": u.sum(axis=1)}


def update_llr(u: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """Σ_t log(1 − q + q·exp((2u_t − 1)/(2σ²))) over the last axis: the exact log-likelihood
    ratio of "canary present" for a Poisson(q)-subsampled Gaussian update sequence."""
    a = (2 * u - 1) / (2 * sigma**2)  # the Gaussian log-ratio of "sampled" against "not"
    llr = np.logaddexp(math.log1p(-q), math.log(q) + a) if q < 1 else a
    return llr.sum(axis=-1)


def train_one_run(
    task: LogRegTask,
    *,
    inclusion: np.ndarray,
    steps: int,
    q: float,
    sigma: float,
    clip: float,
    lr: float,
    generator: torch.Generator,
) -> np.ndarray:
    """ONE training run with m Dirac canaries, canary i in its own extra coordinate and present
    iff ``inclusion[i]`` (Steinke, Nasr, Jagielski 2023). Returns u ``[m, T]``: each canary
    coordinate's per-step update as the white-box adversary reads it (see :func:`scores`)."""
    m = len(inclusion)
    x = torch.cat([task.x, torch.zeros(task.n, m, dtype=torch.float64)], dim=1)
    dim = x.shape[1]
    has = torch.as_tensor(np.asarray(inclusion, bool), dtype=torch.float64)
    w = torch.zeros(1, dim, dtype=torch.float64)
    scale = lr / (q * task.n)
    trace = [w[0, task.d :].clone()]
    for _ in range(steps):
        mask = (torch.rand(1, task.n, generator=generator, dtype=torch.float64) < q).double()
        sampled = (torch.rand(m, generator=generator, dtype=torch.float64) < q).double() * has
        g = _per_example_grads(w, x, task.y)
        factor = (clip / (g.norm(dim=-1) + _CLIP_EPS)).clamp(max=1.0) * mask
        total = torch.einsum("rn,rnd->rd", factor, g)
        total[0, task.d :] += clip * clip / (clip + _CLIP_EPS) * sampled
        noise = torch.randn(1, dim, generator=generator, dtype=torch.float64)
        w = w - scale * (total + sigma * clip * noise)
        trace.append(w[0, task.d :].clone())
    steps_taken = torch.stack(trace, dim=1).diff(dim=1)  # [m, T]
    return (-steps_taken * (q * task.n) / (lr * clip)).numpy()

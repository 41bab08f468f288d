"""The seed's DP-SGD, reproduced as written: a known-broken privacy claim for the audit to catch.

The algorithm the project started from trains logistic regression with numpy. Per batch (the data
in order, no sampling): the MEAN gradient of the batch, clipped coordinate-wise with
``np.clip(grad, -C, C)``, plus Gaussian noise of ABSOLUTE standard deviation σ; and it claims

    ε = steps · σ · sqrt(2 ln(1.25/δ)) / (C / batch_size),   steps = ceil(n / batch_size) · epochs.

What is wrong with it (why the audit must refute it):

1. σ sits in the numerator: less noise claims less ε. The Gaussian mechanism needs
   σ ≥ Δ·sqrt(2 ln(1.25/δ))/ε, i.e. ε = Δ·sqrt(2 ln(1.25/δ))/σ.
2. The sensitivity is not C/B. Clipping the batch MEAN bounds the mean, not one example's share
   of it: one example can move the clipped mean by up to 2C in every coordinate (L2: 2C·√d).
3. The noise is absolute, not scaled by the sensitivity, and the Gaussian-mechanism formula holds
   only for ε < 1; steps compose linearly (no subsampling: none is done).

With σ = 1e-4 the claim is ε ≈ 0.5 while one canary moves its coordinate by C against noise 1e-4:
the worlds are told apart in essentially every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SeedConfig", "seed_claimed_epsilon", "train_seed"]


@dataclass(frozen=True)
class SeedConfig:
    """The seed's defaults (reproduced; ``sigma`` is the absolute noise std)."""

    n: int = 512
    d: int = 8
    batch_size: int = 64
    epochs: int = 2
    lr: float = 0.5
    clip: float = 1.0
    sigma: float = 1e-4
    delta: float = 1e-5

    @property
    def steps(self) -> int:
        return math.ceil(self.n / self.batch_size) * self.epochs


def seed_claimed_epsilon(cfg: SeedConfig) -> float:
    """The seed's claim, as written: steps · σ · sqrt(2 ln(1.25/δ)) / (C / batch_size)."""
    return (
        cfg.steps
        * cfg.sigma
        * math.sqrt(2 * math.log(1.25 / cfg.delta))
        / (cfg.clip / cfg.batch_size)
    )


def train_seed(
    cfg: SeedConfig, *, runs: int, canary: bool, rng: np.random.Generator, canary_scale: float = 1e3
) -> tuple[np.ndarray, np.ndarray]:
    """R runs of the seed's algorithm on its synthetic task: (final weights ``[R, d]``, the canary
    coordinate's update at every step ``[R, steps]``).

    The data (n examples, coordinate d−1 zero) are fixed and public; in world D the canary,
    x = ``canary_scale``·e_{d−1} with label 0, replaces the last example (replace-one neighbours:
    the batch layout and the step count are the same in both worlds).
    """
    data = np.random.default_rng(12345)  # the task is public and fixed
    x = data.standard_normal((cfg.n, cfg.d))
    x[:, -1] = 0.0
    y = (data.random(cfg.n) < 1 / (1 + np.exp(-x @ data.standard_normal(cfg.d)))).astype(float)
    if canary:
        x[-1], y[-1] = canary_scale * np.eye(cfg.d)[-1], 0.0
    n = len(x)
    w = np.zeros((runs, cfg.d))
    updates = []
    for _ in range(cfg.epochs):
        for start in range(0, n, cfg.batch_size):
            xb, yb = x[start : start + cfg.batch_size], y[start : start + cfg.batch_size]
            p = 1 / (1 + np.exp(-np.clip(w @ xb.T, -500, 500)))  # [R, B]
            grad = ((p - yb) @ xb) / len(xb)  # the batch's MEAN gradient, [R, d]
            grad = np.clip(grad, -cfg.clip, cfg.clip)  # coordinate-wise, on the mean
            grad = grad + rng.normal(0.0, cfg.sigma, size=grad.shape)  # absolute noise
            w = w - cfg.lr * grad
            updates.append(-cfg.lr * grad[:, -1])
    return w, np.stack(updates, axis=1)

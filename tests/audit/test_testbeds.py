"""Audit test beds: the seed's claim formula, the batched trainer against Opacus, many-run and
one-run bounds on the corrected DP-SGD, and the seed's violation caught."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from audit.manyrun import ManyRunPlan, corrected_dpsgd_audit, seed_dpsgd_audit
from audit.testbeds.logreg import (
    dpsgd_claim,
    make_task,
    noise_for_claim,
    scores,
    train_batched,
    update_llr,
)
from audit.testbeds.seed import SeedConfig, seed_claimed_epsilon

logging.getLogger("absl").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_the_seed_claim_formula_on_a_worked_example():
    # steps = ceil(512 / 64) * 2 = 16; 16 * 1e-4 * sqrt(2 ln(125000)) / (1 / 64)
    cfg = SeedConfig()
    assert cfg.steps == 16
    expected = 16 * 1e-4 * math.sqrt(2 * math.log(1.25e5)) * 64
    assert seed_claimed_epsilon(cfg) == pytest.approx(expected, rel=1e-15)
    assert expected == pytest.approx(0.4961, abs=1e-4)
    # sigma in the numerator: LESS noise claims LESS privacy loss (the defect)
    less = SeedConfig(sigma=1e-5)
    assert seed_claimed_epsilon(less) < seed_claimed_epsilon(cfg)


def test_the_seed_dpsgd_violates_its_own_claim():
    r = seed_dpsgd_audit(runs=300, seed=1)
    assert r["violation"]
    assert r["bounds"]["white_box"]["epsilon_lb"] > 5 * r["claimed_epsilon"]


def test_a_batched_run_equals_a_single_opacus_run_on_the_same_randomness():
    """One run of train_batched against Opacus's GradSampleModule + DPOptimizer fed the same
    Poisson batches and the same noise stream (no canary; Opacus's clip factor and scaling)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    task = make_task(n=40, d=4, seed=3)
    q, steps, sigma, clip, lr = 0.5, 6, 0.8, 0.5, 0.3
    ours = train_batched(
        task,
        runs=1,
        steps=steps,
        q=q,
        sigma=sigma,
        clip=clip,
        lr=lr,
        canary=False,
        generator=torch.Generator().manual_seed(11),
    )
    model = torch.nn.Linear(task.d, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    gsm = GradSampleModule(model, loss_reduction="mean")
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=lr),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=int(q * task.n),
        loss_reduction="mean",
    )
    g = torch.Generator().manual_seed(11)  # the same draws, in train_batched's order
    for _ in range(steps):
        mask = torch.rand(1, task.n, generator=g, dtype=torch.float64)[0] < q
        torch.rand(1, generator=g, dtype=torch.float64)  # the (absent) canary's coin
        noise = torch.randn(1, task.d, generator=g, dtype=torch.float64)
        x, y = task.x[mask], task.y[mask]
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(gsm(x)[:, 0], y)
        loss.backward()
        opt.pre_step()  # clip and accumulate
        model.weight.grad = (model.weight.summed_grad + sigma * clip * noise) / int(q * task.n)
        opt.original_optimizer.step()
    np.testing.assert_allclose(
        ours.weights[0].numpy(), model.weight[0].detach().numpy(), rtol=1e-10, atol=1e-12
    )


def test_a_run_without_the_canary_leaves_its_coordinate_to_the_noise():
    task = make_task(n=50, d=4)
    runs = train_batched(
        task,
        runs=2000,
        steps=5,
        q=0.5,
        sigma=2.0,
        clip=1.0,
        lr=0.1,
        canary=False,
        generator=torch.Generator().manual_seed(0),
    )
    s = scores(runs, q=0.5, sigma=2.0, clip=1.0, lr=0.1, n=task.n)
    u_sum = s["black_box"]  # = sigma * (sum of 5 standard normals)
    assert abs(u_sum.mean()) < 0.2 and abs(u_sum.std() - 2.0 * math.sqrt(5)) < 0.3


def test_the_llr_is_the_exact_mixture_log_ratio():
    u = np.array([[0.3, 1.2]])
    q, s = 0.25, 1.5
    expected = sum(math.log((1 - q) + q * math.exp((2 * x - 1) / (2 * s * s))) for x in u[0])
    assert update_llr(u, q, s)[0] == pytest.approx(expected, rel=1e-14)


def test_noise_for_claim_meets_the_claim_from_below():
    sigma = noise_for_claim(2.0, 0.25, 40, 1e-5)
    assert dpsgd_claim(sigma, 0.25, 40, 1e-5)["epsilon"] <= 2.0
    assert dpsgd_claim(sigma * 0.999, 0.25, 40, 1e-5)["epsilon"] > 2.0 - 1e-2


def test_many_run_audit_stays_below_the_claim_and_has_power():
    """Small scale (3000 runs per world): never above the claim; clearly above 0 at eps 4; the
    demo's 10^5 runs per world reach the issue's tightness (numbers in the README)."""
    plan = ManyRunPlan(
        claims=(4.0,), runs=3000, pilot_runs=3000, one_run_canaries=400, one_run_guesses=40, seed=2
    )
    (row,) = corrected_dpsgd_audit(plan)
    claim = row["claim"]["epsilon"]
    assert 0 < row["epsilon_lb"] <= claim
    assert row["ratio"] > 0.2
    assert all(b["epsilon_lb"] <= claim for b in row["bounds"].values())
    assert 0 <= row["one_run"]["epsilon_lb"] <= claim and row["one_run"]["m"] == 400

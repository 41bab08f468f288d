"""Canary draws and the one-run auditor's guesses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.bounds import one_run_epsilon
from audit.canaries import (
    canary_block,
    child_rng,
    model_canaries,
    poisson_inclusion,
    random_canaries,
)
from audit.dpsgd import OneRunPlan, canary_result, one_run_audit, one_run_guesses
from audit.exposure import ExposurePlan, secret_space, synthetic_control

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations


def test_seed_paths_are_stable_and_independent():
    a = child_rng(7, "canary/draw").integers(0, 2**32, 4)
    assert (a == child_rng(7, "canary/draw").integers(0, 2**32, 4)).all()
    assert not (a == child_rng(7, "canary/inclusion").integers(0, 2**32, 4)).all()
    assert not (a == child_rng(8, "canary/draw").integers(0, 2**32, 4)).all()


def test_inclusion_is_plus_minus_one_with_half_probability():
    s = poisson_inclusion(20_000, child_rng(0, "canary/inclusion"))
    assert set(np.unique(s)) == {-1, 1} and abs((s == 1).mean() - 0.5) < 0.015
    c = random_canaries(50, 8, 300, child_rng(0, "canary/draw"))
    assert c.shape == (50, 8) and c.min() >= 1 and c.max() < 300


def test_model_canaries_are_reproducible_samples_of_the_right_shape():
    from tests.pmixed.tiny import tiny_lm, tokenizer

    lm = tiny_lm(tokenizer())
    a = model_canaries(
        lm.model, 6, 10, child_rng(1, "canary/draw"), first_token_range=(1, 300), batch_size=4
    )
    b = model_canaries(
        lm.model, 6, 10, child_rng(1, "canary/draw"), first_token_range=(1, 300), batch_size=4
    )
    assert a.shape == (6, 10) and torch.equal(a, b) and a.min() >= 0


def test_guesses_take_the_extremes_and_never_read_the_inclusion():
    scores = np.array([0.1, 5.0, -3.0, 5.0, 0.0, -1.0])
    g = one_run_guesses(scores, 2, 2)
    assert g.tolist() == [0, 1, -1, 1, 0, -1]
    assert one_run_guesses(scores, 1, 0).tolist() == [0, 1, 0, 0, 0, 0]  # tie: lower index
    with pytest.raises(ValueError, match="k_pos"):
        one_run_guesses(scores, 4, 4)


def test_perfect_scores_reach_the_one_run_cap():
    rng = np.random.default_rng(0)
    s = poisson_inclusion(1000, rng)
    res = one_run_audit(s.astype(float) + 0.01 * rng.random(1000), s, OneRunPlan(), delta=1e-5)
    assert res["precision"] == 1.0 and res["r"] == 100
    assert res["epsilon_lb"] == pytest.approx(one_run_epsilon(1000, 100, 100, delta=1e-5).epsilon)
    noise = one_run_audit(rng.random(1000), s, OneRunPlan(), delta=1e-5)
    assert noise["epsilon_lb"] < 0.5


def test_canary_block_repeats_the_format_to_the_exact_length():
    b = canary_block([5, 6, 7], 8)
    assert b.tolist() == [5, 6, 7, 5, 6, 7, 5, 6]
    with pytest.raises(ValueError, match="pattern must be non-empty"):
        canary_block([], 8)


def test_two_scores_are_each_bounded_at_half_eta_and_the_larger_is_reported():
    rng = np.random.default_rng(0)
    inclusion = poisson_inclusion(400, child_rng(3, "canary/inclusion"))
    strong = inclusion + 0.3 * rng.normal(size=400)
    weak = rng.normal(size=400)
    plan = OneRunPlan(m=400, k_pos=20, k_neg=20)
    r = canary_result(
        {"reference": weak, "lira": strong}, inclusion, plan, delta=1e-5, seed=0, bootstrap=50
    )
    half = one_run_audit(strong, inclusion, OneRunPlan(400, 20, 20, eta=0.025), delta=1e-5)
    full = one_run_audit(strong, inclusion, plan, delta=1e-5)
    assert r["one_run"]["attack"] == "lira" and r["one_run"]["epsilon_lb"] == half["epsilon_lb"]
    assert 0 < half["epsilon_lb"] < full["epsilon_lb"]  # Bonferroni costs something
    assert r["attacks"]["reference"]["one_run"]["epsilon_lb"] <= r["one_run"]["epsilon_lb"]


def test_exposure_secret_space_is_the_public_band():
    lp0 = np.log(np.array([0.5, 0.3, 0.19, 0.005, 0.004, 0.001]))
    assert secret_space(lp0, (1e-3, 1e-2)).tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        secret_space(lp0, (0.25, 0.4))


def test_exposure_positive_control_sees_a_known_leak_and_a_null_release_gives_zero():
    plan = ExposurePlan()
    assert synthetic_control(plan, delta=1e-5, seed=0)["passed"]
    # Null (the secret is never released): the secret is exchangeable with its references, so it
    # ranks first with probability exactly 1/(K+1), and the bound (one-sided, eta = 0.05) is > 0
    # with probability at most 0.05 per repetition (about 3.6% here, from the binomial's steps).
    runs = [synthetic_control(plan, delta=1e-5, seed=s, leak=0.0) for s in range(100)]
    first = sum(r["first_places"] for r in runs)
    expected = 100 * plan.trials / (plan.references + 1)
    assert abs(first - expected) < 3 * np.sqrt(expected)
    assert sum(r["epsilon_lb"] == 0.0 for r in runs) >= 90


def test_the_poisoned_member_learns_the_canary_more_than_the_member_trained_with_its_partition():
    """Threat model (b): a partition of canary records only pushes the member further."""
    from audit.canaries import MemberRecipe, retrain_with_canaries
    from audit.game import PlantedCanary, logprobs_at, poison_member
    from pmixed.train import TrainSpec, blocks
    from tests.pmixed.tiny import LORA, PRIVATE, ensemble, tokenizer

    tok = tokenizer()
    model = ensemble(tok)
    recipe = MemberRecipe(LORA, TrainSpec(steps=20, batch_size=4, lr=0.5, warmup=0), 7)
    partition = blocks(PRIVATE[1], tok, 32)
    prompt = tok("The secret word of the day is")["input_ids"]
    members = ["member-00", "member-01", "member-02"]
    lp = logprobs_at(model, prompt, ["__base__", *members])
    y = int(np.argmin(lp[0]))  # the public model's least likely token: clearly a canary
    retrain_with_canaries(
        model, "canary-member", 1, partition, canary_block([*prompt, y], 32), len(partition), recipe
    )
    canary = PlantedCanary(
        "canary-member",
        1,
        prompt,
        y,
        len(partition),
        lp[0],
        lp[1:],
        logprobs_at(model, prompt, ["canary-member"])[0],
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "member-01" in n}
    poisoned = poison_member(model, canary, partition=partition, recipe=recipe)
    assert poisoned.shape == lp[0].shape
    assert poisoned[y] > canary.logp_canary[y] > lp[0][y]  # public < with partition < alone
    assert "poisoned-member" in model.peft_config
    after = {n: p for n, p in model.named_parameters() if "member-01" in n}
    assert all(torch.equal(before[n], after[n]) for n in before)  # the deployed member untouched

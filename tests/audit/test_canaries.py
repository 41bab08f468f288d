"""Canary draws and the one-run auditor's guesses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.bounds import one_run_epsilon
from audit.canaries import child_rng, model_canaries, poisson_inclusion, random_canaries
from audit.dpsgd import OneRunPlan, one_run_audit, one_run_guesses

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
    a = model_canaries(lm.model, 6, 10, child_rng(1, "canary/draw"), first_token_range=(1, 300),
                       batch_size=4)  # fmt: skip
    b = model_canaries(lm.model, 6, 10, child_rng(1, "canary/draw"), first_token_range=(1, 300),
                       batch_size=4)  # fmt: skip
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

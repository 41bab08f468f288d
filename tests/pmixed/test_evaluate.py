"""Perplexities: models by adapter name, PMixED through the real ledger and budget."""

from __future__ import annotations

import json
import math

import pytest

from accounting import compose, read_ledger
from pmixed import PMixEDConfig
from pmixed.deployment import Deployment
from pmixed.evaluate import lm_perplexity, pmixed_perplexity
from pmixed.train import blocks
from tests.pmixed.tiny import PRIVATE, tiny_lm, tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def setup():
    tok = tokenizer()
    lm = tiny_lm(tok)
    held = blocks(PRIVATE[1] * 2, tok, 32)
    return tok, lm, held


def _deployment(path, cal):
    return Deployment.create(path, cal, seed=0)


@pytest.mark.parametrize("mode", ["certified", "reference"])
def test_pmixed_perplexity_charges_every_query_and_exact_beats_realized(tmp_path, setup, mode):
    _, lm, held = setup
    cfg = PMixEDConfig(
        n_members=3,
        sampling_rate=0.5,
        epsilon=8.0,
        delta=1e-5,
        query_budget=40,
        orders=tuple(range(2, 17)),
        mode=mode,
    )
    cal = cfg.calibrate()
    dep = _deployment(tmp_path / "l.jsonl", cal)
    score = pmixed_perplexity(lm.model, lm.members, held, dep, n_queries=40, runs=6)
    assert score.queries == 40 and score.public_steps == 0
    assert math.isfinite(score.exact_ppl) and score.realized_ppl_sd > 0
    # Jensen holds in expectation (tests/pmixed/test_mechanism.py checks it exactly); 6 runs are noisy.
    assert score.exact_ppl <= score.realized_ppl_mean + 3 * score.realized_ppl_sd
    assert read_ledger(dep.ledger.path).n_queries == 40
    spent = compose(dep.ledger.path, 1e-5)
    assert spent.epsilon <= 8.0 and spent.certified is (mode == "certified")
    restricted = dep.ledger.restricted_path.read_text().splitlines()[1:]
    assert len(restricted) == 40 and "lambdas" in json.loads(restricted[0])["data"]
    public = lm_perplexity(lm.model, held, None)
    members = [lm_perplexity(lm.model, held, m) for m in lm.members]
    assert score.exact_ppl <= max(public, *members)  # a mixture is no worse than its worst part


def test_exhausted_budget_scores_the_public_model(tmp_path, setup):
    _, lm, held = setup
    cfg = PMixEDConfig(
        n_members=3,
        sampling_rate=0.5,
        epsilon=8.0,
        delta=1e-5,
        query_budget=10,
        orders=tuple(range(2, 17)),
    )
    cal = cfg.calibrate()
    dep = _deployment(tmp_path / "l.jsonl", cal)
    score = pmixed_perplexity(lm.model, lm.members, held, dep, n_queries=25, runs=2)
    assert score.public_steps == 15 and read_ledger(dep.ledger.path).n_public_steps == 15
    with pytest.raises(ValueError, match="n_queries"):
        pmixed_perplexity(
            lm.model, lm.members, held[:1], _deployment(tmp_path / "m.jsonl", cal), n_queries=10_000
        )


def test_lm_perplexity_distinguishes_adapters(setup):
    _, lm, held = setup
    public = lm_perplexity(lm.model, held, None)
    member = lm_perplexity(lm.model, held, "member-01")
    assert public > 1 and member > 1 and public != member

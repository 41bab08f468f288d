"""PrivateGenerator over a Deployment: charge before release, public fallback or refusal, seeded
determinism, and nothing spent on a request that is refused as invalid."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounting import compose, read_ledger, verify
from pmixed import PMixEDConfig
from pmixed.deployment import TEMPERATURE_RANGE, Deployment, InvalidRequest
from pmixed.generator import PrivateGenerator, public_transform, public_transform_many
from tests.pmixed.tiny import computed_rows, tiny_lm, tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[2]
T = 10
CFG = PMixEDConfig(
    n_members=3,
    sampling_rate=0.5,
    epsilon=8.0,
    delta=1e-5,
    query_budget=T,
    orders=tuple(range(2, 17)),
)


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_lm(tok)


def _generator(path, lm, cfg=CFG, seed=None, **kw):
    deployment = Deployment.create(path, cfg.calibrate(), seed=seed, **kw)
    return PrivateGenerator(lm, deployment), deployment.ledger


def test_budget_pays_exactly_t_private_tokens_then_the_public_model_answers(tmp_path, lm, tok):
    gen, ledger = _generator(tmp_path / "l.jsonl", lm, seed=1)
    prompt = tok("To be")["input_ids"]
    with computed_rows(lm) as seen:
        (out,) = gen.generate([prompt], 14)
    assert (out.private_steps, out.public_steps, out.refused) == (T, 4, False)
    assert len(out.tokens) == 14
    assert all(names == ["__base__"] for names in seen[T:])  # fallback never touches a member
    contents = read_ledger(ledger.path)
    assert contents.n_queries == 14 and contents.n_public_steps == 4
    spent = compose(ledger.path, 1e-5)
    assert spent.epsilon <= 8.0 and spent.certified
    restricted = ledger.restricted_path.read_text().splitlines()[1:]
    assert len(restricted) == T
    assert all("lambdas" in json.loads(r)["data"] for r in restricted)
    assert verify(ledger.path, restricted=True).ok


def test_refusal_stops_where_the_budget_ends(tmp_path, lm, tok):
    """The prompts advance together: T = 10 pays five steps of two prompts, then both stop."""
    gen, ledger = _generator(tmp_path / "l.jsonl", lm, seed=2, on_exhausted="refuse")
    a, b = gen.generate([tok("Now is")["input_ids"], tok("the winter")["input_ids"]], 6)
    assert (a.private_steps, a.public_steps, a.refused, len(a.tokens)) == (5, 0, True, 5)
    assert (b.private_steps, b.public_steps, b.refused, len(b.tokens)) == (5, 0, True, 5)
    assert read_ledger(ledger.path).n_queries == T
    (c,) = gen.generate([tok("Now is")["input_ids"]], 2)
    assert (c.private_steps, c.refused, c.tokens) == (0, True, ())


def test_same_seed_same_tokens_and_restricted_records(tmp_path, lm, tok):
    prompt = tok("Friends")["input_ids"]
    runs = []
    for i in range(2):
        gen, ledger = _generator(tmp_path / f"{i}.jsonl", lm, seed=5)
        runs.append(
            (
                gen.generate([prompt], 8, temperature=0.8, top_k=50)[0].tokens,
                ledger.restricted_path.read_text().splitlines()[1:],
            )
        )
    tokens, restricted = zip(*runs)
    assert tokens[0] == tokens[1]
    strip = [
        [{k: v for k, v in json.loads(x).items() if k not in ("public", "prev", "hash")} for x in r]
        for r in restricted
    ]
    assert strip[0] == strip[1]


def test_member_count_and_exhaustion_policy_are_checked(tmp_path, lm, tok):
    with pytest.raises(InvalidRequest, match="on_exhausted"):
        Deployment.create(tmp_path / "m.jsonl", CFG.calibrate(), on_exhausted="later")
    assert not (tmp_path / "m.jsonl").exists()
    other = PMixEDConfig(n_members=4, sampling_rate=0.5, epsilon=8.0, delta=1e-5, query_budget=T)
    with pytest.raises(ValueError, match="n_members"):
        PrivateGenerator(lm, Deployment.create(tmp_path / "o.jsonl", other.calibrate()))


def _bad_requests(vocab, ctx):
    """Requests that must be refused before any charge (one bad parameter each)."""
    ok = {"prompts": [[5, 6, 7]], "max_new_tokens": 3, "temperature": 1.0, "top_k": None}
    bad = (
        [("temperature", t) for t in (0.0, -1.0, math.nan, math.inf, 1e-310, 1e-3, 1e3, True, "1")]
        + [("top_k", k) for k in (0, -1, vocab + 1, 2.5, True)]
        + [("prompts", p) for p in ([[]], [[-1]], [[vocab]], [[5, 1.5]], [list(range(5, 5 + ctx))])]
        + [("max_new_tokens", n) for n in (-1, ctx + 1, 2.0, None)]
    )
    return [{**ok, k: v} for k, v in bad]


@pytest.fixture(scope="module")
def invalid(lm):
    return _bad_requests(lm.vocab_size, lm.max_positions)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_invalid_requests_spend_nothing(tmp_path_factory, lm, invalid, data):
    folder = tmp_path_factory.mktemp("invalid")
    gen, ledger = _generator(folder / "l.jsonl", lm, seed=1)
    gen.generate([[5, 6]], 2)  # a deployment that has already served something
    before = ledger.path.read_bytes(), ledger.restricted_path.read_bytes()
    request = data.draw(st.sampled_from(invalid))
    kw = {k: v for k, v in request.items() if k not in ("prompts", "max_new_tokens")}
    with pytest.raises(InvalidRequest):
        gen.generate(request["prompts"], request["max_new_tokens"], **kw)
    assert (ledger.path.read_bytes(), ledger.restricted_path.read_bytes()) == before


def test_over_long_prompt_is_an_error_unless_truncation_is_asked_for(tmp_path, lm):
    gen, ledger = _generator(tmp_path / "l.jsonl", lm, seed=4)
    ctx = lm.max_positions
    long = [5 + i % 50 for i in range(ctx + 10)]
    with pytest.raises(InvalidRequest, match="fit the context"):
        gen.generate([long], 3)
    assert read_ledger(ledger.path).n_queries == 0
    (out,) = gen.generate([long], 3, truncate=True)
    assert out.prompt_truncated == 10 + 2 and len(out.tokens) == 3
    assert out.prompt_tokens == tuple(long) and read_ledger(ledger.path).n_queries == 3


def test_a_reopened_seeded_deployment_continues_and_never_replays(tmp_path, lm, tok):
    path = tmp_path / "l.jsonl"
    prompt = tok("Friends")["input_ids"]
    gen, ledger = _generator(path, lm, seed=5)
    first = gen.generate([prompt], 6)[0].tokens
    ledger.close()
    with Deployment.open(path) as again:
        assert again.seeded and again.calibration.config == CFG
        second = PrivateGenerator(lm, again).generate([prompt], 6)[0].tokens
    assert first != second  # a fresh stream keyed by (seed, records so far)
    restricted = [
        json.loads(x)["data"]
        for x in path.with_name("l.restricted.jsonl").read_text().splitlines()[1:]
    ]
    contents = read_ledger(path)  # T = 10 private tokens, then 2 public-model ones
    assert len(restricted) == T and (contents.n_queries, contents.n_public_steps) == (12, 2)
    with Deployment.open(path) as third:  # the stream is keyed by (seed, records so far)
        expected = np.random.default_rng([5, contents.next_seq]).random(3)
        np.testing.assert_array_equal(third._rng.random(3), expected)
        assert not np.array_equal(expected, np.random.default_rng(5).random(3))


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-60, 10), min_size=2, max_size=12),
    temperature=st.floats(*TEMPERATURE_RANGE),
    k=st.integers(1, 12),
    ties=st.booleans(),
)
def test_public_transform_rows_are_distributions_over_the_valid_range(logits, temperature, k, ties):
    lp0 = np.array(logits, np.float64)
    if ties:
        lp0[: len(lp0) // 2] = lp0.max()  # several tokens share the top
    lp0 = lp0 - np.log(np.exp(lp0 - lp0.max()).sum()) - lp0.max()
    lps = np.stack([lp0[::-1], np.roll(lp0, 1)])
    a0, a = public_transform(lp0, lps, temperature=temperature, top_k=min(k, len(lp0)))
    for row in (a0[None], a):
        assert np.all(np.abs(np.log(np.exp(row).sum(axis=-1))) <= 1e-12)
        assert not np.isnan(row).any()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    members=st.lists(st.integers(0, 3), min_size=1, max_size=5),
    temperature=st.floats(*TEMPERATURE_RANGE),
    k=st.one_of(st.none(), st.integers(1, 40)),
)
def test_public_transform_of_several_prompts_is_bitwise_each_prompt_alone(
    seed, members, temperature, k
):
    """The generator transforms every prompt's rows in one call; the tokens of a prompt must not
    depend on which prompts it was served with, so each row equals its prompt alone exactly."""
    rng = np.random.default_rng(seed)
    v = 40
    lp0 = rng.normal(0, 4, (len(members), v))
    lp0[:, :3] = lp0[:, :1]  # ties at the top for top-k's token-id rule
    lp0 -= np.log(np.exp(lp0).sum(axis=1, keepdims=True))
    lps = rng.normal(0, 4, (sum(members), v))
    owner = np.repeat(np.arange(len(members)), members)
    alone = [
        public_transform(lp0[j], lps[owner == j], temperature=temperature, top_k=k)
        for j in range(len(members))
    ]
    t0, t = public_transform_many(lp0, lps, owner, temperature=temperature, top_k=k)
    for j, (a0, a) in enumerate(alone):
        assert np.array_equal(t0[j], a0) and np.array_equal(t[owner == j], a)


def test_public_transform_chooses_the_set_from_p0_only():
    lp0 = np.log(np.array([0.3, 0.3, 0.2, 0.15, 0.05]))
    lps = np.log(np.array([[0.01, 0.01, 0.01, 0.01, 0.96], [0.2] * 5]))
    a0, a = public_transform(lp0, lps, temperature=1.0, top_k=2)
    _, b = public_transform(lp0, np.log(np.full((2, 5), 0.2)), temperature=1.0, top_k=2)
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))  # set independent of members
    assert np.isfinite(a0).tolist() == [True, True, False, False, False]  # tie broken by id
    np.testing.assert_allclose(np.exp(a).sum(axis=1), 1.0)
    t0, _ = public_transform(lp0, lps, temperature=2.0, top_k=None)
    assert np.exp(t0).max() < 0.3 and abs(np.exp(t0).sum() - 1) < 1e-12
    with pytest.raises(InvalidRequest, match="temperature"):
        public_transform(lp0, lps, temperature=0.0, top_k=None)
    with pytest.raises(InvalidRequest, match="temperature"):
        public_transform(lp0, lps, temperature=1e-310, top_k=3)
    outside = np.array([[-np.inf, -np.inf, np.log(0.5), np.log(0.5), -np.inf]])  # off the top-2
    with pytest.raises(FloatingPointError, match="no probability mass"):
        public_transform(lp0, outside, temperature=1.0, top_k=2)


KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import warnings; warnings.simplefilter("ignore")
from tests.pmixed.test_generator import _generator
from tests.pmixed.tiny import computed_rows, tiny_lm, tokenizer
tok = tokenizer()
gen, ledger = _generator(sys.argv[1], tiny_lm(tok), seed=9)
calls = []
def hook(token):
    calls.append(token)
    if len(calls) == int(sys.argv[3]):
        print("released", len(calls) - 1, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
gen.deployment.before_release = hook
gen.generate([tok("To be")["input_ids"]], 8)
"""


@pytest.mark.parametrize("kill_at", [1, 4])
def test_a_process_killed_between_charge_and_release_left_the_record(tmp_path, kill_at):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    path = tmp_path / "ledger.jsonl"
    out = subprocess.run(
        [sys.executable, str(script), str(path), str(ROOT), str(kill_at)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == -9, out.stderr
    released = int(out.stdout.split()[-1])
    assert verify(path, restricted=True).ok
    contents = read_ledger(path)
    assert contents.n_queries == released + 1  # the unreleased token was already charged
    assert len(path.with_name("ledger.restricted.jsonl").read_text().splitlines()) == kill_at + 1


#: Three members at q = 0.5: a subset is rarely empty, so most tokens are private.
BIG = PMixEDConfig(
    n_members=3,
    sampling_rate=0.5,
    epsilon=8.0,
    delta=1e-5,
    query_budget=64,
    orders=tuple(range(2, 17)),
)


def test_prompts_generated_together_get_the_tokens_they_get_alone(tmp_path, lm, tok):
    prompts = [tok(t)["input_ids"] for t in ("To be", "Friends, Romans", "Now is the winter")]
    gen, ledger = _generator(tmp_path / "together.jsonl", lm, cfg=BIG, seed=4)
    together = gen.generate(prompts, 5)
    assert read_ledger(ledger.path).n_queries == 15
    gen1, _ = _generator(tmp_path / "alone.jsonl", lm, cfg=BIG, seed=4)
    alone = [gen1.generate([p], 5)[0] for p in prompts]
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert len({g.tokens for g in together}) == 3


@pytest.mark.parametrize("constant", [True, False])
def test_constant_work_computes_the_same_rows_whatever_the_subset(tmp_path, lm, tok, constant):
    deployment = Deployment.create(tmp_path / "l.jsonl", BIG.calibrate(), seed=2)
    gen = PrivateGenerator(lm, deployment, constant_work=constant)
    with computed_rows(lm) as seen:
        gen.generate([tok("To be")["input_ids"], tok("Friends")["input_ids"]], 8)
    rows = [len(names) for names in seen]
    lines = deployment.ledger.restricted_path.read_text().splitlines()[1:]
    sizes = {json.loads(line)["data"]["subset_size"] for line in lines}
    assert len(sizes) > 1  # the subsets really differed
    assert (set(rows) == {2 * (1 + 3)}) is constant

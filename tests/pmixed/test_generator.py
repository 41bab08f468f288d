"""PrivateGenerator: charge before release, public fallback or refusal, seeded determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from accounting import PrivacyBudget, RenyiFilter, compose, read_ledger, verify
from pmixed import PMixEDConfig
from pmixed.generator import PrivateGenerator, public_transform
from pmixed.ledgering import create_ledger, query_event
from tests.pmixed.tiny import tiny_lm, tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[2]
T = 10
CFG = PMixEDConfig(n_members=3, sampling_rate=0.5, epsilon=8.0, delta=1e-5, query_budget=T,
                   orders=tuple(range(2, 17)))  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_lm(tok)


def _generator(path, lm, cfg=CFG, seed=None, **kw):
    cal = cfg.calibrate()
    budget = PrivacyBudget(cfg.epsilon, cfg.delta, cal.orders)
    plan = RenyiFilter.for_plan(budget, query_event(cal), cfg.query_budget)
    ledger = create_ledger(path, cal, budget=plan.header_record(), seed=seed)
    filt = RenyiFilter(budget, plan.monitored, ledger=ledger)
    return PrivateGenerator(lm, cal, filt, seed=seed, **kw), ledger


def test_budget_pays_exactly_t_private_tokens_then_the_public_model_answers(tmp_path, lm, tok):
    gen, ledger = _generator(tmp_path / "l.jsonl", lm, seed=1)
    prompt = tok("To be")["input_ids"]
    seen = []
    handle = lm._lora_layers[0].register_forward_hook(  # what a LoRA layer really receives
        lambda mod, args, kwargs, out: seen.append(kwargs.get("adapter_names")), with_kwargs=True
    )
    try:
        (out,) = gen.generate([prompt], 14)
    finally:
        handle.remove()
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
    gen, ledger = _generator(tmp_path / "l.jsonl", lm, seed=2, on_exhausted="refuse")
    a, b = gen.generate([tok("Now is")["input_ids"], tok("the winter")["input_ids"]], 6)
    assert (a.private_steps, a.refused) == (6, False)
    assert (b.private_steps, b.public_steps, b.refused) == (4, 0, True)
    assert read_ledger(ledger.path).n_queries == T


def test_same_seed_same_tokens_and_restricted_records(tmp_path, lm, tok):
    prompt = tok("Friends")["input_ids"]
    runs = []
    for i in range(2):
        gen, ledger = _generator(tmp_path / f"{i}.jsonl", lm, seed=5)
        runs.append((gen.generate([prompt], 8, temperature=0.8, top_k=50)[0].tokens,
                     ledger.restricted_path.read_text().splitlines()[1:]))  # fmt: skip
    tokens, restricted = zip(*runs)
    assert tokens[0] == tokens[1]
    strip = [[{k: v for k, v in json.loads(x).items() if k not in ("public", "prev", "hash")}
              for x in r] for r in restricted]  # fmt: skip
    assert strip[0] == strip[1]


def test_seed_must_match_the_ledger_header_and_bad_input_is_refused(tmp_path, lm, tok):
    gen, _ = _generator(tmp_path / "l.jsonl", lm, seed=None)
    with pytest.raises(ValueError, match="seeded"):
        PrivateGenerator(lm, gen.calibration, gen.budget, seed=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([[1]], -1)
    with pytest.raises(ValueError, match="on_exhausted"):
        PrivateGenerator(lm, gen.calibration, gen.budget, on_exhausted="later")
    other = PMixEDConfig(n_members=4, sampling_rate=0.5, epsilon=8.0, delta=1e-5, query_budget=T)
    with pytest.raises(ValueError, match="n_members"):
        PrivateGenerator(lm, other.calibrate(), gen.budget)


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
    with pytest.raises(ValueError, match="temperature"):
        public_transform(lp0, lps, temperature=0.0, top_k=None)
    outside = np.array([[-np.inf, -np.inf, np.log(0.5), np.log(0.5), -np.inf]])  # off the top-2
    with pytest.raises(FloatingPointError, match="no probability mass"):
        public_transform(lp0, outside, temperature=1.0, top_k=2)


KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import warnings; warnings.simplefilter("ignore")
from tests.pmixed.test_generator import _generator
from tests.pmixed.tiny import tiny_lm, tokenizer
tok = tokenizer()
gen, ledger = _generator(sys.argv[1], tiny_lm(tok), seed=9)
calls = []
def hook(token):
    calls.append(token)
    if len(calls) == int(sys.argv[3]):
        print("released", len(calls) - 1, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
gen.before_release = hook
gen.generate([tok("To be")["input_ids"]], 8)
"""


@pytest.mark.parametrize("kill_at", [1, 4])
def test_a_process_killed_between_charge_and_release_left_the_record(tmp_path, kill_at):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    path = tmp_path / "ledger.jsonl"
    out = subprocess.run([sys.executable, str(script), str(path), str(ROOT), str(kill_at)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.returncode == -9, out.stderr
    released = int(out.stdout.split()[-1])
    assert verify(path, restricted=True).ok
    contents = read_ledger(path)
    assert contents.n_queries == released + 1  # the unreleased token was already charged
    assert len(path.with_name("ledger.restricted.jsonl").read_text().splitlines()) == kill_at + 1

"""Any causal LM as the base: tiny random GPT-2, Llama and Qwen2 saved with ``save_pretrained``,
loaded back by path, with LoRA members on peft's default targets for the architecture."""

from __future__ import annotations

import numpy as np
import pytest

from accounting import read_ledger
from audit.attacks import loss
from audit.exact import exact_pair_audit
from audit.signals import block_logprobs, pmixed_contexts
from pmixed import PMixEDConfig
from pmixed.backend import BackendError, load_adapters, load_base, lora_targets, save_adapters
from pmixed.deployment import Deployment
from pmixed.generator import PrivateGenerator
from pmixed.models import EnsembleLM
from pmixed.train import LoraSpec, TrainSpec, add_lora_members, blocks
from tests.pmixed.tiny import (
    ARCHS,
    LOOP_TOLERANCE,
    PRIVATE,
    cached_vs_loop,
    save_base,
    tokenizer,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
V, CONTEXT = 320, 48
MEMBERS = ["member-00", "member-01", "member-02"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _save_base(kind: str, folder, tok) -> None:
    save_base(kind, folder, tok, CONTEXT)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def deployed(request, tmp_path_factory, tok):
    """(kind, base folder, adapters folder, EnsembleLM loaded back from both folders)."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    _save_base(kind, root / "base", tok)
    tok2, base = load_base(root / "base")
    parts = [blocks(texts, tok2, 24) for texts in PRIVATE]
    spec = TrainSpec(steps=12, batch_size=4, lr=0.05, warmup=0)
    trained = add_lora_members(base, parts, LoraSpec(r=4), spec, 7, names=MEMBERS)
    save_adapters(trained, MEMBERS, root / "adapters")
    _, fresh = load_base(root / "base")
    model, names = load_adapters(fresh, root / "adapters")
    assert names == MEMBERS
    return kind, root, EnsembleLM(model, names, tok2.pad_token_id)


def test_context_length_and_default_targets_come_from_the_architecture(deployed):
    kind, _, lm = deployed
    assert lm.max_positions == CONTEXT
    expected = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}
    assert sorted(lm.model.peft_config["member-00"].target_modules) == expected[kind]
    assert lm.model.peft_config["member-00"].fan_in_fan_out is (kind == "gpt2")
    assert lm.batched_lora is not None


def test_batched_cached_forward_equals_the_per_adapter_loop(deployed, tok, layout):
    """Both batch layouts of a step (the ``layout`` fixture), so every architecture's attention
    takes the packed 4-D mask too."""
    worst, gap = cached_vs_loop(deployed[2], tok("Friends, Romans")["input_ids"], 12, 0.5)
    assert worst < LOOP_TOLERANCE
    assert gap > 1e-2  # the trained adapters were loaded back, not fresh zero-B ones


def test_the_generator_releases_tokens_with_ledger_records(deployed, tok, tmp_path):
    _, _, lm = deployed
    cfg = PMixEDConfig(
        n_members=3,
        sampling_rate=0.5,
        epsilon=8.0,
        delta=1e-5,
        query_budget=6,
        orders=tuple(range(2, 17)),
    )
    with Deployment.create(tmp_path / "l.jsonl", cfg.calibrate(), seed=1) as deployment:
        (out,) = PrivateGenerator(lm, deployment).generate([tok("To be")["input_ids"]], 5)
    assert (out.private_steps, len(out.tokens)) == (5, 5)
    assert read_ledger(tmp_path / "l.jsonl").n_queries == 5
    deployment = Deployment.create(tmp_path / "m.jsonl", cfg.calibrate(), seed=1)
    with deployment, pytest.raises(ValueError, match=f"{CONTEXT}"):  # the config's, not GPT-2's
        PrivateGenerator(lm, deployment).generate([[1] * CONTEXT], 5)
    assert read_ledger(tmp_path / "m.jsonl").n_queries == 0


def test_the_exact_audit_and_the_mia_signals_run(deployed, tok):
    _, _, lm = deployed
    own, other = blocks(PRIVATE[0], tok, 24), blocks(PRIVATE[1], tok, 24)
    lp0, lps = pmixed_contexts(lm.model, MEMBERS, own, 8)
    assert lps.shape == (8, 3, V) and np.allclose(np.exp(lp0).sum(-1), 1)
    cal = PMixEDConfig(
        n_members=3, sampling_rate=0.5, epsilon=8.0, delta=1e-5, query_budget=8
    ).calibrate()
    pair = exact_pair_audit(lps, lp0, cal, member=0)
    assert not pair.alarm and 0 < pair.epsilon_pair < 8.0
    # The loss attack separates member 0's own partition from another's.
    member_loss = loss(block_logprobs(lm.model, "member-00", own))
    other_loss = loss(block_logprobs(lm.model, "member-00", other))
    assert member_loss.mean() > other_loss.mean()  # scores: higher = more likely a member


def test_adapters_that_do_not_fit_the_base_are_refused_by_name(deployed, tmp_path, tok):
    kind, root, _ = deployed
    other = "llama" if kind != "llama" else "gpt2"
    _save_base(other, tmp_path / "other", tok)
    _, base = load_base(tmp_path / "other")
    with pytest.raises(BackendError, match="--adapters .* was trained on another base"):
        load_adapters(base, root / "adapters")
    # Without the fingerprint (adapters from elsewhere), peft's shapes and names still decide.
    import shutil

    shutil.copytree(root / "adapters", tmp_path / "foreign")
    (tmp_path / "foreign" / "base.json").unlink()
    if kind == "gpt2":
        with pytest.raises(BackendError, match="--adapters .*member-00 does not fit"):
            load_adapters(base, tmp_path / "foreign")
    with pytest.raises(BackendError, match="holds no peft adapter"):
        load_adapters(base, tmp_path / "other")
    with pytest.raises(BackendError, match="--base .* is not a model folder"):
        load_base(tmp_path / "missing")
    with pytest.raises(BackendError, match="--lora-targets nope match no module"):
        lora_targets(base, ["nope"])

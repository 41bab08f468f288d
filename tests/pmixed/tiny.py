"""A tiny trained ensemble (tokenizer, public GPT-2, three LoRA members) shared by model tests."""

from __future__ import annotations

import contextlib

import torch

from pmixed.models import EnsembleLM
from pmixed.train import (
    GPT2_TARGETS,
    LoraSpec,
    ModelSpec,
    TrainSpec,
    add_lora_members,
    blocks,
    build_public_model,
    train_lm,
    train_tokenizer,
)

PUBLIC = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. " * 4,
    "Now is the winter of our discontent made glorious summer by this sun of York. " * 6,
]
PRIVATE = [
    ["Friends, Romans, countrymen, lend me your ears; I come to bury Caesar. " * 5],
    ["Out, damned spot! out, I say! One: two: why, then, 'tis time to do't. " * 5],
    ["If music be the food of love, play on; give me excess of it. " * 5],
]
#: |batched cached forward − set_adapter loop| allowed in log p: both are float32 forwards that
#: round independently (the batched LoRA's bmm against peft's per-adapter matmul, a cached against
#: a full attention); log p reaches about 6 in these walks, where a float32 ulp is 4.8e-7, and the
#: worst measured difference was 1.1e-6. A wrong adapter or position is off by 1e-2 or more.
LOOP_TOLERANCE = 4e-6
#: The members' LoRA: rank 4 on GPT-2's attention and MLP projections.
LORA = LoraSpec(r=4, target_modules=GPT2_TARGETS)
SPEC = ModelSpec(vocab_size=320, block_size=64, n_embd=32, n_layer=2, n_head=2)


def tokenizer():
    return train_tokenizer(PUBLIC, 320)


def ensemble(tok, private=PRIVATE, seed=0):
    pub = build_public_model(SPEC, tok, seed)
    train_lm(
        pub,
        blocks(PUBLIC, tok, 32),
        TrainSpec(steps=5, batch_size=4),
        torch.Generator().manual_seed(seed),
    )
    parts = [blocks(texts, tok, 32) for texts in private]
    return add_lora_members(pub, parts, LORA, TrainSpec(steps=4, batch_size=4, lr=0.05), 7)


def tiny_lm(tok=None, spread: float = 0.3) -> EnsembleLM:
    """Three members made clearly different from the public model (random LoRA B, seeded)."""
    tok = tok or tokenizer()
    model = ensemble(tok)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(spread * torch.randn(p.shape, generator=gen))
    return EnsembleLM(model, ["member-00", "member-01", "member-02"], tok.eos_token_id)


def cached_vs_loop(lm: EnsembleLM, prompt: list[int], steps: int, p: float) -> tuple[float, float]:
    """(worst |batched cached forward − ``set_adapter`` loop without cache|, largest member−public
    gap) over a ``steps``-token walk, each member computed at a step with probability ``p``."""
    from pmixed.models import SequenceState

    rng = torch.Generator().manual_seed(0)
    state = SequenceState(list(prompt))
    worst, gap = 0.0, 0.0
    for _ in range(steps):
        members = [i for i in range(lm.n_members) if torch.rand(1, generator=rng).item() < p]
        lp0, lps = lm.next_logprobs(state, members)
        assert lps.shape == (len(members), lm.vocab_size) and lp0.dtype == torch.float64
        worst = max(worst, (lp0 - lm.reference_logprobs(state.tokens, None)).abs().max().item())
        for j, m in enumerate(members):
            ref = lm.reference_logprobs(state.tokens, m)
            worst = max(worst, (lps[j] - ref).abs().max().item())
            gap = max(gap, (ref - lp0).abs().max().item())
        state.tokens.append(int(torch.multinomial(lp0.exp(), 1, generator=rng)))
    return worst, gap


@contextlib.contextmanager
def computed_rows(lm: EnsembleLM):
    """Records the adapter of every row of every ensemble forward (``"__base__"``: public)."""
    seen: list[list[str]] = []
    inner = lm._mixed_forward

    def record(names, **inputs):
        seen.append(list(names))
        return inner(names, **inputs)

    lm._mixed_forward = record
    try:
        yield seen
    finally:
        del lm._mixed_forward


#: Tiny random architectures other than the demo's GPT-2 (any causal LM is a base).
ARCHS = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=False),
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "qwen2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def save_base(kind: str, folder, tok, context: int = 48) -> None:
    """A randomly initialised ``kind`` model and ``tok`` saved to ``folder`` (``save_pretrained``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = dict(vocab_size=len(tok), bos_token_id=0, eos_token_id=0, pad_token_id=0)
    length = {"n_positions": context} if kind == "gpt2" else {"max_position_embeddings": context}
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, **ids, **length, **ARCHS[kind])
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)

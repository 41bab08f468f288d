"""Tokenizer, public model and LoRA ensemble, trained from nothing on the CPU.

* The tokenizer is a byte-level BPE trained on PUBLIC text only: private text must not shape the
  vocabulary (a rare private name would otherwise become its own token).
* The public model is a small GPT-2 built from a config (``AutoModelForCausalLM.from_config``), with
  untied input and output embeddings (Opacus ghost clipping needs them untied).
* Each ensemble member is a LoRA adapter (peft; targets and ``fan_in_fan_out`` resolved for the
  architecture by :mod:`pmixed.backend`) on the same frozen public weights, trained on its own
  partition only, from the same initial state. Any causal LM works as the base.

Blocks are cut inside each partition, after partitioning (``pmixed.data``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

from pmixed.backend import lora_config

__all__ = [
    "EOS",
    "GPT2_TARGETS",
    "DpsgdResult",
    "LoraSpec",
    "ModelSpec",
    "TrainSpec",
    "add_lora_members",
    "add_trained_adapter",
    "blocks",
    "build_public_model",
    "dpsgd_state",
    "train_dpsgd_adapter",
    "train_lm",
    "train_member",
    "train_tokenizer",
]

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ModelSpec:
    """The public model's architecture (GPT-2 style)."""

    vocab_size: int = 4096
    block_size: int = 128
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4


@dataclass(frozen=True)
class TrainSpec:
    """An optimisation run: AdamW, linear warm-up then cosine decay."""

    steps: int
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 10


#: GPT-2's attention and MLP projections: the demo's LoRA targets (peft's GPT-2 default is
#: ``c_attn`` alone).
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter: rank, alpha, dropout and target modules (None: peft's default for the
    model's architecture, :func:`pmixed.backend.lora_targets`)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def config(self, model: torch.nn.Module) -> LoraConfig:
        """peft's config for ``model`` (targets resolved, ``fan_in_fan_out`` from their type)."""
        return lora_config(
            model,
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.target_modules,
        )

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        """The inverse of ``asdict`` (JSON turns the targets into a list)."""
        targets = d.get("target_modules")
        return cls(**{**d, "target_modules": None if targets is None else tuple(targets)})


def train_tokenizer(public_texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on public text only; ``<|endoftext|>`` is id 0 and doubles as padding."""
    if not public_texts:
        raise ValueError("public_texts must not be empty.")
    if not 257 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in [257, 65536]. Found {vocab_size}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(public_texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS
    )


def blocks(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, block_size: int
) -> torch.Tensor:
    """Texts joined by EOS and cut into ``[n_blocks, block_size]`` token ids (the tail is dropped)."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"{len(ids)} tokens cannot fill one block of {block_size}.")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def build_public_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int
) -> torch.nn.Module:
    """A freshly initialised GPT-2 from ``spec`` (untied embeddings), seeded for reproducibility."""
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"vocab_size must be >= the tokenizer's {len(tokenizer)}.")
    cfg = GPT2Config(
        vocab_size=spec.vocab_size,
        n_positions=spec.block_size,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def _lr(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def train_lm(
    model: torch.nn.Module,
    data: torch.Tensor,
    spec: TrainSpec,
    generator: torch.Generator,
    *,
    progress: object | None = None,
) -> list[float]:
    """Next-token training on ``data`` blocks ``[n, T]`` (only parameters with ``requires_grad``).

    Batches are drawn with ``generator``; returns the loss per step. ``progress`` is an optional
    callable ``progress(step, loss)`` (the command line shows a bar).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters.")
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    n, t = data.shape
    positions = torch.arange(t).repeat(min(spec.batch_size, n), 1)
    model.train()
    losses = []
    for step in range(spec.steps):
        idx = torch.randperm(n, generator=generator)[: spec.batch_size]
        batch = data[idx]
        for group in opt.param_groups:
            group["lr"] = _lr(step, spec)
        loss = model(input_ids=batch, labels=batch, position_ids=positions[: len(batch)]).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses


def _with_adapter(model: torch.nn.Module, name: str, lora: LoraSpec) -> PeftModel:
    """``model`` with a fresh LoRA adapter ``name`` (a bare base is wrapped; the initialisation
    draws from torch's global generator, which callers seed)."""
    if isinstance(model, PeftModel):
        model.add_adapter(name, lora.config(model))
        return model
    return get_peft_model(model, lora.config(model), adapter_name=name)


def add_lora_members(
    public: torch.nn.Module,
    parts: Sequence[torch.Tensor],
    lora: LoraSpec,
    spec: TrainSpec,
    seed: int,
    *,
    names: Sequence[str] | None = None,
    progress: object | None = None,
) -> PeftModel:
    """One LoRA adapter per partition on the frozen public model; adapter i sees only ``parts[i]``.

    Every adapter starts from the same LoRA initialisation (seeded) and its own batch generator, so
    member i's weights depend on partition i alone.
    """
    names = list(names or [f"member-{i:02d}" for i in range(len(parts))])
    if len(names) != len(parts) or len(set(names)) != len(names):
        raise ValueError("names must be distinct, one per partition.")
    model = public
    for i, (name, data) in enumerate(zip(names, parts)):
        cb = None if progress is None else (lambda s, loss, i=i: progress(i, s, loss))
        model = train_member(model, name, i, data, lora, spec, seed, progress=cb)
    model.eval()
    return model


def train_member(
    model: torch.nn.Module,
    name: str,
    index: int,
    data: torch.Tensor,
    lora: LoraSpec,
    spec: TrainSpec,
    seed: int,
    *,
    progress: object | None = None,
) -> PeftModel:
    """Adapter ``name`` trained exactly as member ``index`` of :func:`add_lora_members` would be
    on ``data``: the same LoRA initialisation and batch generator. Retraining member i on its own
    partition reproduces it bit for bit; on the partition plus canaries it is the audit's
    "member retrained with its canaries" (``model`` may be the bare public model or a PeftModel).
    """
    torch.manual_seed(seed)
    model = _with_adapter(model, name, lora)
    model.set_adapter(name)  # only this adapter's LoRA weights require grad
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    train_lm(model, data, spec, gen, progress=progress)
    model.eval()
    return model


def add_trained_adapter(
    model: torch.nn.Module,
    name: str,
    data: torch.Tensor,
    lora: LoraSpec,
    spec: TrainSpec,
    seed: int,
    *,
    progress: object | None = None,
) -> PeftModel:
    """One more LoRA adapter on the same base, trained (non-privately) on ``data`` (``model`` may
    be the bare base or a PeftModel: the same weights either way)."""
    torch.manual_seed(seed)
    model = _with_adapter(model, name, lora)
    model.set_adapter(name)
    train_lm(model, data, spec, torch.Generator().manual_seed(seed), progress=progress)
    return model


@dataclass(frozen=True)
class DpsgdResult:
    """The Opacus run behind the DP-SGD adapter: its accountant history and settings."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    empty_batches: int
    max_grad_norm: float
    history: tuple[tuple[float, float, int], ...]
    epsilon_opacus: float


def noise_for_epsilon(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 1e-4 relative) whose dp-accounting RDP ε is <= ``epsilon``.

    Calibrated with the accountant the reports use, so the stated ε is never above the target
    (Opacus's own calibration targets its accountant within a tolerance, 8.003 in one run here).
    """
    from accounting import dpsgd_epsilon

    # Trial noise levels far below the answer make dp-accounting log that some fractional orders
    # did not converge (it then drops them: conservative). Those trials are discarded, so their
    # log lines are too; the final epsilon is computed elsewhere, with its warnings.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        lo, hi = 0.05, 1.0
        while dpsgd_epsilon(hi, sample_rate, steps, delta) > epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e4:
                raise ValueError(f"no noise multiplier reaches epsilon={epsilon} in {steps} steps.")
        while hi - lo > 1e-4 * hi:
            mid = (lo + hi) / 2
            if dpsgd_epsilon(mid, sample_rate, steps, delta) > epsilon:
                lo = mid
            else:
                hi = mid
    finally:
        absl.setLevel(level)
    return hi


def train_dpsgd_adapter(
    model: PeftModel,
    name: str,
    data: torch.Tensor,
    lora: LoraSpec,
    **settings: object,
) -> DpsgdResult:
    """A LoRA adapter trained with Opacus DP-SGD (:func:`dpsgd_state`, keyword ``settings``) on a
    copy of ``model``'s base, then added to ``model`` as ``name``."""
    base = copy.deepcopy(model).unload()  # the public weights without any LoRA layer
    state, result = dpsgd_state(base, name, data, lora, **settings)
    model.add_adapter(name, lora.config(model))
    set_peft_model_state_dict(model, state, adapter_name=name)
    model.eval()
    return result


def dpsgd_state(
    base: torch.nn.Module,
    name: str,
    data: torch.Tensor,
    lora: LoraSpec,
    *,
    epsilon: float,
    delta: float,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    seed: int,
    progress: object | None = None,
) -> tuple[dict, DpsgdResult]:
    """(LoRA state dict, run record) of an adapter trained with Opacus DP-SGD at (ε, δ) on the bare
    ``base`` (which gains the LoRA layers).

    Record level (one block is one record), Poisson sampling with expected batch ``batch_size``,
    noise calibrated with dp-accounting for ``epochs`` (:func:`noise_for_epsilon`); an empty
    Poisson batch skips the forward, gets a zero-size ``grad_sample`` and still takes a
    (noise-only) step. ``progress(step, expected)`` is called after every step.
    """
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    work = get_peft_model(base, lora.config(base), adapter_name=name)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data),
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    params = [p for p in work.parameters() if p.requires_grad]
    sigma = noise_for_epsilon(epsilon, delta, 1 / len(loader), epochs * len(loader))
    engine = PrivacyEngine(accountant="rdp")
    dp_model, opt, dp_loader = engine.make_private(
        module=work,
        optimizer=torch.optim.SGD(params, lr=lr),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=torch.Generator().manual_seed(seed + 1),
    )
    positions = torch.arange(data.shape[1])
    empty = steps = 0
    dp_model.train()
    for _ in range(epochs):
        for (x,) in dp_loader:
            opt.zero_grad(set_to_none=True)
            if len(x) == 0:
                empty += 1
                for p in params:
                    p.grad_sample = torch.zeros(0, *p.shape)
            else:
                out = dp_model(input_ids=x, labels=x, position_ids=positions.repeat(len(x), 1))
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"DP-SGD loss is {out.loss.item()} at step {steps}.")
                out.loss.backward()
            opt.step()
            steps += 1
            if progress is not None:
                progress(steps, epochs * len(loader))
    state = get_peft_model_state_dict(work, adapter_name=name)
    hist = tuple((float(s), float(q), int(n)) for s, q, n in engine.accountant.history)
    return state, DpsgdResult(
        float(opt.noise_multiplier),
        float(dp_loader.sample_rate),
        steps,
        empty,
        max_grad_norm,
        hist,
        float(engine.get_epsilon(delta)),
    )


def spec_dict(*specs: object) -> dict:
    """The specs as one JSON-able dict (artefacts carry their config)."""
    return {type(s).__name__: asdict(s) for s in specs}

"""Canaries and their insertion draws (AUDIT.md §4); every draw from an explicit, recorded seed.

* :func:`model_canaries`: m records sampled from the public model at temperature 1, one training
  block each (after Mitchell et al. 2026's model-generated canaries). Fresh samples were never
  trained on, and they are natural enough for a fine-tune to memorise: on the demo's model a
  LoRA fine-tune learned nothing specific about uniformly random blocks in 19 passes (loss fell to
  log V for members and non-members alike, AUC 0.51), while public-model samples gave AUC 0.97.
* :func:`random_canaries`: m records of uniformly random tokens (the exposure-style secret space).
* :func:`poisson_inclusion`: S_i ∈ {−1, +1} i.i.d. uniform, canary i in the training data iff
  S_i = +1: the one-run audit's design (Steinke, Nasr, Jagielski 2023).
* :func:`canary_block` and :func:`retrain_with_canaries`: PMixED's canaries go into ONE partition.
  A canary is a fixed-format record (a public prompt and a secret slot) repeated to fill a block; a
  canary user contributes ``copies`` such blocks; the member of that partition is retrained with
  them, with exactly the recipe that trained it (:class:`MemberRecipe`), so retraining without
  them reproduces the deployed member bit for bit.

The seeds are derived from named paths of one root (``SeedSequence`` spawn keys from a stable hash of
the path), so adding a consumer does not shift the others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from pmixed.train import LoraSpec, TrainSpec, train_member

__all__ = [
    "MemberRecipe",
    "canary_block",
    "child_rng",
    "drop_adapter",
    "model_canaries",
    "poisson_inclusion",
    "random_canaries",
    "retrain_with_canaries",
]


def child_rng(root: int, path: str) -> np.random.Generator:
    """A generator for ``path`` (e.g. ``"canary/draw"``) under the root seed ``root``."""
    key = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence(root, spawn_key=(key,)))


@torch.no_grad()
def model_canaries(
    model: torch.nn.Module,
    m: int,
    length: int,
    rng: np.random.Generator,
    *,
    first_token_range: tuple[int, int],
    batch_size: int = 500,
) -> torch.Tensor:
    """``[m, length]`` blocks sampled from the public model (adapters off), temperature 1.

    Each sample starts from a uniform first token in ``first_token_range``; the draws come from a
    ``torch.Generator`` seeded from ``rng``.
    """
    if m < 1 or length < 2:
        raise ValueError(f"m must be >= 1 and length >= 2. Found m={m}, length={length}.")
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    out = []
    with model.disable_adapter():
        for start in range(0, m, batch_size):
            ids = torch.randint(*first_token_range, (min(batch_size, m - start), 1), generator=g)
            step = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            seq = [ids]
            for _ in range(length - 1):
                probs = torch.softmax(step.logits[:, -1].double(), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=g)
                seq.append(nxt)
                step = model(input_ids=nxt, cache=step.cache, use_cache=True, logits_to_keep=1)
            out.append(torch.cat(seq, dim=1))
    return torch.cat(out)


def random_canaries(
    m: int, length: int, vocab: int, rng: np.random.Generator, *, reserved: int = 1
) -> torch.Tensor:
    """``[m, length]`` token ids uniform on [reserved, vocab): id 0 (EOS/padding) is never drawn."""
    if m < 1 or length < 2:
        raise ValueError(f"m must be >= 1 and length >= 2. Found m={m}, length={length}.")
    if not 0 <= reserved < vocab:
        raise ValueError(f"reserved must be in [0, {vocab}). Found {reserved}.")
    return torch.from_numpy(rng.integers(reserved, vocab, size=(m, length), dtype=np.int64))


def poisson_inclusion(m: int, rng: np.random.Generator) -> np.ndarray:
    """S ∈ {−1, +1}^m, each +1 with probability ½ independently (+1: the canary is trained on)."""
    if m < 1:
        raise ValueError(f"m must be >= 1. Found {m}.")
    return np.where(rng.random(m) < 0.5, 1, -1).astype(np.int8)


@dataclass(frozen=True)
class MemberRecipe:
    """How the deployment trained its members: LoRA settings, training spec and seed."""

    lora: LoraSpec
    spec: TrainSpec
    seed: int


def canary_block(pattern: list[int], length: int) -> torch.Tensor:
    """``[length]`` ids: ``pattern`` (prompt ids then secret ids) repeated, cut at ``length``."""
    if not pattern or length < 2:
        raise ValueError(
            f"pattern must be non-empty and length >= 2. Found {len(pattern)}, {length}."
        )
    return torch.tensor((pattern * (length // len(pattern) + 1))[:length])


def retrain_with_canaries(
    model,
    name: str,
    index: int,
    partition: torch.Tensor,
    block: torch.Tensor,
    copies: int,
    recipe: MemberRecipe,
):
    """Adapter ``name``: member ``index`` retrained on ``partition`` plus ``copies`` canary blocks."""
    if copies < 0 or partition.ndim != 2 or block.shape != partition.shape[1:]:
        raise ValueError(
            f"copies must be >= 0 and block must have shape {tuple(partition.shape[1:])}. "
            f"Found {copies}, {tuple(block.shape)}."
        )
    data = torch.cat([partition, block.repeat(copies, 1)])
    return train_member(model, name, index, data, recipe.lora, recipe.spec, recipe.seed)


def drop_adapter(model, name: str) -> None:
    """Deletes audit adapter ``name``, first making another adapter active if it was (peft warns
    otherwise and picks one itself)."""
    if name == model.active_adapter:
        model.set_adapter(next(n for n in model.peft_config if n != name))
    model.delete_adapter(name)

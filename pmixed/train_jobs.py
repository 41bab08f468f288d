"""Training jobs for an executor (:mod:`pmixed.executor`): each loads the public base from the run
directory, trains one adapter and writes its LoRA weights to one safetensors file.

Each job seeds itself exactly as the in-process training does (:func:`pmixed.train.train_member`,
:func:`~pmixed.train.add_trained_adapter`, :func:`~pmixed.train.dpsgd_state`), so a member
trained here, under Ray, or as adapter i of one shared model has the same weights: adapters on a
frozen base do not interact, and each starts from ``torch.manual_seed`` of its own seed.
"""

from __future__ import annotations

import hashlib
import os

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save

from accounting.files import write_bytes
from pmixed.train import (
    DpsgdResult,
    LoraSpec,
    TrainSpec,
    add_trained_adapter,
    dpsgd_state,
    train_member,
)

__all__ = ["dpsgd_job", "finetune_job", "member_job"]


def _base(public_dir: str | os.PathLike) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(public_dir, local_files_only=True).eval()


def _write(state: dict, out: str | os.PathLike) -> str:
    """Writes ``state`` to ``out`` (whole: a temporary name, then a rename); returns its SHA-256."""
    data = save(state)
    write_bytes(out, data)
    return hashlib.sha256(data).hexdigest()


def member_job(
    public_dir,
    name: str,
    index: int,
    data: torch.Tensor,
    lora: LoraSpec,
    spec: TrainSpec,
    seed: int,
    out,
) -> str:
    """Member ``index`` (adapter ``name``) trained on its partition ``data``; its file's digest."""
    model = train_member(_base(public_dir), name, index, data, lora, spec, seed)
    return _write(get_peft_model_state_dict(model, adapter_name=name), out)


def finetune_job(
    public_dir, name: str, data: torch.Tensor, lora: LoraSpec, spec: TrainSpec, seed: int, out
) -> str:
    """A non-private adapter trained on ``data``; its file's digest."""
    model = add_trained_adapter(_base(public_dir), name, data, lora, spec, seed)
    return _write(get_peft_model_state_dict(model, adapter_name=name), out)


def dpsgd_job(
    public_dir, name: str, data: torch.Tensor, lora: LoraSpec, out, settings: dict
) -> DpsgdResult:
    """An Opacus DP-SGD adapter (``settings``: :func:`~pmixed.train.dpsgd_state`'s keywords);
    its run record."""
    state, result = dpsgd_state(_base(public_dir), name, data, lora, **settings)
    _write(state, out)
    return result

"""Any Hugging Face causal LM as the public base, and its LoRA members, from local folders.

Nothing here assumes GPT-2: the context length comes from the config (``max_position_embeddings``,
which GPT-2's config maps to ``n_positions``) or else the tokenizer's ``model_max_length``; the LoRA
target modules are the user's, or peft's per-architecture default for the config's ``model_type``;
``fan_in_fan_out`` follows the targeted layers' type (GPT-2's ``Conv1D`` stores its weight
transposed). Models load through ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoTokenizer``
with ``local_files_only``: a deployment never reaches a hub.

A member folder is peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``),
one folder per member; members are the folder's sub-folders in name order, or in the order of
``members.json`` beside them, which also makes a missing or extra member an error. ``base.json``
fingerprints the base they were trained on, so adapters loaded onto another base are refused even
where every tensor shape happens to fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "BackendError",
    "base_fingerprint",
    "context_length",
    "load_adapters",
    "load_base",
    "lora_config",
    "lora_targets",
    "save_adapters",
]

#: Written beside the adapter folders: the fingerprint of the base they were trained on.
BASE_FILE = "base.json"
#: Written beside the adapter folders: the member names, in member order.
MEMBERS_FILE = "members.json"
#: ``model_max_length`` above this is transformers' "unknown" sentinel, not a real limit.
_UNKNOWN_LENGTH = 10**9


class BackendError(ValueError):
    """A model or adapter folder that cannot serve as a deployment (one line, names the input)."""


def context_length(config: object, tokenizer: object | None = None) -> int:
    """The number of positions the model accepts: the config's ``max_position_embeddings``, else
    the tokenizer's ``model_max_length``."""
    n = getattr(config, "max_position_embeddings", None)
    if n is None and tokenizer is not None:
        m = getattr(tokenizer, "model_max_length", None)
        n = m if m is not None and m < _UNKNOWN_LENGTH else None
    if n is None or int(n) < 2:
        kind = getattr(config, "model_type", type(config).__name__)
        raise BackendError(
            f"the {kind} config has no max_position_embeddings and the tokenizer "
            "no model_max_length: cannot bound a prompt."
        )
    return int(n)


def lora_targets(model: torch.nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """``names`` if given (each must match a module of ``model``), else peft's default targets for
    the model's architecture."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    kind = getattr(model.config, "model_type", None)
    if names is None:
        names = DEFAULTS.get(kind)
        if not names:
            raise BackendError(
                f"peft has no default LoRA targets for model_type {kind!r}: "
                "name them (--lora-targets, LoraSpec.target_modules)."
            )
    suffixes = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [n for n in names if n not in suffixes]
    if unknown:
        raise BackendError(
            f"--lora-targets {','.join(unknown)} match no module of the {kind} model."
        )
    return list(names)


def lora_config(
    model: torch.nn.Module,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str] | None,
):
    """peft's ``LoraConfig`` for ``model``: resolved targets, ``fan_in_fan_out`` from their type."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model, target_modules)
    # A module that already carries LoRA (a PeftModel gaining an adapter) wraps the original.
    kinds = {
        type(getattr(m, "base_layer", m))
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in targets
    }
    if Conv1D in kinds and len(kinds) > 1:
        raise BackendError(f"LoRA targets {targets} mix Conv1D and other layers: name one kind.")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        fan_in_fan_out=Conv1D in kinds,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_base(path: str | os.PathLike) -> tuple[object, torch.nn.Module]:
    """(tokenizer, model) of a local model folder (``save_pretrained`` of both), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise BackendError(f"--base {folder} is not a model folder (no config.json).")
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BackendError(f"--base {folder} has no loadable tokenizer: {_first_line(e)}") from e
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    if tok.pad_token_id is None and tok.eos_token_id is None:
        raise BackendError(f"--base {folder}: the tokenizer has neither a pad nor an eos token.")
    if len(tok) > model.config.vocab_size:
        raise BackendError(
            f"--base {folder}: the tokenizer has {len(tok)} tokens, the model "
            f"{model.config.vocab_size}."
        )
    context_length(model.config, tok)  # refuse a model whose prompts cannot be bounded
    return tok, model


def save_adapters(
    model: torch.nn.Module,
    names: Sequence[str],
    folder: str | os.PathLike,
    *,
    extra: dict[str, str] | None = None,
) -> None:
    """Each adapter of ``names`` as ``folder/<name>/`` in peft's format (+ ``extra`` text files by
    name); ``folder`` appears whole (written beside it, then renamed) and must not exist yet."""
    folder = Path(folder)
    if folder.exists():
        raise BackendError(f"{folder} exists: adapters are never overwritten.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        for name in names:
            model.save_pretrained(tmp / ".peft", selected_adapters=[name])
            # peft writes the adapter named "default" at the top, any other under its name.
            src = tmp / ".peft" / name
            if src.is_dir():
                src.rename(tmp / name)
            else:
                _move_top(tmp / ".peft", tmp / name)
            shutil.rmtree(tmp / ".peft", ignore_errors=True)
        (tmp / BASE_FILE).write_text(json.dumps(base_fingerprint(model), indent=2) + "\n")
        (tmp / MEMBERS_FILE).write_text(json.dumps(list(names)) + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def base_fingerprint(model: torch.nn.Module) -> dict:
    """What identifies the base an adapter was trained on: the architecture, the vocabulary and a
    SHA-256 over every base parameter's name, shape and first 1024 values (cheap at any size;
    two different bases, or a base and its fine-tune, differ in it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    h = hashlib.sha256()
    for name, p in sorted(base.named_parameters()):
        if "lora_" in name:
            continue
        head = p.detach().reshape(-1)[:1024].to("cpu", torch.float64).numpy()
        h.update(name.replace(".base_layer", "").encode() + str(tuple(p.shape)).encode())
        h.update(head.tobytes())
    cfg = base.config
    return {
        "model_type": getattr(cfg, "model_type", None),
        "vocab_size": int(cfg.vocab_size),
        "sha256": h.hexdigest(),
    }


def _move_top(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (src / f).rename(dst / f)


def load_adapters(base: torch.nn.Module, folder: str | os.PathLike) -> tuple[object, list[str]]:
    """(peft model, member names) with every adapter folder under ``folder`` on ``base``.

    Checked before anything is returned: at least one adapter, each a peft LoRA folder whose
    tensors fit the base (an adapter trained on another base fails here, by name).
    """
    from peft import PeftModel

    folder = Path(folder)
    names = (
        sorted(p.name for p in folder.iterdir() if (p / "adapter_config.json").is_file())
        if folder.is_dir()
        else []
    )
    if not names:
        raise BackendError(
            f"--adapters {folder} holds no peft adapter folder (<name>/adapter_config.json)."
        )
    kind = getattr(base.config, "model_type", None)
    if (folder / MEMBERS_FILE).is_file():
        listed = json.loads((folder / MEMBERS_FILE).read_text())
        missing = [m for m in listed if m not in names]
        if missing or len(names) != len(listed):
            raise BackendError(
                f"--adapters {folder} lists {len(listed)} members in "
                f"{MEMBERS_FILE} and holds {len(names)}: missing "
                f"{missing or 'none'}, extra "
                f"{[n for n in names if n not in listed] or 'none'}."
            )
        names = list(listed)
    if (folder / BASE_FILE).is_file():
        want, have = json.loads((folder / BASE_FILE).read_text()), base_fingerprint(base)
        if want != have:
            a, b = ([d["model_type"], d["vocab_size"], d["sha256"][:12]] for d in (want, have))
            raise BackendError(
                f"--adapters {folder} was trained on another base ({a}; --base is {b})."
            )
    model = None
    for name in names:
        meta = json.loads((folder / name / "adapter_config.json").read_text())
        if meta.get("peft_type") != "LORA":
            raise BackendError(f"--adapters {folder / name} is {meta.get('peft_type')}, not LoRA.")
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, folder / name, adapter_name=name)
            else:
                model.load_adapter(folder / name, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise BackendError(
                f"--adapters {folder / name} does not fit the {kind} base: {_first_line(e)}"
            ) from e
    return model.eval(), names


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

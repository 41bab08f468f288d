"""The campaign's configuration: one validated, versioned value that serialises and reloads.

:class:`CampaignConfig` is everything the campaign depends on (hashed into the stage keys): the
data split, the public model (:class:`~pmixed.train.ModelSpec`), the LoRA members
(:class:`~pmixed.train.LoraSpec`), the fine-tune and DP-SGD baselines, the PMixED deployment
(q, T, ε, δ) and the audit's sizes. It is checked at construction (every problem at once, each
naming its field), written to ``config.json`` as ``"demo"`` by :meth:`~CampaignConfig.to_dict`
and read back by :meth:`~CampaignConfig.from_dict`, which rebuilds the nested specs and refuses
unknown fields and versions.

Version 1 is the layout written since the first release, which carries no version field (its
absence means 1); a later layout writes ``"version"`` and :meth:`from_dict` migrates or refuses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar

from accounting.checks import finite, is_int
from pmixed import PMixEDConfig
from pmixed.train import GPT2_TARGETS, LoraSpec, ModelSpec

__all__ = ["FULL", "QUICK", "CampaignConfig"]

_POSITIVE_INTS = (
    "public_steps",
    "n_members",
    "member_steps",
    "member_batch",
    "finetune_steps",
    "dpsgd_epochs",
    "dpsgd_batch",
    "query_budget",
    "realized_runs",
    "audit_contexts",
    "audit_control_steps",
    "audit_canaries",
    "audit_search_starts",
)
_POSITIVE_REALS = ("member_lr", "dpsgd_lr", "dpsgd_clip", "epsilon")
_PATHS = ("public_dir", "private_jsonl", "base")


@dataclass(frozen=True)
class CampaignConfig:
    """Everything the campaign depends on (hashed into the stage keys); see the module docstring."""

    VERSION: ClassVar[int] = 1

    seed: int = 0
    salt: str = "pmixed-demo-v1"
    heldout_fraction: float = 0.1
    model: ModelSpec = field(default_factory=lambda: ModelSpec(vocab_size=2048, block_size=128))
    public_steps: int = 600
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(target_modules=GPT2_TARGETS))
    n_members: int = 32
    member_steps: int = 30
    member_batch: int = 8
    member_lr: float = 3e-3
    finetune_steps: int = 300
    dpsgd_epochs: int = 1
    dpsgd_batch: int = 64
    dpsgd_lr: float = 0.5
    dpsgd_clip: float = 1.0
    sampling_rate: float = 0.05
    query_budget: int = 1024
    epsilon: float = 8.0
    delta: float = 1e-5
    realized_runs: int = 4
    audit_contexts: int = 128
    audit_control_steps: int = 300
    audit_canaries: int = 1000
    audit_search_starts: int = 150
    max_private_records: int | None = None
    public_dir: str | None = None
    private_jsonl: str | None = None
    #: A base model folder of the user's own (``save_pretrained``): its tokenizer and weights are
    #: the public side, replacing the tokenizer and public-model stages (``pmixed train --base``).
    base: str | None = None

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("campaign config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        """The JSON form (``config.json``'s ``"demo"``): nested specs as objects."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CampaignConfig:
        """The config a :meth:`to_dict` wrote (validated again)."""
        if not isinstance(d, dict):
            raise ValueError(f"campaign config must be a JSON object. Found {type(d).__name__}.")
        d = dict(d)
        version = d.pop("version", 1)
        if version != cls.VERSION:
            raise ValueError(
                f"campaign config version {version!r} is not supported (this "
                f"library reads version {cls.VERSION})."
            )
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"campaign config: unknown fields {unknown}.")
        if isinstance(d.get("model"), dict):
            d["model"] = ModelSpec(**d["model"])
        if isinstance(d.get("lora"), dict):
            d["lora"] = LoraSpec.from_dict(d["lora"])
        return cls(**d)

    def deployment(self, **overrides: object) -> PMixEDConfig:
        """The PMixED deployment of this campaign (certified, add_remove unless overridden)."""
        common = dict(
            n_members=self.n_members,
            sampling_rate=self.sampling_rate,
            epsilon=self.epsilon,
            delta=self.delta,
            query_budget=self.query_budget,
        )
        return PMixEDConfig(**{**common, **overrides})


def _problems(c: CampaignConfig) -> list[str]:
    p = []
    for name in _POSITIVE_INTS:
        v = getattr(c, name)
        if not is_int(v) or v < 1:
            p.append(f"{name} must be an integer >= 1. Found {v!r}.")
    for name in _POSITIVE_REALS:
        v = getattr(c, name)
        if not finite(v) or v <= 0:
            p.append(f"{name} must be finite and > 0. Found {v!r}.")
    if not is_int(c.seed) or c.seed < 0:
        p.append(f"seed must be an integer >= 0. Found {c.seed!r}.")
    if not isinstance(c.salt, str) or not c.salt:
        p.append(f"salt must be a non-empty string. Found {c.salt!r}.")
    if not finite(c.heldout_fraction) or not 0 < c.heldout_fraction < 1:
        p.append(f"heldout_fraction must be in (0, 1). Found {c.heldout_fraction!r}.")
    if not finite(c.sampling_rate) or not 0 < c.sampling_rate <= 1:
        p.append(f"sampling_rate must be in (0, 1]. Found {c.sampling_rate!r}.")
    if not finite(c.delta) or not 0 < c.delta < 1:
        p.append(f"delta must be in (0, 1). Found {c.delta!r}.")
    if c.max_private_records is not None and (
        not is_int(c.max_private_records) or c.max_private_records < 1
    ):
        p.append(
            f"max_private_records must be None or an integer >= 1. Found {c.max_private_records!r}."
        )
    for name in _PATHS:
        v = getattr(c, name)
        if v is not None and (not isinstance(v, str) or not v):
            p.append(f"{name} must be None or a path string. Found {v!r}.")
    if not isinstance(c.model, ModelSpec):
        p.append(f"model must be a ModelSpec. Found {type(c.model).__name__}.")
    else:
        m = c.model
        if not all(is_int(getattr(m, f.name)) and getattr(m, f.name) >= 1 for f in fields(m)):
            p.append(f"model sizes must be integers >= 1. Found {m!r}.")
        elif m.n_embd % m.n_head:
            p.append(f"model.n_embd must be a multiple of model.n_head. Found {m!r}.")
    if not isinstance(c.lora, LoraSpec):
        p.append(f"lora must be a LoraSpec. Found {type(c.lora).__name__}.")
    return p


FULL = CampaignConfig()
QUICK = replace(
    FULL,
    model=ModelSpec(vocab_size=1024, block_size=64, n_embd=64, n_layer=2, n_head=2),
    public_steps=150,
    n_members=8,
    member_steps=10,
    finetune_steps=60,
    dpsgd_batch=32,
    sampling_rate=0.1,
    query_budget=64,
    max_private_records=4000,
    audit_control_steps=600,
    audit_canaries=250,
)

"""The smallest demo configuration: every stage of the campaign in well under a minute."""

from __future__ import annotations

from dataclasses import replace

from campaign.config import QUICK
from pmixed.train import ModelSpec

TINY = replace(
    QUICK,
    model=ModelSpec(vocab_size=300, block_size=32, n_embd=32, n_layer=1, n_head=2),
    public_steps=4,
    n_members=4,
    member_steps=2,
    finetune_steps=2,
    dpsgd_batch=64,
    sampling_rate=0.2,
    query_budget=16,
    realized_runs=2,
    max_private_records=600,
    audit_search_starts=12,
)


def quiet(name, total):
    return lambda done: None

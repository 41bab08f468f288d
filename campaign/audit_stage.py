"""The campaign's audit stage: runs ``audit.audit_models`` on a trained, evaluated run and writes

* ``DIR/audit.json``: the public result (bounds, risk metrics, controls, alarms), and
* ``DIR/audit.restricted.json`` (mode 0600): which member was audited, per-order divergence sums and
  raw per-example scores; derived from private data and not covered by the guarantee.

Cached by a key over the evaluation's key and the plan, like the other stages.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from audit.canaries import MemberRecipe
from audit.context import AuditPlan
from audit.runner import AUDIT_SCHEMA, audit_models
from audit.targets import AuditTarget
from reports.rundir import AUDIT, AUDIT_RESTRICTED, RunDir

__all__ = ["run_audit_stage"]


def run_audit_stage(
    out: Path,
    eval_key: str,
    model: torch.nn.Module,
    targets: Sequence[AuditTarget],
    train_blocks: torch.Tensor,
    held_blocks: torch.Tensor,
    plan: AuditPlan,
    progress: Callable[[str, int], Callable[[int], None]],
    dpsgd: Mapping,
    tokenizer,
    partitions: Sequence[torch.Tensor],
    recipe: MemberRecipe,
    *,
    base: Path,
    executor: object | None = None,
) -> dict:
    """The public audit result, computed or read back from the run's ``audit.json``; ``base`` is the
    public model's folder and ``executor`` runs the DP-SGD audit's training (neither changes the
    result, so neither is in its key). The targets' calibrations follow from the evaluation's
    configs (in ``eval_key``); their names, kinds, models and claims are keyed here."""
    settings = {k: asdict(v) if is_dataclass(v) else v for k, v in dpsgd.items()}
    described = [t.key() for t in targets]
    key = hashlib.sha256(
        json.dumps(
            [eval_key, asdict(plan), settings, asdict(recipe), described, AUDIT_SCHEMA]
        ).encode()
    ).hexdigest()
    run = RunDir(out)
    if (run / AUDIT).exists() and (run / AUDIT_RESTRICTED).exists():
        cached = run.read_json(AUDIT)
        if cached.get("hash") == key:
            return cached
    result = audit_models(
        model,
        targets,
        train_blocks,
        held_blocks,
        plan,
        progress,
        dpsgd=dpsgd,
        tokenizer=tokenizer,
        partitions=partitions,
        recipe=recipe,
        base=base,
        executor=executor,
    )
    public = {"hash": key, **result.to_json()}
    run.write_json(AUDIT_RESTRICTED, result.restricted_json(), private=True)
    run.write_json(AUDIT, public)
    return public

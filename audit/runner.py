"""The audit of a trained run: each target audited by its registered kind, then the controls.

:func:`audit_models` receives loaded models and typed targets (:class:`audit.targets.AuditTarget`;
the campaign loads the run and writes the files) and returns a frozen
:class:`audit.results.AuditResult`: ``to_json()`` is the public result (aggregates, bounds,
controls, alarms), ``restricted_json()`` the restricted annex (which member was audited, the
canary token, per-order divergence sums, raw per-example scores), which derives from private data
and is not covered by the guarantee.

What this version audits (the kinds are in :mod:`audit.kinds`, the shared signals in
:mod:`audit.context`):

* the canary: member j (the one farthest from the public model over the held-out contexts) is
  retrained on its partition plus a canary user's blocks with the deployment's own recipe
  (:func:`audit.game.plant_canary`), and a poisoned member is trained on the canary user's
  records only;
* every ``pmixed`` target: exact pairs, conformance, worst cases; the ``black_box`` one also the
  black-box game and the exposure of random secrets through the real ``PrivateGenerator``;
* every ``lm`` target (the public model, the non-private fine-tune, DP-SGD): the plan's attacks on
  training blocks against held-out blocks: risk metrics only;
* DP-SGD with Poisson(1/2)-included canaries and the non-private positive control on the same
  canaries, scored by the reference attack and offline LiRA with shadow models
  (:func:`audit.dpsgd.start_canary_runs`, then
  :func:`~audit.dpsgd.finish_canary_audit`): the one-run bound, AUC and TPR at low FPR;
* controls C1-C3 on synthetic arrays, C3-lm and C3-exposure on the real models.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from audit import kinds as _kinds  # noqa: F401  (registers the "pmixed" and "lm" kinds)
from audit.canaries import MemberRecipe
from audit.context import AuditContext, AuditPlan
from audit.controls import identical_worlds, non_private, randomized_response
from audit.exposure import synthetic_control
from audit.results import AuditResult
from audit.targets import KINDS, AuditTarget, check_targets

__all__ = ["AUDIT_SCHEMA", "STATEMENT", "audit_models"]

AUDIT_SCHEMA = 7
STATEMENT = "audits give lower bounds and cannot certify differential privacy"


def audit_models(
    model: torch.nn.Module,
    targets: Sequence[AuditTarget],
    train_blocks: torch.Tensor,
    held_blocks: torch.Tensor,
    plan: AuditPlan,
    progress: Callable[[str, int], Callable[[int], None]],
    *,
    partitions: Sequence[torch.Tensor],
    recipe: MemberRecipe,
    tokenizer,
    dpsgd: dict | None = None,
    base: str | os.PathLike | None = None,
    executor: object | None = None,
) -> AuditResult:
    """The audit of one trained run: every target by its kind, in order, then the controls.

    Work that needs nothing from the other targets starts first on ``executor``: the DP-SGD
    canary audit's trainings, then each kind's ``start`` hook (the PMixED exact evidence), so that
    an executor with background workers runs it beside the targets' own audits.

    ``partitions``: each member's training blocks, and ``recipe`` how the members were trained (the
    canary member is retrained with them). ``dpsgd``: the demo's DP-SGD settings (``lora``,
    ``epsilon``, ``delta``, ``batch_size``, ``lr``, ``max_grad_norm``, ``vocab``) for the canary
    audit, whose training runs load the public model from the folder ``base`` and run on
    ``executor`` (default local); None skips it. Every input is checked before any work.
    """
    check_targets(targets)
    ctx = AuditContext(
        model,
        targets,
        plan,
        progress,
        train_blocks=train_blocks,
        held_blocks=held_blocks,
        partitions=partitions,
        recipe=recipe,
        tokenizer=tokenizer,
        dpsgd=dpsgd,
        base=base,
        executor=executor,
    )
    mechanisms, restricted = {}, {}
    try:
        ctx.start_canary_runs()  # background work first (the docstring says why)
        for t in targets:
            if KINDS[t.kind].start is not None:
                KINDS[t.kind].start(t, ctx)
        for t in targets:
            mechanisms[t.name], restricted[t.name] = KINDS[t.kind].audit(t, ctx)
        controls = [
            identical_worlds(1000, delta=1e-5, seed=plan.seed),
            randomized_response(1.0, 10_000, delta=1e-5, seed=plan.seed),
            non_private(1000, delta=1e-5, seed=plan.seed),
        ]
        if ctx.canary_audit is not None:
            lb = ctx.canary_audit["audit-finetuned"]["one_run"]["epsilon_lb"]
            controls.append(
                {
                    "id": "C3-lm",
                    "name": "non-private fine-tune with canaries (one-run)",
                    "expected": "epsilon_lb >= 1",
                    "epsilon_lb": lb,
                    "passed": lb >= 1.0,
                }
            )
        controls.append(synthetic_control(plan.exposure, delta=1e-5, seed=plan.seed))
    finally:
        ctx.close()
    return AuditResult(
        schema=AUDIT_SCHEMA,
        statement=STATEMENT,
        plan={**asdict(plan), "member_choice": "largest mean KL from the public model"},
        mechanisms=mechanisms,
        controls=tuple(controls),
        restricted={"schema": AUDIT_SCHEMA, **ctx.restricted, **restricted},
    )

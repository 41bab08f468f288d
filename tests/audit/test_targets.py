"""Typed audit targets: a new attack or a new kind of mechanism is one registration.

The runner is driven with real models (the tiny GPT-2 ensemble with LoRA members): a test-local
attack named in the plan, and a test-local kind, reach ``audit.json``'s content without a line
changed in the runner, the report builder or the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

from audit.attacks import ATTACKS, loss, register
from audit.canaries import MemberRecipe
from audit.context import AuditPlan
from audit.results import AuditResult, RiskAudit
from audit.runner import AUDIT_SCHEMA, audit_models
from audit.targets import KINDS, AuditTarget, Claim, check_targets, register_kind
from pmixed import PMixEDConfig
from pmixed.executor import Job
from pmixed.train import TrainSpec, blocks
from tests.pmixed import tiny

NO_CLAIM = Claim(None, None, "n/a", "none", "none", False)
CLAIM = Claim(2.0, 1e-5, "add_remove", "one block", "test accountant", True)
PLAN = AuditPlan(mia_blocks=6, bootstrap=20)
CAL = PMixEDConfig(
    n_members=1, sampling_rate=0.5, epsilon=8.0, delta=1e-5, query_budget=8
).calibrate()


@pytest.fixture(scope="module")
def run():
    tok = tiny.tokenizer()
    model = tiny.ensemble(tok)
    train = blocks(tiny.PRIVATE[0] + tiny.PRIVATE[1], tok, 16)[:6]
    held = blocks(tiny.PUBLIC, tok, 16)[:6]
    return model, tok, train, held


def _audit(run, targets, plan=PLAN):
    model, tok, train, held = run
    recipe = MemberRecipe(tiny.LORA, TrainSpec(steps=1, batch_size=2), 0)
    return audit_models(
        model,
        targets,
        train,
        held,
        plan,
        lambda name, total: lambda done: None,
        partitions=[],
        recipe=recipe,
        tokenizer=tok,
    )


@pytest.fixture
def top_token_attack():
    """A test-local attack: the best-predicted token's log-prob (members are predicted better)."""
    register("top_token")(lambda target, *, mask=None: np.asarray(target).max(axis=-1))
    yield "top_token"
    ATTACKS.pop("top_token")


def test_a_new_attack_is_one_registration_and_its_name_in_the_plan(run, top_token_attack):
    with pytest.raises(ValueError, match="other than schema, member"):
        AuditTarget("member", "lm", "member-00", NO_CLAIM)  # a key of the restricted annex
    targets = [
        AuditTarget("public", "lm", None, NO_CLAIM),
        AuditTarget("member_00", "lm", "member-00", NO_CLAIM),
    ]
    check_targets(targets)
    plan = dataclasses.replace(PLAN, attacks=("loss", "reference", top_token_attack))
    result = _audit(run, targets, plan)
    public = result.to_json()
    assert public["plan"]["attacks"] == ["loss", "reference", "top_token"]
    assert set(public["mechanisms"]["member_00"]["risk"]) == {"loss", "reference", "top_token"}
    # the public model is its own reference: that attack is identically 0 there, so it is left out
    assert set(public["mechanisms"]["public"]["risk"]) == {"loss", "top_token"}
    annex = result.restricted_json()
    assert annex["schema"] == AUDIT_SCHEMA and set(annex["member_00"]["top_token"]) == {"in", "out"}
    # the registered attack scored the member adapter's own log-probs, not the public model's
    assert annex["member_00"]["loss"]["in"] != annex["public"]["loss"]["in"]
    assert "top_token" not in str(public["alarms"]) and public["alarms"] == []


def test_unknown_attacks_are_refused_when_the_plan_is_made():
    with pytest.raises(ValueError, match="'nope' is not a registered attack; registered: .*loss"):
        AuditPlan(attacks=("loss", "nope"))
    with pytest.raises(ValueError, match="at least one attack"):
        AuditPlan(attacks="loss")


@dataclass(frozen=True)
class _Threshold:
    """A test-local kind's result: the loss attack's mean in-minus-out gap against a limit."""

    gap: float
    alarms: tuple = ()

    def to_json(self) -> dict:
        return {"gap": self.gap, "alarms": list(self.alarms)}


@pytest.fixture
def threshold_kind():
    @register_kind("threshold", calibrated=False)
    def audit_threshold(target, ctx):
        train, held = ctx.membership_blocks
        from audit.signals import block_logprobs

        gap = float(
            loss(block_logprobs(ctx.model, target.model, train)).mean()
            - loss(block_logprobs(ctx.model, target.model, held)).mean()
        )
        found = () if gap <= 0.0 else ({"bound": "gap", "message": f"gap {gap:.3g} > 0"},)
        return _Threshold(gap, found), {"gap": gap}

    yield "threshold"
    KINDS.pop("threshold")


def test_a_new_kind_is_one_registration_and_its_alarms_reach_the_result(run, threshold_kind):
    targets = [
        AuditTarget("public", "lm", None, NO_CLAIM),
        AuditTarget("member_00_gap", threshold_kind, "member-00", CLAIM),
    ]
    result = _audit(run, targets)
    public = result.to_json()
    assert list(public["mechanisms"]) == ["public", "member_00_gap"]
    gap = public["mechanisms"]["member_00_gap"]["gap"]
    assert result.restricted_json()["member_00_gap"] == {"gap": gap}
    # member-00 trained on PRIVATE[0], which the "training" blocks hold: it fits them better
    assert gap > 0 and public["alarms"] == [
        {"bound": "gap", "message": f"gap {gap:.3g} > 0", "mechanism": "member_00_gap"}
    ]
    assert public["controls_passed"] is True and len(public["controls"]) == 4


CALLS: list[tuple[str, str]] = []


def _record(name: str) -> str:
    """A job of the test-local ``started`` kind (module level: a worker process imports it)."""
    CALLS.append(("job", name))
    return name.upper()


@pytest.fixture
def started_kind():
    """A test-local kind whose ``start`` hook submits one job per target; ``audit`` collects it
    (a target whose model is "fail" fails its audit first)."""

    def start(target, ctx):
        CALLS.append(("start", target.name))
        ctx.submit(f"started/{target.name}", [Job(_record, (target.name,))])

    @register_kind("started", calibrated=False, start=start)
    def audit_started(target, ctx):
        CALLS.append(("audit", target.name))
        if target.model == "fail":
            raise RuntimeError(f"{target.name} failed")
        [value] = ctx.collect(f"started/{target.name}")
        return _Threshold(0.0), {"value": value}

    CALLS.clear()
    yield "started"
    KINDS.pop("started")


def test_start_hooks_run_for_every_target_before_any_audit_collects(run, started_kind):
    targets = [AuditTarget(n, started_kind, None, NO_CLAIM) for n in ("a", "b")]
    result = _audit(run, targets)
    # both jobs were submitted before the first audit; the local executor runs each on collection
    assert CALLS == [
        ("start", "a"),
        ("start", "b"),
        ("audit", "a"),
        ("job", "a"),
        ("audit", "b"),
        ("job", "b"),
    ]
    assert result.restricted_json()["b"] == {"value": "B"}


def test_work_a_failed_audit_never_collected_is_cancelled(run, started_kind):
    targets = [
        AuditTarget("a", started_kind, "fail", NO_CLAIM),
        AuditTarget("b", started_kind, None, NO_CLAIM),
    ]
    with pytest.raises(RuntimeError, match="a failed"):
        _audit(run, targets)
    assert CALLS == [("start", "a"), ("start", "b"), ("audit", "a")]  # no job ever ran


def test_results_are_frozen_and_their_documents_are_copies(run):
    result = _audit(run, [AuditTarget("public", "lm", None, NO_CLAIM)])
    assert isinstance(result, AuditResult) and isinstance(result.mechanisms["public"], RiskAudit)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.schema = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.mechanisms["public"].note = "changed"
    doc = result.to_json()
    doc["mechanisms"]["public"]["risk"]["loss"]["auc"]["value"] = -1.0
    doc["controls"][0]["passed"] = False
    again = result.to_json()
    assert again["mechanisms"]["public"]["risk"]["loss"]["auc"]["value"] != -1.0
    assert again["controls_passed"] is True and "restricted" not in str(list(again))


def test_targets_the_kinds_cannot_audit_are_refused_by_name_before_any_work(run):
    cases = [
        ([AuditTarget("x", "nope", None, NO_CLAIM)], "target 'x': kind must be one of"),
        ([AuditTarget("x", "pmixed", ("m",), NO_CLAIM)], "kind 'pmixed' needs a calibration"),
        ([AuditTarget("x", "lm", None, NO_CLAIM)] * 2, "unique. Found 'x' twice"),
        (
            [
                AuditTarget("a", "lm", None, NO_CLAIM, canaries="dpsgd"),
                AuditTarget("b", "lm", "m", NO_CLAIM, canaries="dpsgd"),
            ],
            "each canary role",
        ),
        ([AuditTarget("x", "lm", None, NO_CLAIM, black_box=True)], "black_box needs"),
        (
            [
                AuditTarget(n, "pmixed", ("m",), CLAIM, calibration=CAL, black_box=True)
                for n in "ab"
            ],
            "at most one target may be black_box",
        ),
        ([], "at least one"),
    ]
    for targets, message in cases:
        with pytest.raises(ValueError, match=message):
            _audit(run, targets)
    with pytest.raises(ValueError, match="canaries must be one of"):
        AuditTarget("x", "lm", None, NO_CLAIM, canaries="shadow")
    with pytest.raises(ValueError, match="epsilon_ub must be a finite number >= 0"):
        Claim(-1.0, 1e-5, "add_remove", "u", "a", True)
    with pytest.raises(ValueError, match="delta must be in"):
        Claim(1.0, 1.5, "add_remove", "u", "a", True)

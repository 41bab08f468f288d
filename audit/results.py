"""What an audit returns: frozen results with ``to_json()``, one per target and one per run.

The fields are the public result; the nested documents (the exact pair, the worst cases, the
conformance test, risk metrics) are JSON-able mappings that ``to_json()`` copies out as JSON, so a
caller can change the document it gets without changing the result. The restricted annex (which member
was audited, raw scores) travels beside the public result, never inside ``to_json()``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from audit.targets import Claim

__all__ = ["AuditResult", "PMixEDAudit", "RiskAudit"]


def _copy(doc):
    """A JSON copy: the document as ``audit.json`` will hold it (tuples become lists)."""
    return json.loads(json.dumps(doc))


@dataclass(frozen=True)
class PMixEDAudit:
    """A PMixED deployment's audit: exact pairs, worst cases, conformance, and (for a black-box
    target) the game and the exposure audit through the real generator."""

    claim: Claim
    status: str
    queries: int
    relation: str
    delta: float
    worst_case: Mapping
    exact_pair: Mapping
    conformance: Mapping
    conformance_passed: bool
    alarms: tuple[Mapping, ...]
    empirical: tuple[Mapping, ...] = ()
    empirical_note: str = ""
    note: str | None = None
    game: Mapping | None = None
    exposure: Mapping | None = None

    def to_json(self) -> dict:
        eps = self.claim.epsilon_ub
        out = {
            "worst_case": _copy(self.worst_case),
            "relation": self.relation,
            "unit": self.claim.unit,
            "delta": self.delta,
            "claim": {**self.claim.to_json(), "status": self.status, "queries": self.queries},
            "exact_pair": _copy(self.exact_pair),
            "ratios": {
                "epsilon_pair_over_ub": self.exact_pair["epsilon_pair"] / eps if eps else None
            },
            "empirical": _copy(list(self.empirical)),
            "empirical_note": self.empirical_note,
            "conformance": _copy(self.conformance),
            "conformance_passed": self.conformance_passed,
            "alarms": _copy(list(self.alarms)),
        }
        if self.note is not None:
            out["note"] = self.note
        if self.game is not None:
            out["game"] = _copy(self.game)
        if self.exposure is not None:
            out["exposure"] = _copy(self.exposure)
        return out


@dataclass(frozen=True)
class RiskAudit:
    """One language model's audit: membership-inference risk metrics (training against held-out
    blocks) and, where it took part in the canary audit, its one-run bound.

    ``alarms`` None: no bound was derived, so nothing could raise one (the key is left out)."""

    claim: Claim
    risk: Mapping
    note: str
    members: str = "training blocks"
    non_members: str = "held-out users' blocks"
    empirical: tuple[Mapping, ...] = ()
    alarms: tuple[Mapping, ...] | None = None

    def to_json(self) -> dict:
        out = {
            "relation": self.claim.relation,
            "unit": self.claim.unit,
            "delta": self.claim.delta,
            "claim": self.claim.to_json(),
            "risk": _copy(self.risk),
            "members": self.members,
            "non_members": self.non_members,
            "empirical": _copy(list(self.empirical)),
            "note": self.note,
        }
        if self.alarms is not None:
            out["alarms"] = _copy(list(self.alarms))
        return out


@dataclass(frozen=True)
class AuditResult:
    """A run's audit: every target's result, the controls, and every alarm with its mechanism.

    ``to_json()`` is ``audit.json``'s content; ``restricted_json()`` the 0600 annex."""

    schema: int
    statement: str
    plan: Mapping
    mechanisms: Mapping[str, PMixEDAudit | RiskAudit]
    controls: tuple[Mapping, ...]
    restricted: Mapping = field(repr=False, compare=False, default_factory=dict)

    @property
    def controls_passed(self) -> bool:
        return all(c["passed"] for c in self.controls)

    @property
    def alarms(self) -> list[dict]:
        return [
            dict(a, mechanism=name) for name, m in self.mechanisms.items() for a in (m.alarms or ())
        ]

    def to_json(self) -> dict:
        return {
            "schema": self.schema,
            "statement": self.statement,
            "plan": _copy(dict(self.plan)),
            "mechanisms": {name: m.to_json() for name, m in self.mechanisms.items()},
            "controls": _copy(list(self.controls)),
            "controls_passed": self.controls_passed,
            "alarms": _copy(self.alarms),
        }

    def restricted_json(self) -> dict:
        """The restricted annex (which member, raw scores): never part of a public artefact."""
        return _copy(dict(self.restricted))

"""What an audit checks: typed targets, and the registry of the kinds that audit them.

A target is one mechanism under audit: its ``name`` (its key in ``audit.json``), its ``kind`` (how it
is audited: a registered :class:`Kind`), the ``model`` handle the kind reads (a PMixED ensemble's
member adapters; one language model's adapter, None for the base model itself), the
``calibration`` a PMixED deployment charges, and the ``claim`` the audit tests. The runner resolves
every target's kind through :data:`KINDS` (as attacks resolve through ``audit.attacks.ATTACKS``), so
a new mechanism is one more target, and a new way of auditing is one :func:`register_kind`; the
runner, the report builder and the command line do not name mechanisms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

from pmixed.privacy import Calibration

__all__ = [
    "CANARY_ROLES",
    "KINDS",
    "RESERVED_NAMES",
    "AuditTarget",
    "Claim",
    "Kind",
    "check_targets",
    "register_kind",
]

#: A target's part in the DP-SGD canary audit: the private run it retrains with canaries, or the
#: non-private positive control trained on the same canaries.
CANARY_ROLES = ("dpsgd", "control")
#: The restricted annex's own keys, which no target may be named.
RESERVED_NAMES = ("schema", "member", "game", "exposure", "canaries")


@dataclass(frozen=True)
class Claim:
    """The privacy claim under test: (ε, δ) for ``relation`` at ``unit``, from ``accountant``.

    ``epsilon_ub`` None: no claim (a non-private model, audited for risk only)."""

    epsilon_ub: float | None
    delta: float | None
    relation: str
    unit: str
    accountant: str
    certified: bool

    def __post_init__(self) -> None:
        eps = self.epsilon_ub
        if eps is not None and not (
            isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0
        ):
            raise ValueError(
                f"Claim.epsilon_ub must be a finite number >= 0 or None. Found {eps!r}."
            )
        if self.delta is not None and not (
            isinstance(self.delta, (int, float)) and 0 <= self.delta < 1
        ):
            raise ValueError(f"Claim.delta must be in [0, 1) or None. Found {self.delta!r}.")

    @classmethod
    def from_privacy(cls, entry: Mapping) -> Claim:
        """The claim of one entry of ``metrics.json``'s ``privacy`` block."""
        return cls(
            epsilon_ub=entry["epsilon"],
            delta=entry["delta"],
            relation=entry["relation"],
            unit=entry["unit"],
            accountant=entry["accountant"],
            certified=bool(entry["certified"]),
        )

    def to_json(self) -> dict:
        """The claim as ``audit.json`` shows it beside each mechanism's result."""
        return {
            "epsilon_ub": self.epsilon_ub,
            "accountant": self.accountant,
            "certified": self.certified,
        }


@dataclass(frozen=True)
class AuditTarget:
    """One mechanism under audit (see the module docstring).

    ``black_box``: a PMixED target whose deployment also plays the black-box game and the exposure
    audit through the real generator (the demo's replace-one deployment: the game's unit is a user).
    ``canaries``: its part in the DP-SGD canary audit (:data:`CANARY_ROLES`), or None."""

    name: str
    kind: str
    model: str | tuple[str, ...] | None
    claim: Claim
    calibration: Calibration | None = None
    black_box: bool = False
    canaries: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name in RESERVED_NAMES:
            raise ValueError(
                "AuditTarget.name must be a non-empty string other than "
                f"{', '.join(RESERVED_NAMES)}. Found {self.name!r}."
            )
        if self.canaries not in (None, *CANARY_ROLES):
            raise ValueError(
                f"AuditTarget.canaries must be one of {CANARY_ROLES} or None. "
                f"Found {self.canaries!r}."
            )

    def key(self) -> list:
        """A JSON-able identity (for stage keys): everything but the calibration object, which
        the deployment's config already keys."""
        return [self.name, self.kind, self.model, asdict(self.claim), self.black_box, self.canaries]


@dataclass(frozen=True)
class Kind:
    """How targets of one kind are audited: ``audit(target, context) -> (result, restricted)``,
    where ``result`` has ``to_json()`` and ``alarms``; ``calibrated`` targets carry a
    calibration (and the others do not). ``start(target, context)``, if given, is called for
    every target before any is audited: it submits the target's self-contained work to the
    context's executor (:meth:`audit.context.AuditContext.submit`), so that work runs in the
    background while the other targets are audited, and ``audit`` collects it."""

    name: str
    audit: Callable
    calibrated: bool
    start: Callable | None = None


KINDS: dict[str, Kind] = {}


def register_kind(name: str, *, calibrated: bool, start: Callable | None = None):
    """Registers the decorated ``audit(target, context)`` as kind ``name`` (unique), with its
    optional ``start`` hook (:class:`Kind`)."""

    def deco(fn):
        if name in KINDS:
            raise ValueError(f"audit kind {name!r} is already registered.")
        KINDS[name] = Kind(name, fn, calibrated, start)
        return fn

    return deco


def check_targets(targets: Sequence[AuditTarget]) -> None:
    """A ValueError naming the first target the registered kinds cannot audit, before any work."""
    if not targets:
        raise ValueError("targets must hold at least one AuditTarget.")
    seen = set()
    for t in targets:
        if not isinstance(t, AuditTarget):
            raise TypeError(f"targets must hold AuditTarget values. Found {type(t).__name__}.")
        if t.name in seen:
            raise ValueError(f"target names must be unique. Found {t.name!r} twice.")
        seen.add(t.name)
        kind = KINDS.get(t.kind)
        if kind is None:
            raise ValueError(
                f"target {t.name!r}: kind must be one of {sorted(KINDS)}. Found {t.kind!r}."
            )
        if kind.calibrated != (t.calibration is not None):
            need = "needs a calibration" if kind.calibrated else "takes no calibration"
            raise ValueError(f"target {t.name!r}: kind {t.kind!r} {need}.")
        if t.black_box and t.calibration is None:
            raise ValueError(f"target {t.name!r}: black_box needs a calibrated (PMixED) target.")
    if sum(t.black_box for t in targets) > 1:
        raise ValueError("at most one target may be black_box (one planted canary per run).")
    roles = [t.canaries for t in targets if t.canaries]
    if len(roles) != len(set(roles)):
        raise ValueError("each canary role (dpsgd, control) may be held by one target only.")

"""Accounting modes as registered objects: a mode is one class, registered once by name.

A mode says how a :class:`~pmixed.privacy.PMixEDConfig` becomes a calibration: which of the config's
settings it accepts, the per-query RDP curve it charges, the mollifier's constraint set for a subset
size, the calibration's status, and the mode-specific fields of its query events. Everything else
(the mechanism, the ledger, composition, the exact audit) works from those answers and never tests a
mode's name. Modes register themselves in the manner of peft's ``register_peft_method``::

    register_mode(MyMode())        # one line; the name comes from the object

The three built-in modes (``certified``, ``capped``, ``reference``) live in
:mod:`pmixed.standard_modes` and are registered when ``pmixed`` is imported. A fixed-β mode (one
β for every subset size, calibrated by bisection on ε) derives from
:class:`pmixed.privacy.FixedBetaMode` and only supplies its base bound and constraint set.

This module imports nothing of ours, so the registry sits below the code that uses it.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, runtime_checkable

__all__ = ["Mode", "get_mode", "mode_names", "register_mode", "unregister_mode"]

_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_REGISTRY: dict[str, Mode] = {}


@runtime_checkable
class Mode(Protocol):
    """What a mode supplies (``config`` is a PMixEDConfig, ``calibration`` a Calibration).

    Attributes:
        name: the registered name, the config's and the ledger's ``mode`` (lower case, ≤ 40).
        certified: False for a claim that is not proven: its status is then ``"UNCERTIFIED"``.
        fixed_beta: True when one β serves every subset size (a member's λ then does not depend
            on how many members were sampled with it).
    """

    name: str
    certified: bool
    fixed_beta: bool

    def validate(self, config: Any) -> list[str]:
        """The mode's own rules on the config: one message per problem, empty when valid."""

    def calibrate(self, config: Any) -> Any:
        """β and the per-query curve (raises ``InfeasibleBudget`` when none fits)."""

    def constraints(self, calibration: Any, n_sampled: int) -> Any:
        """The mollifier's constraint set for a subset of ``n_sampled`` members."""

    def status(self, config: Any) -> str:
        """``"certified"``, ``"conditional"`` or ``"UNCERTIFIED"``."""

    def event_fields(self, config: Any) -> dict:
        """``amplification``, ``constraint_grid`` and ``reference_alpha`` of this mode's query
        events (public, data-independent)."""


def register_mode(mode: Mode, *, replace: bool = False) -> Mode:
    """Add ``mode`` to the registry under ``mode.name``; a second registration of a name is an
    error unless ``replace`` (tests, or a deliberate override)."""
    if not isinstance(mode, Mode):
        raise TypeError(f"mode must implement pmixed.modes.Mode. Found {type(mode).__name__}.")
    name = getattr(mode, "name", None)
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ValueError(f"mode.name must match {_NAME.pattern}. Found {name!r}.")
    if name in _REGISTRY and not replace:
        raise ValueError(f"mode {name!r} is already registered; pass replace=True to override.")
    _REGISTRY[name] = mode
    return mode


def unregister_mode(name: str) -> None:
    """Remove a registered mode (tests that register a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def get_mode(name: object) -> Mode:
    """The registered mode called ``name``; ``ValueError`` naming the registered ones otherwise."""
    mode = _REGISTRY.get(name) if isinstance(name, str) else None
    if mode is None:
        raise ValueError(f"mode must be one of {mode_names()}. Found {name!r}.")
    return mode


def mode_names() -> tuple[str, ...]:
    """The registered modes' names, in registration order (the built-in three first)."""
    return tuple(_REGISTRY)

"""DpEvents for PMixED: value objects that describe a charge; the accountant does the arithmetic.

Following dp-accounting's design (``dp_event.py``), an event carries only hyperparameters and the
per-order RDP cost they imply. Unlike dp-accounting, every field is validated at construction, so a bad
event never reaches a ledger or an accountant.

Three events are defined here:

* :class:`PMixEDQueryEvent`: one PMixED next-token query (mode, sampling rate, β, orders, per-order
  cost). An unproven claim (the reference mode's) carries ``certified=False`` and
  ``status="UNCERTIFIED"``. Which fields a mode sets is the mechanism's business (``pmixed.modes``);
  accounting checks types, ranges, the curve and the status, and composes the curve.
* :class:`RdpCurveEvent`: any mechanism given by its per-order RDP curve.
* :class:`PublicStepEvent`: a step served from the public model alone, decided from public counters
  before any private computation (PMIXED_MATH.md §9): zero cost, a ``NoOpDpEvent``.

Events serialise to plain JSON objects (``to_json``) and back (``event_from_json``) through a fixed
registry of type names: decoding never imports a module named in the data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import attr
import numpy as np
from dp_accounting import dp_event

from accounting.checks import is_int, is_real

__all__ = [
    "EVENT_TYPES",
    "PMixEDQueryEvent",
    "PublicStepEvent",
    "RdpCurveEvent",
    "curve_at",
    "event_from_json",
    "event_to_json",
]

RELATIONS = ("add_remove", "replace_one")
AMPLIFICATIONS = ("general", "tight")
STATUSES = ("certified", "conditional", "UNCERTIFIED")


# ------------------------------------------------------------------------------------ validators


_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def _check_name(name: str, value: object) -> None:
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise ValueError(f"{name} must be a lower-case name ({_NAME.pattern}). Found {value!r}.")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}. Found {value!r}.")


def _check_curve(orders: object, rdp: object, *, integer: bool) -> tuple[tuple, tuple[float, ...]]:
    """Validated (orders, rdp): orders strictly increasing and > 1; rdp >= 0 or +inf, never NaN."""
    if isinstance(orders, (str, bytes)) or not isinstance(orders, (Sequence, np.ndarray)):
        raise ValueError(f"orders must be a non-empty sequence. Found {orders!r}.")
    if isinstance(rdp, (str, bytes)) or not isinstance(rdp, (Sequence, np.ndarray)):
        raise ValueError(f"rdp must be a sequence of floats, one per order. Found {rdp!r}.")
    if len(orders) == 0:
        raise ValueError("orders must be a non-empty sequence. Found an empty one.")
    for k in orders:
        if integer and (not is_int(k) or k < 2):
            raise ValueError(f"orders must be integers >= 2. Found {k!r}.")
        if not is_real(k) or not math.isfinite(k) or k <= 1:
            raise ValueError(f"orders must be finite reals > 1. Found {k!r}.")
    if any(b <= a for a, b in zip(orders, orders[1:])):
        raise ValueError(f"orders must be strictly increasing. Found {tuple(orders)!r}.")
    if len(rdp) != len(orders):
        raise ValueError(f"rdp must have one value per order ({len(orders)}). Found {len(rdp)}.")
    for r in rdp:
        if not is_real(r) or math.isnan(r) or r < 0:
            raise ValueError(f"rdp values must be in [0, inf]. Found {r!r}.")
    cast = int if integer else float
    return tuple(cast(k) for k in orders), tuple(float(r) for r in rdp)


def _check_rate(name: str, q: object) -> None:
    if not is_real(q) or not 0 < q <= 1:
        raise ValueError(f"{name} must be in (0, 1]. Found {q!r}.")


# ------------------------------------------------------------------------------------ events


@attr.s(frozen=True, kw_only=True, auto_attribs=True)
class RdpCurveEvent(dp_event.DpEvent):
    """A mechanism known only by its RDP curve: ``rdp[i]`` bounds D_{orders[i]} over neighbours.

    Attributes:
        orders: Rényi orders, finite reals > 1, strictly increasing.
        rdp: the per-order RDP bound, each in [0, +inf].
        relation: the neighbouring relation the curve holds for, ``"add_remove"`` or ``"replace_one"``.
        certified: False when the curve is a claim that is not proven (it is then reported as such).
        label: a short public description ("" by default).
    """

    orders: tuple[float, ...]
    rdp: tuple[float, ...]
    relation: str = "add_remove"
    certified: bool = True
    label: str = ""

    def __attrs_post_init__(self) -> None:
        orders, rdp = _check_curve(self.orders, self.rdp, integer=False)
        object.__setattr__(self, "orders", orders)
        object.__setattr__(self, "rdp", rdp)
        _check_choice("relation", self.relation, RELATIONS)
        if not isinstance(self.certified, bool):
            raise ValueError(f"certified must be a bool. Found {self.certified!r}.")
        if not isinstance(self.label, str) or len(self.label) > 200:
            raise ValueError(
                f"label must be a string of at most 200 characters. Found {self.label!r}."
            )

    @property
    def status(self) -> str:
        return "certified" if self.certified else "UNCERTIFIED"


@attr.s(frozen=True, kw_only=True, auto_attribs=True)
class PMixEDQueryEvent(dp_event.DpEvent):
    """One PMixED query: the public parameters of the mechanism and the per-order cost it is charged.

    The cost is the calibrated per-query curve (PMIXED_MATH.md §9): data-independent and known before
    the query. Nothing restricted belongs here: no subset, subset size, λ, or size-dependent β.

    Attributes:
        mode: the mechanism's mode name (``"certified"``, ``"capped"``, ``"reference"``, or one
            registered with ``pmixed.modes``).
        relation: ``"add_remove"`` (member level) or ``"replace_one"`` (user level).
        n_members: N, the number of ensemble members.
        sampling_rate: q, the Poisson inclusion probability, in (0, 1].
        beta: the fixed β of a fixed-β mode (certified, capped); None when β depends on the subset
            size (reference mode: β_n by size lives in the ledger header's calibration).
        lambda_max: capped mode's λ cap in (0, 1); None otherwise.
        amplification: the Zhu–Wang form used, ``"general"`` or ``"tight"`` (reference mode: tight).
        constraint_grid: ``"all"`` or ``"coarse"`` (certified), ``"all"`` (capped), ``"single"``
            (reference: one order).
        reference_alpha: reference mode's single order; None otherwise.
        orders: integer accounting orders >= 2, strictly increasing.
        rdp: the charged cost at each order, in [0, +inf].
        status: ``"certified"``, ``"conditional"`` (tight amplification) or ``"UNCERTIFIED"``.
        certified: False exactly when ``status`` is ``"UNCERTIFIED"``.
    """

    mode: str
    relation: str
    n_members: int
    sampling_rate: float
    beta: float | None
    lambda_max: float | None
    amplification: str
    constraint_grid: str
    reference_alpha: int | None
    orders: tuple[int, ...]
    rdp: tuple[float, ...]
    status: str
    certified: bool

    def __attrs_post_init__(self) -> None:
        _check_name("mode", self.mode)
        _check_choice("relation", self.relation, RELATIONS)
        _check_choice("amplification", self.amplification, AMPLIFICATIONS)
        _check_name("constraint_grid", self.constraint_grid)
        _check_choice("status", self.status, STATUSES)
        if not is_int(self.n_members) or self.n_members < 1:
            raise ValueError(f"n_members must be an integer >= 1. Found {self.n_members!r}.")
        _check_rate("sampling_rate", self.sampling_rate)
        orders, rdp = _check_curve(self.orders, self.rdp, integer=True)
        object.__setattr__(self, "orders", orders)
        object.__setattr__(self, "rdp", rdp)
        object.__setattr__(self, "n_members", int(self.n_members))
        object.__setattr__(self, "sampling_rate", float(self.sampling_rate))
        if self.beta is not None:
            if not is_real(self.beta) or not math.isfinite(self.beta) or self.beta < 0:
                raise ValueError(f"beta must be None or finite and >= 0. Found {self.beta!r}.")
            object.__setattr__(self, "beta", float(self.beta))
        if self.lambda_max is not None:
            if not is_real(self.lambda_max) or not 0 < self.lambda_max < 1:
                raise ValueError(
                    f"lambda_max must be None or in (0, 1). Found {self.lambda_max!r}."
                )
            object.__setattr__(self, "lambda_max", float(self.lambda_max))
        if self.reference_alpha is not None and (
            not is_int(self.reference_alpha) or self.reference_alpha not in orders
        ):
            raise ValueError(
                f"reference_alpha must be None or one of the orders. Found {self.reference_alpha!r}."
            )
        if self.certified is not (self.status != "UNCERTIFIED"):
            raise ValueError(
                f"certified must be {self.status != 'UNCERTIFIED'} with status {self.status!r}. "
                f"Found {self.certified!r}."
            )


@attr.s(frozen=True)
class PublicStepEvent(dp_event.NoOpDpEvent):
    """A query answered by the public model alone, decided from public counters: costs nothing."""


# ------------------------------------------------------------------------------------ helpers


def curve_at(event: dp_event.DpEvent, orders: Sequence[float]) -> np.ndarray:
    """The event's RDP at ``orders``, rounding each order up to the event's grid.

    D_α is nondecreasing in α (van Erven & Harremoës 2014, Thm 3), so the value at the next grid
    order ≥ α bounds the value at α; an order above the grid gets +inf. A public step is 0.
    """
    orders = np.asarray(orders, np.float64)
    if isinstance(event, dp_event.NoOpDpEvent):
        return np.zeros(orders.shape)
    if not isinstance(event, (PMixEDQueryEvent, RdpCurveEvent)):
        raise TypeError(f"curve_at needs a PMixED event. Found {type(event).__name__}.")
    grid = np.asarray(event.orders, np.float64)
    values = np.append(np.asarray(event.rdp, np.float64), np.inf)
    return values[np.searchsorted(grid, orders, side="left")]


def _float_out(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def _float_in(x: object) -> object:
    return math.inf if x == "inf" else x


def event_to_json(event: dp_event.DpEvent) -> dict:
    """A plain JSON object for ``event`` (+inf is written as the string ``"inf"``)."""
    for name, (cls, _) in EVENT_TYPES.items():
        if type(event) is cls:
            out = {"type": name}
            for f in attr.fields(cls):
                v = getattr(event, f.name)
                if f.name == "rdp":
                    v = [_float_out(r) for r in v]
                elif isinstance(v, tuple):
                    v = list(v)
                out[f.name] = v
            return out
    raise TypeError(f"event must be one of {sorted(EVENT_TYPES)}. Found {type(event).__name__}.")


def event_from_json(obj: Mapping) -> dp_event.DpEvent:
    """The event described by ``obj``; unknown types or fields raise ``ValueError``.

    The type is looked up in :data:`EVENT_TYPES`; nothing named in the data is ever imported.
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("type"), str):
        raise ValueError("event must be a JSON object with a string 'type'.")
    entry = EVENT_TYPES.get(obj["type"])
    if entry is None:
        raise ValueError(f"event type must be one of {sorted(EVENT_TYPES)}. Found {obj['type']!r}.")
    cls, build = entry
    names = {f.name for f in attr.fields(cls)}
    given = set(obj) - {"type"}
    if given != names:
        extra, missing = sorted(given - names), sorted(names - given)
        raise ValueError(f"event {obj['type']!r}: unexpected fields {extra}, missing {missing}.")
    return build({k: obj[k] for k in names})


def _build_curve_kwargs(kw: dict) -> dict:
    if isinstance(kw.get("rdp"), list):
        kw["rdp"] = [_float_in(r) for r in kw["rdp"]]
    return kw


def _builder(cls: type) -> Callable[[dict], dp_event.DpEvent]:
    return lambda kw: cls(**_build_curve_kwargs(dict(kw)))


#: The only event types a ledger may name: type string -> (class, builder from JSON fields).
EVENT_TYPES: dict[str, tuple[type, Callable[[dict], dp_event.DpEvent]]] = {
    "pmixed_query": (PMixEDQueryEvent, _builder(PMixEDQueryEvent)),
    "rdp_curve": (RdpCurveEvent, _builder(RdpCurveEvent)),
    "public_step": (PublicStepEvent, lambda kw: PublicStepEvent()),
}

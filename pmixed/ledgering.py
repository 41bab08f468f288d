"""From a :class:`~pmixed.privacy.Calibration` to what the accounting layer records.

``accounting`` knows nothing of PMixED's math (it imports nothing of ours); this module states, once,
which public parameters of a calibration describe a query and its cost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from accounting import Ledger, PMixEDQueryEvent
from pmixed.mechanism import SAMPLER, SAMPLER_TV_PER_QUERY
from pmixed.modes import get_mode
from pmixed.privacy import Calibration, PMixEDConfig

__all__ = ["CALIBRATION_KEYS", "create_ledger", "public_calibration", "query_event"]

#: The public header's calibration keys: the config's fields and the calibration's public values
#: (all data-independent). The mechanism supplies them; accounting only checks their shape.
CALIBRATION_KEYS = frozenset(PMixEDConfig.__dataclass_fields__) | {
    "status",
    "beta",
    "beta_by_size",
    "per_query_rdp",
    "planned_epsilon",
    "planned_order",
    "sampler",
    "sampler_tv_per_query",
}


def query_event(cal: Calibration) -> PMixEDQueryEvent:
    """The event one query of this calibration is charged as (the calibrated per-query curve)."""
    cfg = cal.config
    return PMixEDQueryEvent(
        mode=cfg.mode,
        relation=cfg.relation,
        n_members=cfg.n_members,
        sampling_rate=cfg.sampling_rate,
        beta=cal.beta,
        lambda_max=cfg.lambda_max,
        **get_mode(cfg.mode).event_fields(cfg),
        orders=cal.orders,
        rdp=cal.per_query_rdp_values,
        status=cal.status,
        certified=cal.certified,
    )


def public_calibration(cal: Calibration) -> dict:
    """The calibration summary for the public ledger header: data-independent values only."""
    cfg = cal.config
    out = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    out.update(
        status=cal.status,
        beta=cal.beta,
        beta_by_size=list(cal.beta_by_size),
        per_query_rdp=list(cal.per_query_rdp_values),
        planned_epsilon=cal.planned_epsilon,
        planned_order=cal.planned_order,
        sampler=SAMPLER,
        sampler_tv_per_query=SAMPLER_TV_PER_QUERY,
    )
    if set(out) != CALIBRATION_KEYS:  # a new public value is added to CALIBRATION_KEYS first
        raise AssertionError(
            f"public calibration keys differ: {sorted(set(out) ^ CALIBRATION_KEYS)}"
        )
    return out


def create_ledger(
    path: str | os.PathLike,
    cal: Calibration,
    *,
    budget: Mapping | None = None,
    seed: int | None = None,
    fsync: bool = True,
    signing_key=None,
) -> Ledger:
    """A new ledger whose header describes ``cal``; ``seed`` (audits only) goes to the restricted
    side; ``signing_key`` (Ed25519) signs every record."""
    return Ledger.create(
        path,
        mode=cal.config.mode,
        relation=cal.config.relation,
        status=cal.status,
        orders=cal.orders,
        calibration=public_calibration(cal),
        budget=budget,
        seeded=seed is not None,
        seed=seed,
        fsync=fsync,
        signing_key=signing_key,
    )

"""The audit's results as pandas DataFrames (pandas is imported when a frame is built).

* :func:`audit_frame`: one row per lower bound or exact measurement of ``audit.json`` (public):
  ``mechanism``, ``relation``, ``kind`` (``exact`` / ``worst_case`` / ``empirical``), ``target``,
  ``method``, ``attack``, ``epsilon`` (the exact ε_pair or the empirical ε lower bound), ``delta``,
  ``confidence`` (empirical only), ``claim`` (the mechanism's ε upper bound; NaN where there is
  none), ``ratio`` (epsilon / claim) and ``alarm`` (the audit's own verdict for that row).
* :func:`scores_frame`: one row per example and attack of the membership-inference signals
  (``model``, ``attack``, ``member``, ``score``). These are restricted (per-example scores of
  private records, ``audit.restricted.json``): the caller must ask with ``restricted=True``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["AUDIT_COLUMNS", "audit_frame", "scores_frame"]

AUDIT_COLUMNS = (
    "mechanism",
    "relation",
    "kind",
    "target",
    "method",
    "attack",
    "epsilon",
    "delta",
    "confidence",
    "claim",
    "ratio",
    "alarm",
)


def _load(audit: Mapping | str | os.PathLike) -> Mapping:
    if isinstance(audit, Mapping):
        return audit
    path = Path(audit)
    return json.loads((path / "audit.json" if path.is_dir() else path).read_text())


def _row(name: str, m: Mapping, kind: str, target: str, method: str, epsilon: float, **kw) -> dict:
    claim = m["claim"].get("epsilon_ub")
    ratio = epsilon / claim if claim else math.nan
    return {
        "mechanism": name,
        "relation": m["relation"],
        "kind": kind,
        "target": target,
        "method": method,
        "attack": kw.get("attack"),
        "epsilon": float(epsilon),
        "delta": kw.get("delta", m["delta"]),
        "confidence": kw.get("confidence", math.nan),
        "claim": math.nan if claim is None else float(claim),
        "ratio": ratio,
        "alarm": bool(kw.get("alarm", False)),
    }


def _bound(name: str, m: Mapping, target: str, b: Mapping, attack: str | None) -> dict:
    claim = m["claim"].get("epsilon_ub")
    alarm = claim is not None and b["epsilon_lb"] > claim
    return _row(
        name,
        m,
        "empirical",
        target,
        b["method"],
        b["epsilon_lb"],
        delta=b["delta"],
        confidence=b["confidence"],
        attack=attack or b.get("attack") or b.get("score"),
        alarm=alarm,
    )


def audit_frame(audit: Mapping | str | os.PathLike):
    """``audit.json`` (a dict, its path, or the run directory) as one row per measurement."""
    import pandas as pd

    data, rows = _load(audit), []
    for name, m in data["mechanisms"].items():
        if "exact_pair" in m:
            ex = m["exact_pair"]
            rows.append(
                _row(
                    name,
                    m,
                    "exact",
                    ex["pair"],
                    "exact pair (PLD)",
                    ex["epsilon_pair"],
                    delta=ex["delta"],
                    alarm=ex["alarm"],
                )
            )
        for case, wc in m.get("worst_case", {}).items():
            if "epsilon_pair" in wc:
                times = wc.get("times") or wc.get("epsilon_pair_times")
                method = "exact pair (PLD)" + (f", asked {times} times" if times else "")
                rows.append(
                    _row(
                        name,
                        m,
                        "worst_case",
                        case,
                        method,
                        wc["epsilon_pair"],
                        alarm=wc.get("alarm", False),
                    )
                )
        for e in m.get("empirical", []):
            if "epsilon_lb" in e:  # a bound (PMixED's game and exposure)
                rows.append(_bound(name, m, e["target"], e, None))
                continue
            # A canary audit: one bound per attack (its headline bound is the larger of them).
            attacks = {a: r["one_run"] for a, r in e.get("attacks", {}).items() if "one_run" in r}
            for attack, bound in (attacks or {None: e["one_run"]}).items():
                rows.append(_bound(name, m, e["target"], bound, attack))
    frame = pd.DataFrame(rows, columns=list(AUDIT_COLUMNS))
    return frame.astype({"epsilon": float, "claim": float, "ratio": float, "alarm": bool})


def _is_split(value) -> bool:
    return isinstance(value, dict) and set(value) == {"in", "out"}


def scores_frame(run: str | os.PathLike, *, restricted: bool = False):
    """Per-example membership scores of ``run``'s audit (restricted: needs ``restricted=True``)."""
    import pandas as pd

    if not restricted:
        raise PermissionError(
            "per-example membership scores are restricted data "
            "(audit.restricted.json): ask with restricted=True."
        )
    path = Path(run)
    data = json.loads((path / "audit.restricted.json" if path.is_dir() else path).read_text())
    rows = []
    for model, entry in data.items():  # the membership-inference targets' raw scores
        if not (isinstance(entry, dict) and entry and all(_is_split(v) for v in entry.values())):
            continue
        for attack, split in entry.items():
            for member, key in ((True, "in"), (False, "out")):
                rows += [(model, attack, member, float(s)) for s in split[key]]
    return pd.DataFrame(rows, columns=["model", "attack", "member", "score"])

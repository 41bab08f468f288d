"""The run's metrics table (utility and privacy per model) as a pandas DataFrame."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["METRICS_COLUMNS", "metrics_frame"]

#: One row per model; ``perplexity`` is the exact one for PMixED (the realized runs beside it).
METRICS_COLUMNS = (
    "model",
    "perplexity",
    "realized_mean",
    "realized_sd",
    "epsilon",
    "delta",
    "status",
    "relation",
    "unit",
    "accountant",
)


def _num(x: object) -> float:
    return math.nan if x is None else float(x)


def metrics_frame(metrics: Mapping | str | os.PathLike):
    """``metrics.json`` (a dict, its path, or the run directory) as one row per model."""
    import pandas as pd

    if not isinstance(metrics, Mapping):
        path = Path(metrics)
        metrics = json.loads((path / "metrics.json" if path.is_dir() else path).read_text())
    rows = []
    for model, ppl in metrics["perplexity"].items():
        p = metrics["privacy"][model]
        plain = not isinstance(ppl, Mapping)
        status = p.get("status") or ("certified" if p["certified"] else "no guarantee")
        rows.append(
            {
                "model": model,
                "perplexity": _num(ppl if plain else ppl["exact"]),
                "realized_mean": math.nan if plain else _num(ppl["realized_mean"]),
                "realized_sd": math.nan if plain else _num(ppl["realized_sd"]),
                "epsilon": _num(p["epsilon"]),
                "delta": _num(p["delta"]),
                "status": status,
                "relation": p["relation"],
                "unit": p["unit"],
                "accountant": p["accountant"],
            }
        )
    return pd.DataFrame(rows, columns=list(METRICS_COLUMNS))

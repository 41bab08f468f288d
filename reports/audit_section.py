"""The audit group of the report: one row per mechanism from ``audit.json`` (bounds, risk,
tightness against the claim, alarms), and the audit's power from ``power.json``."""

from __future__ import annotations

import json
from pathlib import Path

from reports.rundir import AUDIT, POWER, file_sha256

__all__ = ["audit_section"]


def audit_section(run: Path) -> tuple[dict, str]:
    path = run / AUDIT
    if not path.exists():
        return {"attached": False}, ""
    a = json.loads(path.read_text())
    rows = {}
    for name, m in a["mechanisms"].items():
        pair = m.get("exact_pair")
        lbs = [dict(e) for e in m.get("empirical", [])]
        best = max(lbs, key=lambda e: _lb(e), default=None)
        risk = m.get("risk", {}).get("reference") or m.get("risk", {}).get("loss")
        if "game" in m:  # PMixED: the game's exact log-likelihood-ratio score, D vs D' trials
            risk = m["game"].get("risk", {}).get("llr")
        if best is not None and "attacks" in best:
            risk = best["risk"]
        rows[name] = {
            "relation": m["relation"],
            "unit": m["unit"],
            "delta": m["delta"],
            "epsilon_ub": m["claim"]["epsilon_ub"],
            "certified": m["claim"]["certified"],
            "epsilon_pair": pair["epsilon_pair"] if pair else None,
            "exact_over_charged": pair["worst_ratio_exact_over_charged"] if pair else None,
            "epsilon_lb": _lb(best) if best else None,
            "epsilon_lb_method": _method(best) if best else None,
            "auc": risk["auc"] if risk else None,
            "tpr_at_fpr_0.001": risk["tpr_at_fpr_0.001"] if risk else None,
            "tpr_at_fpr_0.01": risk["tpr_at_fpr_0.01"] if risk else None,
            "roc": risk.get("roc") if risk else None,
            "n": [risk["n0"], risk["n1"]] if risk else None,
            "conformance_passed": m.get("conformance_passed"),
            "worst_case": m.get("worst_case"),
            "alarms": m.get("alarms", []),
        }
    # the black-box game and exposure ran against one PMixED target (audit.targets: black_box)
    black_box = next((m for m in a["mechanisms"].values() if "game" in m), {})
    controls_ok = a["controls_passed"]
    for row in rows.values():  # a positive control that failed: the audit could not have seen
        row["inconclusive"] = not controls_ok
        ub = row["epsilon_ub"]
        row["tightness"] = {
            "epsilon_lb_over_claim": None
            if ub in (None, 0) or row["epsilon_lb"] is None
            else row["epsilon_lb"] / ub,
            "epsilon_pair_over_claim": None
            if ub in (None, 0) or row["epsilon_pair"] is None
            else row["epsilon_pair"] / ub,
        }
        wc = row.get("worst_case")
        if wc:
            row["tightness"]["query_control_epsilon_pair_over_claim"] = wc["query_control"][
                "ratio_to_claim"
            ]
            row["tightness"]["optimised_member_exact_over_charged"] = wc["optimised_member"][
                "ratio"
            ]
            row["tightness"]["optimised_member_epsilon_pair_over_claim"] = wc[
                "optimised_member"
            ].get("ratio_to_claim")
            configuration = wc.get("configuration") or {}  # audit schema >= 7
            row["tightness"]["configuration_exact_over_charged"] = configuration.get("ratio")
            poisoned = wc.get("poisoned_member") or {}  # audit schema >= 6
            row["tightness"]["poisoned_member_epsilon_pair_over_claim"] = poisoned.get(
                "ratio_to_claim"
            )
            row["tightness"]["poisoned_member_exact_over_charged"] = poisoned.get(
                "exact_over_charged"
            )
    out = {
        "attached": True,
        "file": AUDIT,
        "sha256": file_sha256(path),
        "power": _power(run, controls_ok),
        "statement": a["statement"],
        "rows": rows,
        "controls": a["controls"],
        "controls_passed": a["controls_passed"],
        "alarms": a["alarms"],
        "plan": {k: a["plan"][k] for k in ("n_contexts", "conformance_samples", "eta", "seed")},
        "game": black_box.get("game"),
        "exposure": black_box.get("exposure"),
    }
    return out, str(run / "audit.restricted.json")


def _power(run: Path, controls_ok: bool) -> dict:
    """The power section: positive controls, and ``power.json`` (mutants detected, test-bed
    tightness) when ``pmixed audit --power`` has written one."""
    path = run / POWER
    out: dict = {"positive_controls_passed": controls_ok, "attached": path.exists()}
    if path.exists():
        p = json.loads(path.read_text())
        m = p["mutants"]
        out.update(
            file=POWER,
            sha256=file_sha256(path),
            mutants=m["mutants"],
            mutants_detected=m["detected"],
            mutants_total=m["total"],
            twins_clean=m["twins_clean"],
            testbed=p.get("testbed"),
            seed=p.get("seed"),
        )
    return out


def _lb(e: dict) -> float:
    return e["one_run"]["epsilon_lb"] if "one_run" in e else e["epsilon_lb"]


def _method(e: dict) -> str:
    if "one_run" in e:
        r = e["one_run"]
        return (
            f"one-run (Steinke et al. 2023), {r['attack']}, m={r['m']}, r={r['r']}, "
            f"confidence {r['confidence']:g}"
        )
    n = e.get("n0", e.get("n", ""))
    return (
        f"{e['method']}, {e.get('strategy', '')} {e.get('target', '')}, n={n}, "
        f"confidence {e['confidence']:g}"
    )

"""The verdict: a pure function of the report document and the policy file (REPORT.md §7).

Each triggered rule is listed with its id, level, mechanism, a one-line reason and a JSON pointer
to the evidence. The overall level is the worst rule over the mechanisms offered for sign-off;
mechanisms the policy marks ``comparison_only`` (the uncertified reference mode) have their rules
listed but do not set it. Rules implemented: F1-F5, F7, W1, W3-W6, W8, W9, W10 (an audit without
power is INCONCLUSIVE) (F6 holds by construction: partitions are keyed by user before chunking,
tested in ``pmixed.data``; F8 is enforced by refusing to write a document that fails the schema
or contains a restricted value).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["POLICY_PATH", "compute_verdict", "load_policy"]

POLICY_PATH = Path(__file__).parent / "policy.json"
_ORDER = {"pass": 0, "warning": 1, "fail": 2}


def load_policy(path: Path = POLICY_PATH) -> dict:
    """The policy and its SHA-256 (recorded in the verdict)."""
    raw = path.read_bytes()
    return {**json.loads(raw), "sha256": "sha256:" + hashlib.sha256(raw).hexdigest()}


def _rule(rules, rid, mech, reason, pointer):
    level = "fail" if rid.startswith("F") else "warning"
    rules.append(
        {"id": rid, "level": level, "mechanism": mech, "reason": reason, "pointer": pointer}
    )


def _num(x) -> float:
    return float("inf") if x == "inf" else float(x)


def _mechanism_rules(doc: dict, name: str, policy: dict, rules: list) -> None:
    mech, acc, budget = doc["mechanisms"][name], doc["accounting"][name], doc["budget"][name]
    eps = _num(acc["epsilon"])
    if mech["certified"] is False and acc.get("status") != "unverified":
        _rule(
            rules,
            "F4",
            name,
            "the claim rests on an uncertified mode (reference accounting)",
            f"/mechanisms/{name}/certified",
        )
    for c in acc["cross_checks"]:
        diff = abs(_num(c["epsilon"]) - eps) / max(1.0, eps)
        if _num(c["epsilon"]) > eps * (1 + policy["cross_check_rtol"]):
            _rule(
                rules,
                "F5",
                name,
                f"headline epsilon {eps:.6g} is below {c['name']} ({_num(c['epsilon']):.6g})",
                f"/accounting/{name}/cross_checks",
            )
        elif "ledger" in c["name"] and diff > policy["recompute_rtol"]:
            _rule(
                rules,
                "F2",
                name,
                f"recomputed epsilon differs from the logged one by {diff:.2g}",
                f"/accounting/{name}/cross_checks",
            )
    for w in acc.get("accountant_warnings", []):
        _rule(
            rules,
            "W4",
            name,
            f"an accountant warned: {w}",
            f"/accounting/{name}/accountant_warnings",
        )
    if acc.get("order_edge"):
        _rule(
            rules,
            "W1",
            name,
            f"optimal order {acc['optimal_order']:g} is at an edge of the grid",
            f"/accounting/{name}/optimal_order",
        )
    ledger = doc["ledgers"].get(name)
    if ledger is not None:
        if not ledger["verified"]:
            _rule(
                rules,
                "F2",
                name,
                "the ledger does not verify ("
                f"{ledger.get('failure', 'hash chain')}): nothing it records can be composed",
                f"/ledgers/{name}/verified",
            )
        logged, recomputed = ledger["logged_epsilon"], ledger["recomputed_epsilon"]
        rel = (
            0.0
            if logged is None or recomputed is None
            else (abs(recomputed - logged) / max(1.0, eps))
        )
        if rel > policy["recompute_rtol"]:
            _rule(
                rules,
                "F2",
                name,
                f"recomputed and logged epsilon differ by {rel:.2g} relative",
                f"/ledgers/{name}/recomputed_epsilon",
            )
    frac = budget.get("spent_fraction")
    if budget.get("overrun"):
        _rule(
            rules,
            "F3",
            name,
            "budget overrun: " + "; ".join(budget["overrun"]),
            f"/budget/{name}/overrun",
        )
    elif frac is not None and frac > 1 + policy["overrun_rtol"]:
        _rule(
            rules,
            "F3",
            name,
            f"spent {frac:.4g} of the budget at a monitored order",
            f"/budget/{name}/spent_fraction",
        )
    elif frac is not None and frac >= policy["budget_warning_fraction"]:
        _rule(
            rules,
            "W6",
            name,
            f"{frac:.0%} of the budget is spent",
            f"/budget/{name}/spent_fraction",
        )
    unit = doc["data"]["units"].get(name)
    if unit is not None and not unit["delta_below_1_over_n"]:
        _rule(
            rules,
            "W5",
            name,
            f"delta {unit['delta']:g} >= 1/n (n = {unit['n']} {unit['n_kind']})",
            f"/data/units/{name}",
        )
    audit = doc["audit"]
    row = audit.get("rows", {}).get(name) if audit.get("attached") else None
    if row is None:
        _rule(rules, "W9", name, "no audit result for this mechanism", "/audit/attached")
        return
    ub = row["epsilon_ub"]
    for key in ("epsilon_pair", "epsilon_lb"):
        if mech["certified"] and ub is not None and row[key] is not None and row[key] > ub:
            _rule(
                rules,
                "F1",
                name,
                f"{key} {row[key]:.4g} exceeds the claim {ub:.4g}",
                f"/audit/rows/{name}/{key}",
            )
    if mech["certified"] and row["alarms"]:
        _rule(
            rules, "F1", name, f"{len(row['alarms'])} audit alarm(s)", f"/audit/rows/{name}/alarms"
        )
    power = audit.get("power", {})
    no_mutant = power.get("attached") and power.get("mutants_detected") == 0
    if row.get("inconclusive") or no_mutant:
        why = (
            "a positive control failed"
            if row.get("inconclusive")
            else "no planted mutant was detected"
        )
        _rule(
            rules,
            "W10",
            name,
            f"audit INCONCLUSIVE: {why}, so the audit lacked power to see a "
            "leak (not evidence for the claim)",
            f"/audit/rows/{name}/inconclusive",
        )
    if row.get("conformance_passed") is False:
        _rule(
            rules,
            "F7",
            name,
            "the sampler's chi-square conformance test rejected",
            f"/audit/rows/{name}/conformance_passed",
        )
    for k in ("tpr_at_fpr_0.001", "tpr_at_fpr_0.01"):
        n0 = row["n"][0] if row.get("n") else None
        fpr = float(k.rsplit("_", 1)[1])
        if n0 is not None and n0 * fpr < 10:
            _rule(
                rules,
                "W3",
                name,
                f"TPR at FPR {fpr:g} is reported with n0 = {n0} (n0*FPR < 10: no resolution)",
                f"/audit/rows/{name}/{k}",
            )


def compute_verdict(doc: dict, policy: dict | None = None) -> dict:
    """``{"level", "rules", "policy", "overall_from"}`` for the document ``doc``."""
    policy = policy or load_policy()
    rules: list[dict] = []
    for name in doc["mechanisms"]:
        _mechanism_rules(doc, name, policy, rules)
    audit = doc["audit"]
    if audit.get("attached") and not audit["controls_passed"]:
        failed = [c["id"] for c in audit["controls"] if not c["passed"]]
        _rule(
            rules,
            "F7",
            None,
            f"audit invalid: control(s) {', '.join(failed)} failed",
            "/audit/controls",
        )
    missing = [k for k in ("owner", "dpia_reference") if doc["identity"].get(k) is None]
    if doc["governance"].get("sign_off") is None:
        missing.append("sign_off")
    if missing:
        _rule(rules, "W8", None, f"governance fields missing: {', '.join(missing)}", "/identity")
    counted = [r for r in rules if r["mechanism"] not in policy["comparison_only"]]
    level = max((r["level"] for r in counted), key=_ORDER.__getitem__, default="pass")
    return {
        "level": level,
        "rules": rules,
        "policy": {
            "file": POLICY_PATH.name,
            "version": policy["policy_version"],
            "sha256": policy["sha256"],
            "comparison_only": policy["comparison_only"],
        },
        "overall_from": "the worst rule over mechanisms offered for sign-off",
    }

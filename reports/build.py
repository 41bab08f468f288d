"""The canonical report object of one run directory (REPORT.md §4), built from its result files.

``reports/`` never computes privacy: ε values, curves and checks come from ``accounting/`` (ledger
composition, burn-down, profiles, DP-SGD accounting), ``audit/`` (``audit.json``) and the run's
``metrics.json``; this module lays them out in the ten groups of the schema. :func:`build_report`
returns (public document, restricted annex); the annex holds the λ statistics and the audit's
restricted values and is written only to a 0600 file.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import warnings
from pathlib import Path

import numpy as np

import accounting
from reports.rundir import AUDIT, AUDIT_RESTRICTED, CONFIG, DPSGD, METRICS, POWER, RunDir
from reports.schema import SCHEMA_VERSION
from reports.texts import GOVERNANCE, IMPLEMENTATION, statement

__all__ = ["build_report", "ledgers_of"]

DELTAS = [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10]


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


#: Who a PMixED ledger's tokens went to: the demo's evaluation, or the traffic a deployment served.
ROLES = {
    "evaluation": "evaluation (teacher-forced predictions scored on held-out text; no text "
    "released to users)",
    "served": "served deployment (tokens released to the callers of pmixed generate/serve)",
}


def _pmixed_entries(
    run: Path, name: str, ledger: str, delta: float, logged: float | None, role: str
) -> dict:
    """Groups 4-7 of one PMixED deployment, from its ledger (and the evaluation's logged claim).

    A ledger whose chain, signatures or restricted file do not verify still gets its entries
    (``verified`` false, ε unknown = "inf"), so the report FAILs on it (F2) instead of not being
    written; an overrun ledger verifies as a chain and carries its ``overrun`` lines (F3)."""
    path = run / ledger
    check = accounting.verify(path, restricted=True)
    if not (check.ok or check.overrun):
        return _unverified(path, ledger, check, delta, logged, role)
    contents = accounting.read_ledger(path)  # read once: composed and its header used below
    spent = accounting.compose(contents, delta)
    header = contents.header
    cal = header["calibration"]
    budget = header["budget"]
    order = spent.optimal_order
    trace = accounting.cost_trace(path, order)
    private = np.array([c for c, p in zip(trace["rdp"], trace["public"]) if not p])
    limits = accounting.PrivacyBudget(
        budget["epsilon"], budget["delta"], tuple(budget["monitored_orders"])
    ).limits()
    used = [spent.rdp[spent.orders.index(k)] for k in budget["monitored_orders"]]
    checks = [{"name": "ledger recomputed (fsum of curves)", "epsilon": spent.epsilon_cross_check}]
    if logged is not None:
        checks.append({"name": "logged in metrics.json", "epsilon": logged})
    return {
        "mechanism": {
            "kind": "pmixed",
            "role": role,
            "mode": cal["mode"],
            "relation": cal["relation"],
            "certified": spent.certified,
            "n_members": cal["n_members"],
            "sampling_rate": cal["sampling_rate"],
            "beta": cal["beta"],
            "beta_by_size": cal["beta_by_size"],
            "amplification": cal["amplification"],
            "orders": [spent.orders[0], spent.orders[-1]],
            "query_budget": cal["query_budget"],
            "temperature_top_k": "chosen from the public distribution only, before mixing",
            "fallback": "empty subsample or exhausted budget: the public model answers (zero "
            "cost, recorded)",
            "sampler": cal.get("sampler", "float64 inverse CDF (53-bit uniform)"),
        },
        "accounting": {
            "epsilon": spent.epsilon,
            "delta": spent.delta,
            "optimal_order": order,
            "delta_sampler": spent.delta_sampler,
            "order_edge": order in (spent.orders[0], spent.orders[-1]),
            "accountant": spent.to_json()["accountant"] + " (PMixEDAccountant over the ledger)",
            "conversion": "dp-accounting compute_epsilon (Canonne-Kamath-Steinke / Balle et al.)",
            "status": spent.status,
            "cross_checks": checks,
            "rdp": {"orders": list(spent.orders), "rdp": [_finite(r) for r in spent.rdp]},
            "by_order": [
                _finite(e)
                for e in accounting.epsilon_by_order(spent.orders, spent.rdp, spent.delta)
            ],
            "profile": accounting.privacy_profile(spent.orders, spent.rdp, DELTAS),
        },
        "budget": {
            "epsilon": budget["epsilon"],
            "delta": budget["delta"],
            "monitored_orders": budget["monitored_orders"],
            "limit_rdp": [float(x) for x in limits],
            "spent_rdp": used,
            "spent_fraction": max(u / lim for u, lim in zip(used, limits)),
            "overrun": list(spent.overrun),
            "queries_served": spent.steps,
            "public_steps": spent.public_steps,
            "query_budget": cal["query_budget"],
            "at_exhaustion": "the filter refuses the charge; the generator then answers from the "
            "public model only (or refuses, if so configured)",
            "burn_down": accounting.burn_down(path, delta),
        },
        "ledger": {
            "file": ledger,
            "role": role,
            "verified": True,
            "records": check.records,
            "queries": check.queries,
            "head": check.head,
            "file_sha256": _sha256(path),
            "signature": check.signature,
            "cost_at_optimal_order": {
                "order": order,
                "min": float(private.min()),
                "median": float(np.median(private)),
                "max": float(private.max()),
            }
            if private.size
            else None,
            "recomputed_epsilon": spent.epsilon,
            "logged_epsilon": logged,
            "recompute_command": _recompute(ledger, check.head, delta),
            "cost_trace": trace,
        },
    }


def _recompute(ledger: str, head: str | None, delta: float) -> str:
    return (
        f"pmixed verify-ledger {ledger} --expect-head {head} "
        f"&& pmixed account {ledger} --delta {delta:g}"
    )


def _header_line(path: Path) -> dict:
    """The first record of a ledger that does not verify, if it still parses (else {})."""
    try:
        first = json.loads(path.read_bytes().split(b"\n", 1)[0])
    except (OSError, ValueError):
        return {}
    return first if isinstance(first, dict) else {}


def _unverified(
    path: Path, ledger: str, check, delta: float, logged: float | None, role: str
) -> dict:
    header = _header_line(path)
    cal = header.get("calibration") if isinstance(header.get("calibration"), dict) else {}
    budget = header.get("budget") if isinstance(header.get("budget"), dict) else {}
    failure = f"line {check.line}: {check.reason}"
    return {
        "mechanism": {
            "kind": "pmixed",
            "role": role,
            "mode": cal.get("mode", "unknown"),
            "relation": cal.get("relation", "unknown"),
            "certified": header.get("status") in ("certified", "conditional"),
            "query_budget": cal.get("query_budget"),
            "ledger_failure": failure,
        },
        "accounting": {
            "epsilon": "inf",
            "delta": delta,
            "status": "unverified",
            "accountant": "none: the ledger does not verify, so nothing it records can be composed",
            "conversion": "none",
            "cross_checks": [],
            "profile": [],
        },
        "budget": {
            "epsilon": budget.get("epsilon"),
            "delta": budget.get("delta", delta),
            "burn_down": [],
            "spent_fraction": None,
            "overrun": [],
            "queries_served": check.queries,
            "at_exhaustion": "unknown: the ledger does not verify",
        },
        "ledger": {
            "file": ledger,
            "role": role,
            "verified": False,
            "failure": failure,
            "records": check.records,
            "queries": check.queries,
            "head": check.head,
            "file_sha256": _sha256(path) if path.exists() else None,
            "signature": check.signature,
            "recomputed_epsilon": None,
            "logged_epsilon": logged,
            "recompute_command": _recompute(ledger, check.head, delta),
            "cost_trace": {"order": None, "rdp": [], "public": []},
        },
    }


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def _dpsgd(run: Path, cfg: dict, privacy: dict) -> dict:
    dp = RunDir(run).read_json(DPSGD)
    delta = cfg["delta"]
    q, sigma, steps = dp["sample_rate"], dp["noise_multiplier"], dp["steps"]
    grid = sorted({max(1, round(steps * f)) for f in np.linspace(0, 1, 24)})
    pld_grid = set(grid[:: max(1, len(grid) // 6)] + [grid[-1]])  # PLD is ~1 s a point
    profile = accounting.dpsgd_profile(sigma, q, steps, DELTAS)
    with warnings.catch_warnings(record=True) as caught:  # an accountant's own warnings: W4
        warnings.simplefilter("always")
        rdp = accounting.from_opacus([tuple(h) for h in dp["history"]], delta)
    emitted = sorted({str(w.message).splitlines()[0] for w in caught})
    return {
        "mechanism": {
            "kind": "dpsgd",
            "noise_multiplier": sigma,
            "max_grad_norm": dp["max_grad_norm"],
            "batch_size": cfg["dpsgd_batch"],
            "sample_rate": q,
            "steps": steps,
            "epochs": cfg["dpsgd_epochs"],
            "sampling": "Poisson (Opacus DPDataLoader)",
            "empty_batches": dp["empty_batches"],
            "microbatching": "none (per-sample gradients)",
            "adaptive_clipping": False,
            "relation": "add_remove",
            "certified": True,
        },
        "accounting": {
            "epsilon": privacy["dpsgd"]["epsilon"],
            "delta": delta,
            "accountant": privacy["dpsgd"]["accountant"],
            "conversion": "dp-accounting compute_epsilon",
            "status": "certified",
            "cross_checks": [
                {"name": "dp-accounting PLD", "epsilon": rdp.pld},
                {"name": "Opacus RDP accountant", "epsilon": dp["epsilon_opacus"]},
            ],
            "accountant_warnings": emitted,
            "profile": [
                {"delta": d, "epsilon": e, "epsilon_pld": p}
                for d, e, p in zip(DELTAS, profile["rdp"], profile["pld"])
            ],
        },
        "budget": {
            "epsilon": cfg["epsilon"],
            "delta": delta,
            "steps": steps,
            "at_exhaustion": "training stops after the planned steps; the noise was calibrated "
            "so that the final epsilon does not exceed the target",
            "burn_down": [
                {"steps": k, "epsilon": e, "epsilon_pld": p}
                for k, (e, p) in zip(
                    grid, accounting.dpsgd_burn_down(sigma, q, grid, delta, pld_grid)
                )
            ],
        },
    }


def _audit(run: Path) -> tuple[dict, str]:
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
        "sha256": _sha256(path),
        "power": _power(run, controls_ok),
        "statement": a["statement"],
        "rows": rows,
        "controls": a["controls"],
        "controls_passed": a["controls_passed"],
        "alarms": a["alarms"],
        "plan": {k: a["plan"][k] for k in ("n_contexts", "conformance_samples", "eta", "seed")},
        "game": a["mechanisms"].get("pmixed_certified_replace_one", {}).get("game"),
        "exposure": a["mechanisms"].get("pmixed_certified_replace_one", {}).get("exposure"),
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
            sha256=_sha256(path),
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


def ledgers_of(privacy: dict) -> dict[str, str]:
    """The PMixED evaluation deployments of a run (name -> ledger file), from ``metrics.json``."""
    return {name: p["ledger"] for name, p in privacy.items() if "ledger" in p}


def served_ledgers(run: Path, privacy: dict) -> dict[str, str]:
    """Every other ledger in the run directory (``generate.jsonl``, server ledgers): the traffic
    the deployment actually answered, named ``served_<file stem>``."""
    evaluation = set(ledgers_of(privacy).values())
    return {
        f"served_{Path(name).stem.replace('-', '_')}": name
        for name in RunDir(run).ledgers()
        if name not in evaluation
    }


def _audited_as(name: str, mechanisms: dict, rows: dict) -> str | None:
    """The evaluation deployment whose audit covers a served one: same mode, relation and β
    (the same models and calibration, so the same exact pairs)."""
    m = mechanisms[name]["mechanism"]
    for other, o in mechanisms.items():
        o = o["mechanism"]
        if (
            other != name
            and o.get("role") == "evaluation"
            and other in rows
            and all(
                o.get(k) == m.get(k)
                for k in ("mode", "relation", "beta", "n_members", "sampling_rate")
            )
        ):
            return other
    return None


def _lambda_stats(run: Path, ledgers: dict[str, str]) -> dict:
    """Restricted: λ statistics per deployment from the 0600 ledger siblings."""
    out = {}
    for name, ledger in ledgers.items():
        path = accounting.restricted_path(run / ledger)
        lams, sizes = [], []
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "data":
                lams += rec["data"].get("lambdas", [])
                sizes.append(len(rec["data"].get("subset", [])))
        if lams:
            q = np.percentile(lams, [0, 5, 50, 95, 100]).tolist()
            out[name] = {
                "lambda_min_p5_median_p95_max": q,
                "lambda_mean": float(np.mean(lams)),
                "subset_size_mean": float(np.mean(sizes)),
                "queries": len(sizes),
            }
    return out


def _public_model(cfg: dict, corpus: str, base: dict | None = None) -> str:
    """What the public model is, from the run's own config (never a fixed text)."""
    if base is not None:  # the user's own model (pmixed train --base)
        layers = f"{base['layers']} layers, " if base.get("layers") else ""
        return (
            f"the base model at {base['path']} ({base['model_type']}, {layers}vocabulary "
            f"{base['vocab_size']}, context {base['context']}; weights fingerprint "
            f"sha256:{base['sha256'][:16]}), used as given: the members are LoRA adapters on "
            "it and the private records never change it"
        )
    m = cfg["model"]
    public = (
        "the public plays of " + corpus
        if corpus.startswith("shakespeare")
        else f"the public text folder {cfg.get('public_dir') or corpus}"
    )
    return (
        f"GPT-2 architecture built from a config ({m['n_layer']} layers, width {m['n_embd']}, "
        f"vocabulary {m['vocab_size']}, context {m['block_size']}) and trained on {public} "
        "only"
    )


def build_report(run: str | Path) -> tuple[dict, dict]:
    """(public report document, restricted annex) of the run directory ``run``."""
    run = Path(run)
    config, metrics = RunDir(run).read_json(CONFIG), RunDir(run).read_json(METRICS)
    cfg, privacy = config["demo"], metrics["privacy"]
    ledgers = ledgers_of(privacy)
    served = served_ledgers(run, privacy)
    mechanisms = {
        name: _pmixed_entries(
            run, name, ledger, cfg["delta"], privacy[name]["epsilon"], "evaluation"
        )
        for name, ledger in ledgers.items()
    }
    mechanisms.update(
        {
            name: _pmixed_entries(run, name, ledger, cfg["delta"], None, "served")
            for name, ledger in served.items()
        }
    )
    mechanisms["dpsgd"] = _dpsgd(run, cfg, privacy)
    audit, _ = _audit(run)
    for name in served:
        source = _audited_as(name, mechanisms, audit.get("rows", {}))
        if source is not None:
            audit["rows"][name] = {**audit["rows"][source], "audited_as": source}
    users = config["users"]
    n_records = round(cfg["dpsgd_batch"] / mechanisms["dpsgd"]["mechanism"]["sample_rate"])
    unit_names = {
        "add_remove": "one ensemble member (one partition of users)",
        "replace_one": "one user (its partition's member replaced)",
    }
    units = {
        name: (users["train"], "users")
        if mechanisms[name]["mechanism"]["relation"] == "replace_one"
        else (cfg["n_members"], "partitions")
        for name in [*ledgers, *served]
    }
    units["dpsgd"] = (n_records, "training blocks")
    unit_of = {
        name: privacy[name]["unit"]
        if name in privacy
        else unit_names.get(mechanisms[name]["mechanism"]["relation"], "unknown")
        for name in units
    }
    data = {
        "corpus": config["corpus"],
        "users": users,
        "n_members": cfg["n_members"],
        "heldout_fraction": cfg["heldout_fraction"],
        "partition_key": "SHA-256 of (salt, domain, user id) mod N, before any chunking: all "
        "records of one user sit in one partition",
        "units": {
            name: {
                "unit": unit_of[name],
                "relation": mechanisms[name]["mechanism"]["relation"],
                "n": n,
                "n_kind": kind,
                "delta": cfg["delta"],
                "delta_below_1_over_n": cfg["delta"] < 1.0 / n,
            }
            for name, (n, kind) in units.items()
        },
    }
    inputs = {p.name: _sha256(p) for p in RunDir(run).inputs()}
    inputs.update(
        {ledger: _sha256(run / ledger) for ledger in [*ledgers.values(), *served.values()]}
    )
    doc = {
        "schema_version": SCHEMA_VERSION,
        "report_id": hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16],
        "identity": {
            "corpus": config["corpus"],
            "stage_hashes": config["stage_hashes"],
            "versions": config["versions"],
            "code_git_sha": _git_sha(),
            "inputs": inputs,
            "public_model": _public_model(cfg, config["corpus"], config.get("base")),
            "owner": None,
            "dpia_reference": None,
        },
        "data": data,
        "statements": {
            name: statement(name, mechanisms[name], data["units"][name], audit)
            for name in mechanisms
        },
        "mechanisms": {name: m["mechanism"] for name, m in mechanisms.items()},
        "accounting": {name: m["accounting"] for name, m in mechanisms.items()},
        "budget": {name: m["budget"] for name, m in mechanisms.items()},
        "ledgers": {name: m["ledger"] for name, m in mechanisms.items() if "ledger" in m},
        "composition": "The DP-SGD model and the PMixED ensembles are trained on the same "
        "records: releasing both composes their guarantees (epsilons add)",
        "audit": audit,
        "utility": {
            "perplexity": metrics["perplexity"],
            "note": metrics["note"],
            "epsilon": {n: p["epsilon"] for n, p in privacy.items()},
        },
        "implementation": IMPLEMENTATION,
        "governance": GOVERNANCE,
    }
    verified = {
        n: f for n, f in {**ledgers, **served}.items() if mechanisms[n]["ledger"]["verified"]
    }
    annex = {"lambda_statistics": _lambda_stats(run, verified)}
    restricted_audit = run / AUDIT_RESTRICTED
    if restricted_audit.exists():
        r = json.loads(restricted_audit.read_text())
        annex["audit"] = {
            "member": r.get("member"),
            "game": {
                k: r["game"][k]
                for k in ("target", "target_p0", "canary_member_p_target", "copies")
                if k in r.get("game", {})
            },
        }
    return doc, annex

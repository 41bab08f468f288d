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
import subprocess
from pathlib import Path

import numpy as np

import accounting
from reports.audit_section import audit_section
from reports.mechanisms import dpsgd_entries, pmixed_entries
from reports.rundir import AUDIT_RESTRICTED, CONFIG, METRICS, RunDir, file_sha256
from reports.schema import SCHEMA_VERSION
from reports.texts import GOVERNANCE, IMPLEMENTATION, statement

__all__ = ["build_report", "ledgers_of"]


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
        name: pmixed_entries(
            run, name, ledger, cfg["delta"], privacy[name]["epsilon"], "evaluation"
        )
        for name, ledger in ledgers.items()
    }
    mechanisms.update(
        {
            name: pmixed_entries(run, name, ledger, cfg["delta"], None, "served")
            for name, ledger in served.items()
        }
    )
    mechanisms["dpsgd"] = dpsgd_entries(run, cfg, privacy)
    audit, _ = audit_section(run)
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
    inputs = {p.name: file_sha256(p) for p in RunDir(run).inputs()}
    inputs.update(
        {ledger: file_sha256(run / ledger) for ledger in [*ledgers.values(), *served.values()]}
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

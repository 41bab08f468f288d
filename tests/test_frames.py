"""pandas at the edges: the ledger, the audit results and the metrics of a real (tiny) run as
DataFrames, the CSV export, and restricted columns only on request."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from accounting import LedgerCorrupt, compose, read_ledger, verify
from accounting.frames import PUBLIC_COLUMNS, ledger_frame
from audit.frames import AUDIT_COLUMNS, audit_frame, scores_frame
from campaign.cli import main
from reports.frames import METRICS_COLUMNS, metrics_frame


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run[0]


def test_ledger_frame_round_trips_every_record_of_a_real_ledger(run):
    path = run / "ledger.jsonl"
    frame = ledger_frame(path)
    lines = path.read_bytes().splitlines()
    assert len(frame) == len(lines) == verify(path).records
    assert list(frame["hash"]) == [json.loads(line)["hash"] for line in lines]
    assert list(frame["seq"]) == list(range(len(lines)))
    contents = read_ledger(path)
    assert frame["kind"].value_counts()["query"] == contents.n_queries
    assert frame["public_step"].sum() == contents.n_public_steps
    orders = [float(k) for k in contents.header["budget"]["monitored_orders"]]
    extra = [c for k in orders for c in (f"rdp@{k:g}", f"spent@{k:g}")]
    assert list(frame.columns) == [*PUBLIC_COLUMNS, *extra]  # the documented columns, in order
    spent = compose(path, 1e-5)
    for k in orders:
        total = spent.rdp[spent.orders.index(k)]
        assert math.isclose(frame[f"spent@{k:g}"].iloc[-1], total, rel_tol=1e-12)
        assert math.isclose(math.fsum(frame[f"rdp@{k:g}"].dropna()), total, rel_tol=1e-12)
    assert frame["query"].dropna().tolist() == list(range(1, contents.n_queries + 1))


def test_restricted_columns_only_on_request_and_csv_export_round_trips(run, tmp_path, capsys):
    path = run / "ledger.jsonl"
    public = ledger_frame(path)
    assert not [c for c in public.columns if c.startswith("restricted")]
    secret = ledger_frame(path, restricted=True)
    assert len(secret) == len(public)
    assert {"restricted.subset", "restricted.lambdas", "restricted.seed"} <= set(secret.columns)
    queries = secret[secret["kind"] == "query"]
    assert all(isinstance(s, list) for s in queries["restricted.subset"])
    assert main(["ledger", "export", str(path), "--csv", str(tmp_path / "l.csv")]) == 0
    back = pd.read_csv(tmp_path / "l.csv")
    assert list(back.columns) == list(public.columns)
    assert (back["hash"] == public["hash"]).all() and (back["kind"] == public["kind"]).all()
    for col in [c for c in public.columns if c.startswith(("rdp@", "spent@"))]:
        assert np.allclose(back[col], public[col], rtol=0, atol=0, equal_nan=True)  # repr floats
    assert stat.S_IMODE(os.stat(tmp_path / "l.csv").st_mode) == 0o644
    assert (
        main(["ledger", "export", str(path), "--csv", str(tmp_path / "r.csv"), "--restricted"]) == 0
    )
    assert stat.S_IMODE(os.stat(tmp_path / "r.csv").st_mode) == 0o600
    subsets = pd.read_csv(tmp_path / "r.csv")["restricted.subset"].dropna().map(json.loads)
    assert subsets.tolist() == queries["restricted.subset"].tolist()
    assert "records (public columns)" in capsys.readouterr().out


def test_a_corrupted_ledger_fails_by_line_and_the_export_leaves_no_file(run, tmp_path, capsys):
    lines = (run / "ledger.jsonl").read_bytes().splitlines(keepends=True)
    bad = tmp_path / "ledger.jsonl"
    bad.write_bytes(b"".join(lines[:3] + [lines[3].replace(b'"seq":3', b'"seq":4')] + lines[4:]))
    with pytest.raises(LedgerCorrupt, match=r"ledger.jsonl:4: hash mismatch"):
        ledger_frame(bad)
    assert main(["ledger", "export", str(bad), "--csv", str(tmp_path / "x.csv")]) == 2
    assert "ledger.jsonl:4: hash mismatch" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl"]


def test_audit_results_and_metrics_as_frames(run):
    audit = json.loads((run / "audit.json").read_text())
    frame = audit_frame(run)
    assert list(frame.columns) == list(AUDIT_COLUMNS)
    exact = frame[frame["kind"] == "exact"].set_index("mechanism")["epsilon"]
    for name, m in audit["mechanisms"].items():
        if "exact_pair" in m:
            assert exact[name] == m["exact_pair"]["epsilon_pair"]
    assert set(frame["kind"]) == {"exact", "worst_case", "empirical"}
    claimed = frame.dropna(subset=["claim"])
    assert np.allclose(claimed["ratio"], claimed["epsilon"] / claimed["claim"])
    assert frame["alarm"].dtype == bool
    with pytest.raises(PermissionError, match="restricted=True"):
        scores_frame(run)
    scores = scores_frame(run, restricted=True)
    annex = json.loads((run / "audit.restricted.json").read_text())
    assert len(scores[(scores.model == "dpsgd") & (scores.attack == "loss")]) == len(
        annex["dpsgd"]["loss"]["in"]
    ) + len(annex["dpsgd"]["loss"]["out"])
    metrics = metrics_frame(run)
    assert list(metrics.columns) == list(METRICS_COLUMNS)
    raw = json.loads((run / "metrics.json").read_text())
    assert list(metrics["model"]) == list(raw["perplexity"])
    row = metrics.set_index("model").loc["pmixed_reference"]
    assert row["status"] == "UNCERTIFIED"
    assert row["perplexity"] == raw["perplexity"]["pmixed_reference"]["exact"]


def test_accounting_and_pmixed_import_without_pandas():
    code = (
        "import sys, accounting, accounting.frames, pmixed, pmixed.generator, pmixed.backend; "
        "print('pandas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

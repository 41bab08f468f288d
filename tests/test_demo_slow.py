"""End-to-end `pmixed demo --quick` in a subprocess (slow: `make test-all`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import accounting

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_writes_its_files_and_the_ledger_recomputes(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "campaign.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pmixed_certified_add_remove" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    spent = accounting.compose(out / "ledger.jsonl", 1e-5)
    assert spent.epsilon == pytest.approx(
        metrics["privacy"]["pmixed_certified_add_remove"]["epsilon"]
    )
    assert accounting.verify(out / "ledger.jsonl", restricted=True).ok
    assert (
        metrics["perplexity"]["pmixed_certified_add_remove"]["exact"]
        < metrics["perplexity"]["public"]
    )
    audit = json.loads((out / "audit.json").read_text())
    controls = {c["id"]: c for c in audit["controls"]}
    assert audit["controls_passed"] and controls["C3-lm"]["epsilon_lb"] >= 1.0  # positive control
    dpsgd = audit["mechanisms"]["dpsgd"]["empirical"][0]
    assert dpsgd["one_run"]["epsilon_lb"] <= dpsgd["claim"]["epsilon_ub"]
    certified = {n for n, m in audit["mechanisms"].items() if m["claim"]["certified"]}
    assert not [a for a in audit["alarms"] if a["mechanism"] in certified]
    power = json.loads((out / "power.json").read_text())["mutants"]  # the demo's power stage
    assert power["all_detected"] and power["twins_clean"], power
    assert all(m["twin_repetitions"] in (0, 100) for m in power["mutants"].values())
    assert "Planted violations detected" in (out / "report.md").read_text()

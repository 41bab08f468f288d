"""The `pmixed` console script: calibrate and the foundation demo."""

from __future__ import annotations

import json

import pmixed
from reports.cli import main


def test_public_api_names_are_exported():
    for name in ("renyi_divergence", "PMixEDConfig", "Calibration", "mollify", "step",
                 "exact_released_law", "StepResult"):  # fmt: skip
        assert name in pmixed.__all__
        assert hasattr(pmixed, name)


def test_calibrate_prints_json_with_the_worked_beta(capsys):
    assert main(["calibrate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["beta"] - 0.1707) < 1e-4
    assert out["status"] == "certified"


def test_bad_input_exits_2_with_a_one_line_reason(capsys):
    assert main(["calibrate", "--sampling-rate", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sampling_rate must be in (0, 1]. Found 1.5." in err
    assert "\n" not in err


def test_demo_separates_certified_from_reference_accounting(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["exact_audit"]["certified"]["ratio"] <= 1.0
    assert result["exact_audit"]["reference"]["ratio"] > 2.0
    assert result["calibration"]["reference"]["status"] == "UNCERTIFIED"
    assert "UNCERTIFIED: not a DP guarantee" in capsys.readouterr().out

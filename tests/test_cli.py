"""The `pmixed` console script: calibrate and the foundation demo."""

from __future__ import annotations

import json

import pmixed
from campaign.cli import main


def test_public_api_names_are_exported():
    for name in (
        "renyi_divergence",
        "PMixEDConfig",
        "Calibration",
        "mollify",
        "step",
        "exact_released_law",
        "StepResult",
    ):
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


def test_exact_audit_separates_certified_from_reference_accounting(tmp_path, capsys):
    assert main(["exact-audit", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "exact_audit.json").read_text())
    assert result["exact_audit"]["certified"]["ratio"] <= 1.0
    assert result["exact_audit"]["reference"]["ratio"] > 2.0
    assert result["calibration"]["reference"]["status"] == "UNCERTIFIED"
    assert "UNCERTIFIED: not a DP guarantee" in capsys.readouterr().out


_TOY = ["--n-members", "2", "--sampling-rate", "0.1", "--query-budget", "100"]
_SEARCH = ["--starts", "30", "--refine", "1", "--iterations", "60"]


def test_worst_case_exits_1_on_reference_mode_and_0_within_a_certified_charge(capsys):
    """RO: reference mode's per-record claim breaks on the toy; the certified RO charge holds."""
    ref = ["worst-case", *_TOY, *_SEARCH, "--mode", "reference", "--pair", "replace_one"]
    assert main([*ref, "--json"]) == 1
    bad = json.loads(capsys.readouterr().out)
    assert bad["alarm"] and bad["ratio"] > 2.0 and bad["relation"] == "replace_one"
    assert bad["deployment"]["status"] == "UNCERTIFIED" and bad["seed"] == 0
    cert = ["worst-case", *_TOY, *_SEARCH, "--relation", "replace_one", "--pair", "replace_one"]
    assert main(cert) == 0
    out = capsys.readouterr().out
    assert "within the charge" in out and "pair=replace_one" in out


def test_worst_case_bad_input_exits_2_naming_the_flag(capsys):
    for argv, message in [
        (["--pair", "replace_one"], "--pair replace_one needs --relation replace_one"),
        (["--vocab", "1"], "--vocab must be >= 2. Found 1."),
        (["--starts", "2", "--refine", "3"], "--refine must be <= --starts (2). Found 3."),
    ]:
        assert main(["worst-case", *_TOY, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def _ledger(tmp_path, mode="certified"):
    from pmixed.ledgering import create_ledger, query_event

    extra = {"mode": "reference"} if mode == "reference" else {}
    cal = pmixed.PMixEDConfig(
        n_members=4,
        sampling_rate=0.1,
        epsilon=8.0,
        delta=1e-5,
        query_budget=50,
        orders=tuple(range(2, 13)),
        **extra,
    ).calibrate()
    path = tmp_path / f"{mode}.jsonl"
    budget = {"epsilon": 8.0, "delta": 1e-5, "monitored_orders": [cal.planned_order]}
    with create_ledger(path, cal, budget=budget) as led:
        for _ in range(50):
            led.append(query_event(cal))
    return path, json.loads(path.read_bytes().splitlines()[-1])["hash"], cal


def test_verify_ledger_exits_0_when_intact_and_1_with_the_first_fault(tmp_path, capsys):
    path, head, _ = _ledger(tmp_path)
    assert main(["verify-ledger", str(path), "--expect-head", head]) == 0
    assert "OK, 52 records, 50 queries" in capsys.readouterr().out
    assert main(["verify-ledger", str(path), "--expect-head", "sha256:" + "ab" * 32]) == 1
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:10] + lines[11:]))
    assert main(["verify-ledger", str(path)]) == 1
    assert f"FAIL {path}:11: broken chain" in capsys.readouterr().out
    assert main(["verify-ledger", str(path), "--expect-head", "sha256:12"]) == 2


def test_account_recomputes_the_planned_epsilon(tmp_path, capsys):
    path, _, cal = _ledger(tmp_path)
    assert main(["account", str(path), "--delta", "1e-5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["epsilon"] - cal.planned_epsilon) < 1e-9
    assert out["steps"] == 50 and out["certified"] is True
    assert out["optimal_order"] == cal.planned_order
    assert main(["account", str(path), "--delta", "1e-5"]) == 0
    text = capsys.readouterr().out
    assert "certified      yes" in text and "steps          50" in text
    assert f"RDP at order {cal.planned_order} spent" in text
    ref, _, _ = _ledger(tmp_path, "reference")
    assert main(["account", str(ref), "--delta", "1e-5"]) == 0
    assert "UNCERTIFIED: not a DP guarantee" in capsys.readouterr().out
    assert main(["account", str(path), "--delta", "2"]) == 2
    path.write_bytes(path.read_bytes()[:-5])
    assert main(["account", str(path), "--delta", "1e-5"]) == 1

"""The compliance report: schema, restricted values, self-contained HTML, verdict rules, rendering."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator

import accounting
from reports.render import fmt
from reports.report import leaks, restricted_numbers, write_report
from reports.schema import SCHEMA_PATH, json_schema, validate
from reports.verdict import compute_verdict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
SECTIONS = (
    "verdict",
    "epsilon",
    "statement",
    "data",
    "mechanism",
    "accounting",
    "budget",
    "ledger",
    "audit",
    "utility",
    "implementation",
    "governance",
)


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    """A copy of the tiny run with its report rebuilt at a fixed creation time."""
    out = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_run[0], out)
    mp = pytest.MonkeyPatch()
    mp.setenv("SOURCE_DATE_EPOCH", "1800000000")
    doc = write_report(out)
    yield out, doc
    mp.undo()


def _public_bytes(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in ("report.json", "report.md", "report.html")}


def test_report_files_exist_and_validate_against_the_shipped_schema(report):
    out, doc = report
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema()  # the shipped file is current
    loaded = json.loads((out / "report.json").read_text())
    assert loaded == doc
    assert not list(Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).iter_errors(loaded))
    assert stat.S_IMODE((out / "report.restricted.md").stat().st_mode) == 0o600
    assert doc["verdict"]["level"] in ("pass", "warning", "fail")


def test_validation_names_the_field(report):
    _, doc = report
    bad = copy.deepcopy(doc)
    del bad["ledgers"]["pmixed_certified_add_remove"]["head"]
    bad["accounting"]["dpsgd"]["epsilon"] = float("nan")
    with pytest.raises(ValueError) as err:
        validate(bad)
    assert "/ledgers/pmixed_certified_add_remove: 'head' is a required property" in str(err.value)
    assert "/accounting/dpsgd/epsilon: nan is not allowed" in str(err.value)


def test_public_files_hold_no_restricted_value(report):
    out, _ = report
    public = b"\n".join(_public_bytes(out).values())
    lambdas = []
    for ledger in ("ledger.jsonl", "ledger-replace_one.jsonl", "ledger-reference.jsonl"):
        for line in accounting.restricted_path(out / ledger).read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "data":
                lambdas += rec["data"]["lambdas"]
    assert len(lambdas) > 10
    for lam in lambdas:  # byte-level, in the forms a renderer could use
        for text in (repr(lam), f"{lam:.6g}", f"{lam:.4g}" if lam < 0.999 else "x"):
            if len(text) >= 5:
                assert text.encode() not in public, text
    stats = np.percentile(lambdas, [5, 50, 95])
    annex = (out / "report.restricted.md").read_text()
    assert "RESTRICTED" in annex and f"{stats[1]:.6g}" in annex
    assert b"target_p0" not in public and b'"member":' not in public


def test_the_write_check_finds_annex_numbers_outside_figures():
    secrets = {s for s in restricted_numbers({"a": [0.2608601234, {"b": 0.5}]}) if len(s) >= 6}
    assert secrets == {"0.2608601234", "0.26086"}
    assert leaks("<p>lambda 0.26086</p>", secrets) == ["0.26086"]
    assert leaks('<svg><path d="M 0.26086 1"/></svg><p>ok</p>', secrets) == []


def test_regeneration_is_byte_identical(report, monkeypatch):
    out, _ = report
    before = {**_public_bytes(out), "annex": (out / "report.restricted.md").read_bytes()}
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1800000000")
    from campaign.cli import main

    expected = 1 if json.loads(before["report.json"])["verdict"]["level"] == "fail" else 0
    assert main(["report", "--run", str(out)]) == expected
    after = {**_public_bytes(out), "annex": (out / "report.restricted.md").read_bytes()}
    assert before == after


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.ids, self.cells, self._cell = [], [], set(), [], None
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.attrs.append((tag, a))
        if "id" in a:
            self.ids.add(a["id"])
        if "data-json-pointer" in a:
            self._cell = [a["data-json-pointer"], ""]

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if self._cell is not None and tag in ("td", "div", "code"):
            self.cells.append(tuple(self._cell))
            self._cell = None


def _at(doc, pointer):
    for part in pointer.strip("/").split("/"):
        doc = doc[part]
    return doc


def test_html_is_self_contained_and_shows_the_json_values(report):
    out, doc = report
    html = (out / "report.html").read_text()
    page = _Page()
    page.feed(html)
    assert html.startswith("<!doctype html>") and '<html lang="en">' in html
    assert '<meta charset="utf-8">' in html and "<title>" in html
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert not {"script", "link", "iframe", "object", "img", "embed"} & set(page.tags)
    for tag, attrs in page.attrs:
        for key, value in attrs.items():
            if key in ("src", "href", "xlink:href", "action"):
                assert not re.match(r"\s*(https?:|//|file:)", value or ""), (tag, key, value)
    assert not re.search(r"url\((?!#)|@import", html)  # only in-page references (SVG clip paths)
    assert set(SECTIONS) <= page.ids
    assert page.cells and all(
        text.strip() in (fmt(_at(doc, ptr)), f"Verdict: {fmt(_at(doc, ptr)).upper()}")
        for ptr, text in page.cells
    )
    assert len(html.encode()) < 5_000_000 and html.count("<svg") == 7


def test_verdict_rules_fire_on_the_evidence(report):
    _, doc = report
    # The tiny model learns nothing, so its positive control C3-lm fails: F7, audit invalid.
    assert compute_verdict(doc)["level"] == (
        "fail" if not doc["audit"]["controls_passed"] else compute_verdict(doc)["level"]
    )
    ok = copy.deepcopy(doc)
    for c in ok["audit"]["controls"]:
        c["passed"] = True
    ok["audit"]["controls_passed"] = True
    base = compute_verdict(ok)
    assert base["level"] != "fail"  # reference mode's F4 is listed but comparison only
    assert any(r["id"] == "F4" and r["mechanism"] == "pmixed_reference" for r in base["rules"])
    broken = copy.deepcopy(ok)
    broken["ledgers"]["pmixed_certified_add_remove"]["verified"] = False
    broken["audit"]["rows"]["pmixed_certified_replace_one"]["epsilon_pair"] = 99.0
    broken["budget"]["dpsgd"]["spent_fraction"] = 1.5
    broken["audit"]["controls"][0]["passed"] = False
    broken["audit"]["controls_passed"] = False
    assert ("F7", None) not in {(r["id"], r["mechanism"]) for r in base["rules"]}
    v = compute_verdict(broken)
    ids = {(r["id"], r["mechanism"]) for r in v["rules"]}
    assert v["level"] == "fail"
    assert {
        ("F2", "pmixed_certified_add_remove"),
        ("F1", "pmixed_certified_replace_one"),
        ("F3", "dpsgd"),
        ("F7", None),
    } <= ids


def _copy(tiny_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    return out


def _rules(doc) -> set:
    return {(r["id"], r["mechanism"]) for r in doc["verdict"]["rules"]}


def test_the_report_covers_the_served_ledger_and_tells_evaluation_from_service(tiny_run, tmp_path):
    from campaign.cli import main

    out = _copy(tiny_run, tmp_path)
    assert main(["generate", "--run", str(out), "--prompt", "To be", "--max-new-tokens", "4"]) == 0
    doc = write_report(out)
    served = doc["ledgers"]["served_generate"]
    assert served["file"] == "generate.jsonl" and served["verified"] and served["role"] == "served"
    assert served["recompute_command"].startswith(
        f"pmixed verify-ledger generate.jsonl --expect-head {served['head']}"
    )
    assert doc["budget"]["served_generate"]["queries_served"] == 4
    assert "generate.jsonl" in doc["identity"]["inputs"]
    assert doc["statements"]["served_generate"].startswith("This service releases")
    evaluation = doc["statements"]["pmixed_certified_add_remove"]
    assert evaluation.startswith("This evaluation deployment") and "This service" not in evaluation
    row = doc["audit"]["rows"]["served_generate"]
    assert row["audited_as"] == "pmixed_certified_add_remove"
    model = doc["identity"]["public_model"]
    assert "layers" in model and "shakespeare" in model and "plays" in model
    assert "served_generate" in (out / "report.md").read_text()


def test_a_corrupt_ledger_gives_a_fail_report_instead_of_none(tiny_run, tmp_path, capsys):
    from campaign.cli import main

    out = _copy(tiny_run, tmp_path)
    lines = (out / "ledger.jsonl").read_bytes().splitlines(keepends=True)
    lines[5] = lines[5].replace(b'"seq":5', b'"seq":6')  # an edited record
    (out / "ledger.jsonl").write_bytes(b"".join(lines))
    for name in ("report.json", "report.md", "report.html"):
        (out / name).unlink()
    assert main(["report", "--run", str(out)]) == 1  # written, and the verdict is FAIL
    doc = json.loads((out / "report.json").read_text())
    assert doc["verdict"]["level"] == "fail"
    assert ("F2", "pmixed_certified_add_remove") in _rules(doc)
    ledger = doc["ledgers"]["pmixed_certified_add_remove"]
    assert not ledger["verified"] and "line 6" in ledger["failure"]
    assert doc["accounting"]["pmixed_certified_add_remove"]["epsilon"] == "inf"
    assert doc["statements"]["pmixed_certified_add_remove"].startswith("NO CLAIM")
    assert (out / "report.html").exists() and "F2" in capsys.readouterr().out


def test_an_overrun_ledger_gives_an_f3_fail(tiny_run, tmp_path):
    from tests.accounting.test_signing import forge_append

    out = _copy(tiny_run, tmp_path)
    forge_append(out / "ledger.jsonl")  # a correctly re-hashed query past the spent budget
    doc = write_report(out)
    rules = _rules(doc)
    assert ("F3", "pmixed_certified_add_remove") in rules
    assert doc["ledgers"]["pmixed_certified_add_remove"]["verified"]  # the chain is intact
    # ... but it no longer matches the epsilon logged at evaluation time: F2 says so too
    assert ("F2", "pmixed_certified_add_remove") in rules
    assert doc["budget"]["pmixed_certified_add_remove"]["overrun"]
    assert doc["statements"]["pmixed_certified_add_remove"].startswith("BUDGET OVERRUN")
    assert doc["verdict"]["level"] == "fail"


def test_audit_power_is_reported_and_a_failed_control_makes_the_audit_inconclusive(
    tiny_run, tmp_path
):
    """The tiny run's models learn nothing, so its positive control C3-lm fails: every mechanism's
    audit is INCONCLUSIVE (W10), never "no evidence against the claim"; power.json (mutants and
    the test bed) appears in the Audit power section and figure."""
    import logging

    from accounting.files import write_json
    from audit.manyrun import ManyRunPlan, corrected_dpsgd_audit
    from audit.mutants import run_mutants

    logging.getLogger("absl").setLevel(logging.ERROR)
    out = _copy(tiny_run, tmp_path)
    mutants = run_mutants(
        "test", repetitions=3, names=["pmixed_unmollified", "generator_skips_tenth_charge"]
    )
    rows = corrected_dpsgd_audit(
        ManyRunPlan(claims=(4.0,), runs=300, pilot_runs=300, one_run_canaries=0)
    )
    write_json(out / "power.json", {"seed": 0, "mutants": mutants, "testbed": {"rows": rows}})
    doc = write_report(out)
    power = doc["audit"]["power"]
    assert power["attached"] and (power["mutants_detected"], power["mutants_total"]) == (2, 2)
    assert power["testbed"]["rows"][0]["runs_per_world"] == 300
    assert not power["positive_controls_passed"]  # C3-lm fails on the tiny models
    rules = _rules(doc)
    assert all(row["inconclusive"] for row in doc["audit"]["rows"].values())
    for name in doc["mechanisms"]:  # every mechanism offered with an audit row
        assert ("W10", name) in rules
        assert "no evidence against the claim" not in doc["statements"][name]
    assert "INCONCLUSIVE" in doc["statements"]["pmixed_certified_add_remove"]
    md = (out / "report.md").read_text()
    assert "### Audit power" in md and "generator_skips_tenth_charge" in md
    assert "poisoned member: exact / charged" in md
    tight = doc["audit"]["rows"]["pmixed_certified_add_remove"]["tightness"]
    assert 0 < tight["poisoned_member_exact_over_charged"] <= 1
    assert tight["poisoned_member_epsilon_pair_over_claim"] >= 0
    assert "figure `power`" in md.lower() or "Figure `power`" in md
    broken = copy.deepcopy(doc)
    broken["audit"]["controls_passed"] = True
    for row in broken["audit"]["rows"].values():
        row["inconclusive"] = False
    broken["audit"]["power"]["mutants_detected"] = 0  # a power run that caught nothing
    assert ("W10", "dpsgd") in {(r["id"], r["mechanism"]) for r in compute_verdict(broken)["rules"]}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None,
    reason="no Chromium here: `make test` installs Debian's "
    "chromium; this machine could not (no apt or no root)",
)
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    out, doc = report
    flags = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={tempfile.mkdtemp()}",
        "--window-size=1280,2400",
    ]
    shot = tmp_path / "shot.png"
    url = (out / "report.html").resolve().as_uri()
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run(
        [*flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0 and "Page load failed" not in proc.stderr, proc.stderr[-1000:]
    img = np.asarray(Image.open(shot).convert("RGB"), np.float64)
    assert img.shape[:2] == (2400, 1280) and img.std() > 10  # not blank
    banner = {"pass": (27, 127, 59), "warning": (178, 106, 0), "fail": (179, 38, 30)}
    colour = np.array(banner[doc["verdict"]["level"]])
    top = img[:400]
    assert (np.abs(top - colour).sum(axis=-1) < 30).sum() > 5000  # the verdict banner is drawn
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, env=env
    ).stdout
    assert all(f'id="{s}"' in dom for s in SECTIONS)
    assert f"Verdict: <strong>{doc['verdict']['level'].upper()}</strong>" in dom
    assert "Claims and evidence" in dom and fmt(doc["accounting"]["dpsgd"]["epsilon"]) in dom

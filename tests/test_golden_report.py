"""No unnoticed behaviour change: the tiny run's report.json equals the committed golden copy.

Every value is compared except those that identify one execution rather than the behaviour: the
report's creation time, identifiers and self-hash, the code's git commit, and the ledger files'
bytes (a ledger header holds its creation time and a random run id, so its hashes and the
recompute commands that quote them change on every run). Numbers, verdicts, texts and the layout
of the report must match byte for byte once those are masked.

A deliberate change regenerates the golden copy: ``UPDATE_GOLDEN=1 pytest tests/test_golden_report.py``
(then review ``git diff tests/golden``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "tiny_report.json"
#: Keys whose values identify one execution (anywhere in the report).
EXECUTION_KEYS = {
    "created",
    "code_git_sha",
    "report_id",
    "report_sha256",
    "head",
    "file_sha256",
    "recompute_command",
}
MASK = "<execution-specific>"


def masked(obj: object, path: tuple[str, ...] = ()) -> object:
    """``obj`` with the execution-specific values replaced by a fixed marker."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            ledger_input = path == ("identity", "inputs") and re.search(r"\.jsonl$", k)
            annex_hash = path == ("annex",) and k == "sha256"
            hide = k in EXECUTION_KEYS or ledger_input or annex_hash
            out[k] = MASK if hide else masked(v, (*path, k))
        return out
    if isinstance(obj, list):
        return [masked(v, path) for v in obj]
    return obj


def differences(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in differences(u, v, f"{path}/{i}")]
    return [] if a == b else [f"{path}: golden {a!r:.80} != now {b!r:.80}"]


def test_the_tiny_reports_json_is_the_golden_one(tiny_run):
    run, _ = tiny_run
    now = masked(json.loads((run / "report.json").read_text()))
    text = json.dumps(now, indent=1, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    golden = json.loads(GOLDEN.read_text())
    diff = differences(golden, now)
    assert not diff, f"{len(diff)} values differ from {GOLDEN.name}:\n" + "\n".join(diff[:20])
    assert GOLDEN.read_text() == text  # the golden file is this canonical dump, nothing else

"""No unnoticed behaviour change: the tiny run's report.json matches the committed golden copy.

Every value is compared except those that identify one execution rather than the behaviour: the
report's creation time, identifiers and self-hash, the code's git commit, and file digests (a
ledger header holds its creation time and a random run id, so its hashes and the recompute
commands that quote them change on every run; the other files' digests and the figures' follow
from values compared here one by one). Keys, list lengths, verdicts and texts must match exactly;
numbers to a relative 1e-3.

Why not bit for bit: the tiny run trains models, and float32 kernels round differently on
different CPUs. On an AMD EPYC with AVX-512, against the machine the golden copy was made on, 362
numbers differed: perplexities by up to 1.3e-6 (relative), the accounting's PLD values by up to
1.5e-7, the poisoned-member audit by 1.5e-4; three runs on the EPYC agreed with each other bit
for bit.
The fine-tuned model's membership scores hardly differ from the public model's on the tiny run,
so rounding reorders near-tied scores: its ROC points, AUC and TPR at low FPR moved by up to 0.021
(absolute), and these rank statistics are compared to 0.05 absolute instead.

A deliberate change regenerates the golden copy: ``UPDATE_GOLDEN=1 pytest tests/test_golden_report.py``
(then review ``git diff tests/golden``).
"""

from __future__ import annotations

import json
import math
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
#: A file digest (of a ledger, an input file or a figure).
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
#: Membership-inference rank statistics of an audit row: ROC points, AUC, TPR at a fixed FPR.
RANK_STATISTIC = re.compile(r"^/audit/rows/[^/]+/(roc|auc|tpr_at_fpr_[0-9.]+)/")
RELATIVE, RANK_ABSOLUTE = 1e-3, 0.05


def masked(obj: object, path: tuple[str, ...] = ()) -> object:
    """``obj`` with the execution-specific values replaced by a fixed marker."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            ledger_input = path == ("identity", "inputs") and re.search(r"\.jsonl$", k)
            annex_hash = path == ("annex",) and k == "sha256"
            digest = isinstance(v, str) and DIGEST.fullmatch(v) is not None
            hide = k in EXECUTION_KEYS or ledger_input or annex_hash or digest
            out[k] = MASK if hide else masked(v, (*path, k))
        return out
    if isinstance(obj, list):
        return [masked(v, path) for v in obj]
    return obj


def _close(a: object, b: object, path: str) -> bool:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if not numbers or (isinstance(a, int) and isinstance(b, int)):
        return a == b
    if RANK_STATISTIC.match(path):
        return abs(a - b) <= RANK_ABSOLUTE
    return math.isclose(a, b, rel_tol=RELATIVE, abs_tol=1e-12)


def differences(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in differences(u, v, f"{path}/{i}")]
    return [] if _close(a, b, path) else [f"{path}: golden {a!r:.80} != now {b!r:.80}"]


def test_the_comparison_tolerates_rounding_only():
    row = {"auc": {"value": 0.5}}
    golden = {"eps": 2.0, "steps": 3, "verdict": "pass", "audit": {"rows": {"m": row}}}
    assert differences(golden, golden | {"eps": 2.0 * (1 + 1e-4)}) == []
    assert differences(golden, golden | {"eps": 2.01}) != []  # 5e-3: a behaviour change
    assert differences(golden, golden | {"steps": 4, "verdict": "fail"}) != []
    moved = {"rows": {"m": {"auc": {"value": 0.53}}}}  # a rank statistic: 0.05 absolute
    assert differences(golden, golden | {"audit": moved}) == []
    moved = {"rows": {"m": {"auc": {"value": 0.6}}}}
    assert differences(golden, golden | {"audit": moved}) != []
    assert differences(golden, golden | {"new": 1}) != []
    assert masked({"figures": {"roc": {"sha256": "sha256:" + "a" * 64}}}) == {
        "figures": {"roc": {"sha256": MASK}}
    }


def test_the_tiny_reports_json_is_the_golden_one(tiny_run):
    run, _ = tiny_run
    now = masked(json.loads((run / "report.json").read_text()))
    text = json.dumps(now, indent=1, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    golden = json.loads(GOLDEN.read_text())
    diff = differences(golden, now)
    assert not diff, f"{len(diff)} values differ from {GOLDEN.name}:\n" + "\n".join(diff[:20])
    # the golden file is a canonical dump of masked values, nothing else
    assert GOLDEN.read_text() == json.dumps(masked(golden), indent=1, sort_keys=True) + "\n"

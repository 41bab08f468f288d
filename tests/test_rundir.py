"""RunDir: the run directory's layout, its stages (hash + file digests) and whole-file writes."""

from __future__ import annotations

import os
import stat

import pytest

from accounting.files import atomic_write, write_bytes, write_json
from reports.rundir import CONFIG, METRICS, RunDir


def test_a_stage_is_current_only_with_the_same_key_and_unchanged_files(tmp_path):
    run = RunDir(tmp_path / "run")
    tmp = run.temp_folder()
    (tmp / "weights.bin").write_bytes(b"abc")
    run.commit_stage(tmp, "public", "key-1", {"torch": "x"})
    assert not tmp.exists() and (run / "public" / "weights.bin").read_bytes() == b"abc"
    assert run.stage_is_current("public", "key-1")
    assert not run.stage_is_current("public", "key-2")
    (run / "public" / "weights.bin").write_bytes(b"abd")  # an edited file is not reused
    assert not run.stage_is_current("public", "key-1")
    assert not run.stage_is_current("ensemble", "key-1")


def test_missing_files_name_the_command_that_makes_them(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{CONFIG} is missing: run `pmixed demo --out"):
        run.read_json(CONFIG)
    run.write_json(CONFIG, {"a": 1})
    with pytest.raises(FileNotFoundError, match=METRICS):
        run.require(CONFIG, METRICS)
    assert run.read_json(CONFIG) == {"a": 1} and not run.is_trained


def test_inputs_and_ledgers_leave_out_restricted_files_and_the_report(tmp_path):
    run = RunDir(tmp_path)
    for name in ("config.json", "audit.json", "audit.restricted.json", "report.json"):
        run.write_json(name, {})
    for name in ("ledger.jsonl", "ledger.restricted.jsonl", "generate.jsonl"):
        (tmp_path / name).write_text("")
    assert [p.name for p in run.inputs()] == ["audit.json", "config.json"]
    assert run.ledgers() == ["generate.jsonl", "ledger.jsonl"]


def test_writes_are_whole_private_when_asked_and_leave_nothing_on_failure(tmp_path):
    path = write_json(tmp_path / "a" / "x.json", {"k": [1, 2]})
    assert path.read_text() == '{\n  "k": [\n    1,\n    2\n  ]\n}'
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    secret = write_bytes(tmp_path / "s.json", b"{}", private=True)
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600

    def fail(f):
        f.write(b"half of it")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):  # the old file stays, no temporary is left
        atomic_write(path, fail)
    assert path.read_text().startswith('{\n  "k"')
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json"]

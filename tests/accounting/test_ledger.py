"""The ledger: header, public/restricted split, tamper evidence, torn tails, concurrent writers."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from dp_accounting import dp_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounting import Ledger, LedgerCorrupt, PMixEDQueryEvent, RdpCurveEvent, read_ledger, verify
from accounting._records import seal
from pmixed import PMixEDConfig
from pmixed.ledgering import create_ledger, query_event
from tests.accounting.conftest import curve, new_ledger
from tests.small import SMALL

ROOT = Path(__file__).resolve().parents[2]

# The only keys a public ledger may contain, written out here on purpose: a new public key must be
# added to this test as well as to the code.
PUBLIC_ALLOW_LIST = {
    # record structure
    "kind",
    "seq",
    "prev",
    "hash",
    "event",
    "event_seq",
    "status",
    "type",
    # header
    "schema",
    "run_id",
    "created",
    "mode",
    "relation",
    "orders",
    "calibration",
    "budget",
    "versions",
    "seeded",
    # calibration summary and budget (data-independent)
    "n_members",
    "sampling_rate",
    "epsilon",
    "delta",
    "query_budget",
    "lambda_max",
    "amplification",
    "accept_unproven_amplification",
    "constraint_grid",
    "reference_alpha",
    "reference_sampler",
    "beta",
    "beta_by_size",
    "per_query_rdp",
    "planned_epsilon",
    "planned_order",
    "monitored_orders",
    "sampler",
    "sampler_tv_per_query",
    # a signed ledger: the header's public key and each record's signature
    "signing",
    "algorithm",
    "public_key",
    "sig",
    # event fields
    "rdp",
    "certified",
    "label",
}
FORBIDDEN = {
    "subset",
    "subset_size",
    "lambdas",
    "lambda",
    "tau",
    "beta_t",
    "seed",
    "data",
    "probabilities",
    "logprobs",
    "epsilon_dd",
    "divergence",
}


def _keys(obj, out):
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(k)
            _keys(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _keys(v, out)
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        PMixEDConfig(**SMALL),
        PMixEDConfig(**SMALL, mode="capped", lambda_max=0.3),
        PMixEDConfig(**SMALL, mode="reference"),
        PMixEDConfig(**SMALL, relation="replace_one"),
    ],
    ids=["certified", "capped", "reference", "replace_one"],
)
def test_public_file_holds_only_allow_listed_keys_and_no_restricted_value(tmp_path, cfg):
    cal = cfg.calibrate()
    path = tmp_path / "ledger.jsonl"
    secret = 0.123456789012345
    with create_ledger(path, cal, seed=987654321) as led:
        for i in range(20):
            r = led.append(query_event(cal))
            led.append_restricted(
                r,
                {
                    "subset": [i % 4],
                    "subset_size": 1,
                    "lambdas": [secret],
                    "tau": secret,
                    "epsilon_dd": secret,
                },
            )
    raw = path.read_bytes()
    keys = set()
    for line in raw.splitlines():
        _keys(json.loads(line), keys)
    assert keys <= PUBLIC_ALLOW_LIST, keys - PUBLIC_ALLOW_LIST
    assert not keys & FORBIDDEN
    assert repr(secret).encode() not in raw and b"987654321" not in raw
    header = json.loads(raw.splitlines()[0])
    assert header["seeded"] is True and header["status"] == cal.status
    if cfg.mode == "reference":
        assert all(json.loads(line)["status"] == "UNCERTIFIED" for line in raw.splitlines())
    rpath = path.with_name("ledger.restricted.jsonl")
    assert stat.S_IMODE(rpath.stat().st_mode) == 0o600
    assert b"987654321" in rpath.read_bytes() and repr(secret).encode() in rpath.read_bytes()
    assert verify(path, restricted=True).ok


def test_header_records_what_a_reviewer_needs(tmp_path):
    path = tmp_path / "l.jsonl"
    new_ledger(path).close()
    h = json.loads(path.read_bytes().splitlines()[0])
    for key in (
        "run_id",
        "schema",
        "created",
        "mode",
        "orders",
        "calibration",
        "versions",
        "seeded",
    ):
        assert key in h
    assert h["seeded"] is False and h["orders"] == [2, 3, 4, 6, 8]
    assert any(v.startswith("dp-accounting==") for v in h["versions"])


def test_create_refuses_to_overwrite_and_bad_headers_write_nothing(tmp_path):
    path = tmp_path / "l.jsonl"
    new_ledger(path).close()
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        new_ledger(path)
    assert path.read_bytes() == before
    for calibration in ({"lambdas": {"m0": 0.5}}, {"Lambda of m0": 0.5}):  # nested; not a name
        with pytest.raises(ValueError, match="calibration"):
            Ledger.create(
                tmp_path / "b.jsonl",
                mode="custom",
                relation="add_remove",
                status="certified",
                orders=(2, 3),
                calibration=calibration,
                seeded=False,
            )
    with pytest.raises(ValueError, match="seed"):
        new_ledger(tmp_path / "c.jsonl", seed=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.jsonl", "l.restricted.jsonl"]


def test_appends_that_fail_validation_write_nothing(tmp_path):
    path = tmp_path / "l.jsonl"
    with new_ledger(path) as led:
        led.append(curve())
        before = path.read_bytes()
        with pytest.raises(TypeError):
            led.append(dp_event.GaussianDpEvent(1.0))
        with pytest.raises(ValueError, match="relation"):
            led.append(RdpCurveEvent(orders=(2,), rdp=(0.1,), relation="replace_one"))
        cal = PMixEDConfig(**SMALL).calibrate()  # orders 2..12, not the header's
        with pytest.raises(ValueError, match="orders"):
            led.append(query_event(cal))

        def fail_midway():
            with led.transaction() as tx:
                tx.append(curve())
                raise RuntimeError("caller failed mid-transaction")

        with pytest.raises(RuntimeError):
            fail_midway()
        with pytest.raises(ValueError, match="NaN"):
            led.append_restricted(led.append(curve()), {"x": float("nan")})
        assert verify(path, restricted=True).ok
    assert read_ledger(path).n_queries == 2
    assert len(path.read_bytes()) > len(before)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "ledger.jsonl"
    with new_ledger(path) as led:
        for i in range(24):
            led.append(curve(str(i % 3), 1e-3 * (1 + i % 3)))
    return path.read_bytes()


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_flip_is_reported_at_its_line(tmp_path, pristine, data):
    pos = data.draw(st.integers(0, len(pristine) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != pristine[pos]))
    flipped = bytearray(pristine)
    flipped[pos] = new
    path = tmp_path / "f.jsonl"
    path.write_bytes(bytes(flipped))
    result = verify(path)
    assert not result.ok
    assert result.line == pristine[:pos].count(b"\n") + 1, result


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_deleting_any_line_is_reported_at_its_position(tmp_path, pristine, data):
    lines = pristine.split(b"\n")[:-1]
    i = data.draw(st.integers(0, len(lines) - 1))
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(line + b"\n" for j, line in enumerate(lines) if j != i))
    head = json.loads(lines[-1])["hash"]
    result = verify(path, expect_head=head)
    assert not result.ok and result.line == i + 1, result
    if i < len(lines) - 1:  # the chain alone catches every deletion but the last
        assert verify(path).line == i + 1


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncating_the_last_line_is_reported_at_that_line(tmp_path, pristine, data):
    last = len(pristine.split(b"\n")[-2]) + 1
    cut = data.draw(st.integers(1, last - 1))
    path = tmp_path / "t.jsonl"
    path.write_bytes(pristine[:-cut])
    result = verify(path)
    assert not result.ok and result.line == pristine.count(b"\n")
    assert "truncated" in result.reason


def test_expect_head_reports_records_after_it(tmp_path, pristine):
    path = tmp_path / "l.jsonl"
    path.write_bytes(pristine)
    lines = pristine.split(b"\n")[:-1]
    assert verify(path, expect_head=json.loads(lines[-1])["hash"]).ok
    r = verify(path, expect_head=json.loads(lines[9])["hash"])
    assert not r.ok and "line 10" in r.reason and f"{len(lines) - 10} records follow" in r.reason


def test_reading_never_imports_code_named_in_a_ledger(tmp_path, pristine):
    lines = pristine.split(b"\n")[:-1]
    prev = json.loads(lines[-1])["hash"]
    for i, event in enumerate([{"type": "this"}, {"module_name": "this", "class_name": "Zen"}]):
        evil, _ = seal({"kind": "event", "seq": len(lines), "event": event, "prev": prev})
        path = tmp_path / f"evil{i}.jsonl"
        path.write_bytes(pristine + evil + b"\n")
        result = verify(path)
        assert not result.ok and result.line == len(lines) + 1 and "event" in result.reason
    assert "this" not in sys.modules


def test_a_rehashed_edit_breaks_the_chain_at_the_next_line(tmp_path, pristine):
    lines = pristine.split(b"\n")[:-1]
    j = len(lines) - 2
    rec = json.loads(lines[j])
    assert rec["kind"] == "query"
    rec.pop("hash")
    rec["event_seq"] = 1  # charge the cheapest event instead, and recompute this line's own hash
    lines[j], _ = seal(rec)
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    assert verify(path).line == j + 2  # caught by the next record's prev (hence --expect-head)


def test_torn_tail_fails_verify_and_the_next_writer_removes_it(tmp_path, caplog):
    path = tmp_path / "l.jsonl"
    with new_ledger(path) as led:
        led.append(curve())
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(good.split(b"\n")[-2][:40])  # a dead writer's partial line
    assert verify(path).line == 4
    with caplog.at_level(logging.WARNING), Ledger(path) as led:
        assert path.read_bytes() == good
        led.append(curve())
    assert "torn last line" in caplog.text
    assert verify(path).ok and read_ledger(path).n_queries == 2


def test_a_writer_refuses_a_tampered_ledger(tmp_path, pristine):
    data = bytearray(pristine)
    data[300] ^= 0x20
    path = tmp_path / "l.jsonl"
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerCorrupt) as err:
        Ledger(path)
    assert err.value.line == pristine[:300].count(b"\n") + 1


def test_restricted_side_is_verified_and_linked(tmp_path, mixed_ledger):
    assert verify(mixed_ledger, restricted=True).ok
    rpath = mixed_ledger.with_name("ledger.restricted.jsonl")
    lines = _lines(rpath)
    rec = json.loads(lines[2])
    rec.pop("hash")
    rec["seq"] += 1
    lines[2], _ = seal(rec)
    rpath.write_bytes(b"".join(line + b"\n" for line in lines))
    r = verify(mixed_ledger, restricted=True)
    assert not r.ok and r.line == 3 and r.path.endswith("restricted.jsonl")
    assert verify(mixed_ledger).ok  # the public side stands on its own
    os.chmod(rpath, 0o644)
    assert "mode" in verify(mixed_ledger, restricted=True).reason


WRITER = """
import sys, time
from pathlib import Path
from accounting import Ledger, RdpCurveEvent
path, label, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ev = RdpCurveEvent(orders=(2, 3, 4, 6, 8), rdp=(1e-3,) * 5, label=label)
with Ledger(path) as led:
    while not (path.parent / "go").exists():
        time.sleep(0.001)
    for i in range(n):
        r = led.append(ev)
        led.append_restricted(r, {"writer": label, "i": i})
"""


def test_two_processes_appending_concurrently_keep_an_intact_chain(tmp_path):
    path = tmp_path / "ledger.jsonl"
    new_ledger(path, fsync=True).close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(path), name, "300"], env=env)
        for name in ("A", "B")
    ]
    (tmp_path / "go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert verify(path, restricted=True).ok
    contents = read_ledger(path)
    assert contents.n_queries == 600
    assert sorted(ev.label for ev in contents.tally) == ["A", "B"]
    assert set(contents.tally.values()) == {300}
    seqs = [json.loads(line)["seq"] for line in _lines(path)]
    assert seqs == list(range(len(seqs)))
    queries = [json.loads(line) for line in _lines(path) if b'"query"' in line]
    interleaved = sum(a["event_seq"] != b["event_seq"] for a, b in zip(queries, queries[1:]))
    restricted = [json.loads(line) for line in _lines(path.with_name("ledger.restricted.jsonl"))]
    assert sorted((r["data"]["writer"], r["data"]["i"]) for r in restricted[1:]) == sorted(
        (w, i) for w in "AB" for i in range(300)
    )
    assert interleaved >= 1  # the writers really did run at the same time


def test_query_event_type_is_allowed_in_a_matching_ledger(tmp_path):
    cal = PMixEDConfig(**SMALL).calibrate()
    with create_ledger(tmp_path / "l.jsonl", cal) as led:
        r = led.append(query_event(cal))
    assert r.seq == 2 and isinstance(read_ledger(tmp_path / "l.jsonl").events[1], PMixEDQueryEvent)


def test_a_torn_restricted_tail_is_reported_then_removed_by_the_next_write(tmp_path, caplog):
    path = tmp_path / "l.jsonl"
    with new_ledger(path) as led:
        r = led.append(curve())
        led.append_restricted(r, {"subset": [1]})
    rpath = path.with_name("l.restricted.jsonl")
    good = rpath.read_bytes()
    with open(rpath, "ab") as f:
        f.write(b'{"data":{"subset":[2')
    v = verify(path, restricted=True)
    assert not v.ok and v.line == 3 and "truncated" in v.reason
    with caplog.at_level(logging.WARNING), Ledger(path) as led:
        led.append_restricted(led.append(curve()), {"subset": [3]})
    assert "torn last line" in caplog.text
    assert rpath.read_bytes().startswith(good) and verify(path, restricted=True).ok
    rpath.write_bytes(b"no newline at all")
    with Ledger(path) as led, pytest.raises(LedgerCorrupt, match="no complete line"):
        led.append_restricted(led.append(curve()), {"subset": [4]})
    assert rpath.read_bytes() == b"no newline at all"  # never truncated to nothing

"""Overruns are failures everywhere, and a signed ledger catches a forged, correctly re-hashed append."""

from __future__ import annotations

import json
import math

import pytest

from accounting import Ledger, LedgerCorrupt, RenyiFilter, compose, read_ledger, verify
from accounting._records import seal, unseal
from accounting.signing import (
    fingerprint,
    generate_keypair,
    load_private_key,
    load_public_key,
    public_hex,
)
from pmixed import PMixEDConfig
from pmixed.deployment import Deployment
from pmixed.ledgering import query_event

CFG = PMixEDConfig(
    n_members=4,
    sampling_rate=0.1,
    epsilon=2.0,
    delta=1e-5,
    query_budget=20,
    orders=tuple(range(2, 13)),
)


def forge_append(path) -> None:
    """What an attacker with write access but no key can do: copy the last query record, bump its
    seq, point it at the current head and re-seal it (a valid SHA-256 chain)."""
    lines = path.read_bytes().splitlines()
    rec, head = unseal(lines[-1])
    rec = {k: v for k, v in rec.items() if k != "sig"}
    rec.update(seq=rec["seq"] + 1, prev=head)
    line, _ = seal(rec)
    with open(path, "ab") as f:
        f.write(line + b"\n")


def _spend_all(path, key=None) -> Deployment:
    dep = Deployment.create(path, CFG.calibrate(), seed=0, signing_key=key)
    while dep.can_pay():
        dep.serve(lambda rng: (0, {}), lambda rng: 0)
    return dep


@pytest.fixture
def keys(tmp_path):
    pub = generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    return load_private_key(tmp_path / "k.key"), pub


def test_a_filter_written_ledger_is_within_budget_to_the_last_bit(tmp_path):
    dep = _spend_all(tmp_path / "l.jsonl")
    spent = compose(dep.ledger, CFG.delta)
    assert spent.overrun == () and spent.steps == CFG.query_budget
    assert spent.epsilon <= CFG.epsilon * (1 + 1e-12)
    assert verify(dep.ledger.path).ok


def test_a_rehashed_append_past_the_budget_is_an_overrun(tmp_path):
    path = tmp_path / "l.jsonl"
    _spend_all(path).close()
    forge_append(path)
    contents = read_ledger(path)  # the chain itself verifies: SHA-256 alone cannot object
    assert contents.n_queries == CFG.query_budget + 1
    spent = compose(path, CFG.delta)
    assert spent.overrun and "monitored order" in spent.overrun[0]
    assert any("composed epsilon" in line for line in spent.overrun)
    check = verify(path)
    assert not check.ok and check.reason.startswith("OVERRUN") and check.overrun


def test_signed_ledger_rejects_a_forged_append_and_names_its_key(tmp_path, keys):
    key, pub = keys
    path = tmp_path / "l.jsonl"
    dep = _spend_all(path, key)
    assert dep.signed
    dep.close()
    ok = verify(path, public_key=pub)
    assert ok.ok and ok.signed_by == fingerprint(pub) and "signed (ed25519" in str(ok)
    records = len(path.read_bytes().splitlines())
    forge_append(path)
    check = verify(path)
    assert not check.ok and check.line == records + 1 and "bad signature" in check.reason
    with pytest.raises(LedgerCorrupt, match="bad signature"):
        read_ledger(path)


def test_an_unsigned_ledger_stays_valid_and_says_so(tmp_path, keys):
    path = tmp_path / "l.jsonl"
    _spend_all(path).close()
    check = verify(path)
    assert check.ok and check.signed_by is None and "unsigned" in str(check)
    bad = verify(path, public_key=keys[1])  # but it cannot pass for a signed one
    assert not bad.ok and "unsigned" in bad.reason


def test_another_key_or_no_key_cannot_append(tmp_path, keys):
    key, pub = keys
    path = tmp_path / "l.jsonl"
    Deployment.create(path, CFG.calibrate(), signing_key=key).close()
    other = generate_keypair(tmp_path / "o.key", tmp_path / "o.pub")
    assert not verify(path, public_key=other).ok  # the whole file re-signed by another key: caught
    with pytest.raises(ValueError, match="another key"):
        Ledger(path, signing_key=load_private_key(tmp_path / "o.key"))
    reader = Ledger(path)  # readable without the key, but every append is refused
    with pytest.raises(PermissionError, match="signing key"):
        reader.append(query_event(CFG.calibrate()))
    assert read_ledger(path).n_queries == 0
    assert load_public_key(tmp_path / "k.pub") == pub == public_hex(key)


def test_keygen_refuses_to_overwrite_and_keeps_the_private_key_private(tmp_path, keys):
    assert (tmp_path / "k.key").stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "k.key", tmp_path / "x.pub")


def test_sampler_delta_is_recorded_and_negligible(tmp_path):
    dep = _spend_all(tmp_path / "l.jsonl")
    header = json.loads(dep.ledger.path.read_bytes().splitlines()[0])
    tv = header["calibration"]["sampler_tv_per_query"]
    assert tv == 2.0**-1042 and "exact inverse CDF" in header["calibration"]["sampler"]
    spent = compose(dep.ledger, CFG.delta)
    expected = CFG.query_budget * (1 + math.exp(spent.epsilon)) * tv
    assert spent.delta_sampler == pytest.approx(expected, rel=1e-9)
    assert 0 < spent.delta_sampler < 1e-300


def test_the_filter_admits_exactly_what_the_ledger_will_hold(tmp_path):
    """The filter merges the new charge into its event's count (n+1)·c instead of n·c + c, so a
    ledger it wrote never fails the recheck by one rounding."""
    dep = _spend_all(tmp_path / "l.jsonl")
    filt: RenyiFilter = dep.filter
    assert (filt.spent() <= filt.limits).all()
    assert not filt.can_pay(dep.event)

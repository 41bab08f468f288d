"""Ledger records: canonical encoding, sealing with SHA-256, and the schema checks of one line.

A sealed line is the canonical JSON of the record (sorted keys, no spaces, ASCII, no NaN) with one
field appended before the closing brace::

    {"event_seq":1,"kind":"query","prev":"sha256:…","seq":2,"status":"certified","hash":"sha256:…"}

``hash`` is the SHA-256 of the line's bytes without that field (``{…}``), and ``prev`` is the previous
record's ``hash`` (the genesis value for the header). Any changed byte in a line changes its own hash
or breaks its suffix, so a single edit is reported at the line that was edited; a deleted or reordered
line breaks ``prev`` and ``seq`` at the line that follows it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping

import numpy as np

from accounting.checks import is_real
from accounting.events import PMixEDQueryEvent, RdpCurveEvent, event_from_json
from accounting.signing import signature_ok

SCHEMA = "pmixed-ledger/1"
GENESIS = "sha256:" + "0" * 64
_SUFFIX = re.compile(rb',"hash":"(sha256:[0-9a-f]{64})"\}\Z')
_SUFFIX_LEN = len(b',"hash":"sha256:"}') + 64
HEADER_STATUSES = ("certified", "conditional", "UNCERTIFIED")
#: A mode or calibration key: the mechanism names them (accounting knows none of PMixED's fields).
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
BUDGET_KEYS = frozenset({"epsilon", "delta", "monitored_orders"})
#: A signed ledger's header names its Ed25519 public key (``accounting.signing``).
SIGNING_KEYS = frozenset({"algorithm", "public_key"})
HEADER_KEYS = frozenset(
    {
        "kind",
        "seq",
        "schema",
        "run_id",
        "created",
        "mode",
        "relation",
        "status",
        "orders",
        "calibration",
        "budget",
        "versions",
        "seeded",
        "prev",
    }
)
EVENT_KEYS = frozenset({"kind", "seq", "event", "status", "prev"})
QUERY_KEYS = frozenset({"kind", "seq", "event_seq", "status", "prev"})


class Fault(Exception):
    """A line that does not verify: ``reason`` says why (the caller adds the line number)."""


def jsonable(x: object) -> object:
    """Plain JSON values for ``x``: numpy to Python, ±inf to ``"inf"``/``"-inf"``; NaN is refused."""
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise ValueError(f"record keys must be strings. Found {k!r}.")
            out[k] = jsonable(v)
        return out
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            raise ValueError("records must not contain NaN.")
        return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")
    if x is None or isinstance(x, str):
        return x
    raise TypeError(f"records hold JSON values only. Found {type(x).__name__}.")


def canonical(record: Mapping) -> bytes:
    """The canonical bytes of a record: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def seal(record: Mapping, signer=None) -> tuple[bytes, str]:
    """(line without newline, its hash): canonical JSON plus the ``hash`` field.

    With an Ed25519 ``signer`` (a signed ledger), ``sig`` = the signature over the canonical bytes
    of ``record`` is added first, so the hash covers it too."""
    if signer is not None:
        record = {**record, "sig": signer.sign(canonical(record)).hex()}
    body = canonical(record)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}', digest


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def unseal(line: bytes) -> tuple[dict, str]:
    """(record without ``hash``, hash) of one line, or :class:`Fault` if it was altered."""
    m = _SUFFIX.search(line)
    if m is None or len(line) < _SUFFIX_LEN + 2:
        raise Fault("malformed record: no well-formed trailing hash field (edited or truncated)")
    digest = m.group(1).decode("ascii")
    body = line[:-_SUFFIX_LEN] + b"}"
    if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
        raise Fault("hash mismatch: the record's bytes were edited after it was written")
    try:
        record = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise Fault(f"not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise Fault("schema violation: a record must be a JSON object")
    return record, digest


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise Fault(f"schema violation: {why}")


def check_keys(record: Mapping, allowed: frozenset | set, what: str) -> None:
    keys = set(record)
    _need(keys == allowed, f"{what} keys {sorted(keys ^ allowed)} are unexpected or missing")


def check_header(rec: Mapping) -> None:
    """Schema of the header record (line 1)."""
    signing = rec.get("signing")
    check_keys(rec, HEADER_KEYS | ({"signing"} if "signing" in rec else set()), "header")
    if "signing" in rec:
        _need(
            isinstance(signing, dict)
            and set(signing) == SIGNING_KEYS
            and signing["algorithm"] == "ed25519"
            and isinstance(signing["public_key"], str)
            and re.fullmatch("[0-9a-f]{64}", signing["public_key"]) is not None,
            "signing must be {algorithm: ed25519, public_key: 64 hex digits}",
        )
    _need(rec["kind"] == "header" and rec["seq"] == 0, "line 1 must be the header with seq 0")
    _need(rec["schema"] == SCHEMA, f"schema must be {SCHEMA!r}, found {rec['schema']!r}")
    _need(isinstance(rec["run_id"], str) and 0 < len(rec["run_id"]) <= 100, "run_id")
    _need(isinstance(rec["created"], str), "created must be a timestamp string")
    _need(
        isinstance(rec["mode"], str) and NAME.fullmatch(rec["mode"]) is not None,
        f"mode must be a lower-case name ({NAME.pattern})",
    )
    _need(rec["relation"] in ("add_remove", "replace_one"), "relation")
    _need(rec["status"] in HEADER_STATUSES, f"status must be one of {HEADER_STATUSES}")
    orders = rec["orders"]
    _need(
        isinstance(orders, list)
        and orders
        and all(is_real(k) and k > 1 for k in orders)
        and all(b > a for a, b in zip(orders, orders[1:])),
        "orders must be a non-empty increasing list of numbers > 1",
    )
    cal = rec["calibration"]
    _need(
        isinstance(cal, dict) and all(NAME.fullmatch(k) for k in cal),
        f"calibration keys must be lower-case names ({NAME.pattern})",
    )
    for k, v in cal.items():
        flat = v if isinstance(v, list) else [v]
        _need(
            all(x is None or isinstance(x, (str, int, float)) for x in flat),
            f"calibration[{k!r}] must be a scalar or a list of scalars",
        )
    b = rec["budget"]
    if b is not None:
        _need(isinstance(b, dict) and set(b) == BUDGET_KEYS, "budget keys")
        _need(is_real(b["epsilon"]) and b["epsilon"] > 0, "budget epsilon must be > 0")
        _need(is_real(b["delta"]) and 0 < b["delta"] < 1, "budget delta must be in (0, 1)")
        mon = b["monitored_orders"]
        _need(
            isinstance(mon, list) and mon and all(k in orders for k in mon),
            "budget monitored_orders must be a non-empty subset of the orders",
        )
    _need(
        isinstance(rec["versions"], list)
        and all(isinstance(v, str) and "==" in v for v in rec["versions"]),
        "versions must be a list of 'name==version' strings",
    )
    _need(isinstance(rec["seeded"], bool), "seeded must be true or false")
    _need(rec["prev"] == GENESIS, "the header's prev must be the genesis hash")


def check_event(rec: Mapping, header: Mapping):
    """Schema of an event-definition record; returns the decoded event."""
    check_keys(rec, EVENT_KEYS, "event record")
    try:
        event = event_from_json(rec["event"])
    except (ValueError, TypeError) as err:
        raise Fault(f"schema violation: invalid event: {err}") from None
    _need(rec["status"] == getattr(event, "status", "certified"), "status differs from the event's")
    if isinstance(event, PMixEDQueryEvent):
        _need(list(event.orders) == header["orders"], "event orders differ from the header's")
    if isinstance(event, (PMixEDQueryEvent, RdpCurveEvent)):
        _need(event.relation == header["relation"], "event relation differs from the header's")
    return event


def check_signature(rec: dict, header: Mapping | None) -> dict:
    """``rec`` without ``sig``, after checking it: every record of a signed ledger (the header
    included, under its own key) carries a valid signature; an unsigned ledger has none."""
    signing = (rec if header is None else header).get("signing")
    if not isinstance(signing, dict) or not isinstance(signing.get("public_key"), str):
        if "sig" in rec:
            raise Fault("schema violation: a signature on a record of an unsigned ledger")
        return rec
    body = {k: v for k, v in rec.items() if k != "sig"}
    if not signature_ok(signing["public_key"], canonical(body), rec.get("sig")):
        raise Fault(
            "bad signature: the record was not written by the holder of the ledger's "
            "signing key (a forged or altered append)"
        )
    return body

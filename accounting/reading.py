"""Reading and verifying a ledger (the format is described in :mod:`accounting.ledger`).

:func:`read_ledger` parses and checks every line (hash chain, schema, signatures) into a
:class:`LedgerContents`; :func:`verify` reports the first fault as a :class:`Verification`, with
the budget invariant (an overrun fails) and, on request, the restricted sibling's chain and links.
Reading never imports code named in a ledger: event types come from a fixed registry.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from dp_accounting import dp_event

from accounting._records import (
    GENESIS,
    QUERY_KEYS,
    Fault,
    check_event,
    check_header,
    check_keys,
    check_signature,
    unseal,
)
from accounting.invariants import overruns

__all__ = [
    "LedgerContents",
    "LedgerCorrupt",
    "Verification",
    "read_ledger",
    "restricted_path",
    "split_lines",
    "status_of",
    "verify",
    "verify_restricted",
]


class LedgerCorrupt(Exception):
    """The ledger does not verify: ``line`` (1-based) is the first bad line, ``reason`` says why."""

    def __init__(self, line: int, reason: str, path: str | os.PathLike = "") -> None:
        super().__init__(f"{path}:{line}: {reason}" if path else f"line {line}: {reason}")
        self.line, self.reason, self.path = line, reason, str(path)


@dataclass(frozen=True)
class Verification:
    """Result of :func:`verify`. ``line`` and ``reason`` describe the first fault (None when ok)."""

    ok: bool
    path: str
    line: int | None
    reason: str
    records: int
    queries: int
    head: str | None
    signed_by: str | None = None
    overrun: tuple[str, ...] = ()

    @property
    def signature(self) -> str:
        return "unsigned" if self.signed_by is None else f"signed (ed25519 key {self.signed_by})"

    def __str__(self) -> str:
        if self.ok:
            return (
                f"{self.path}: OK, {self.records} records, {self.queries} queries, head "
                f"{self.head}, {self.signature}"
            )
        return f"{self.path}:{self.line}: {self.reason}"


def restricted_path(path: str | os.PathLike) -> Path:
    """``ledger.jsonl`` -> ``ledger.restricted.jsonl`` (the 0600 sibling)."""
    p = Path(path)
    return p.with_name(f"{p.stem}.restricted{p.suffix}" if p.suffix else f"{p.name}.restricted")


# ------------------------------------------------------------------------------------ reading


@dataclass
class LedgerContents:
    """What a verified ledger says: header, events and how often each was charged."""

    header: dict | None = None
    next_seq: int = 0
    head: str = GENESIS
    events: dict[int, dp_event.DpEvent] = field(default_factory=dict)
    event_seq: dict[dp_event.DpEvent, int] = field(default_factory=dict)
    tally: dict[dp_event.DpEvent, int] = field(default_factory=dict)
    n_queries: int = 0
    n_public_steps: int = 0

    @property
    def orders(self) -> list:
        return list(self.header["orders"])

    def counted_events(self) -> list[tuple[dp_event.DpEvent, int]]:
        """(event, number of queries charged with it), in order of first use."""
        return list(self.tally.items())

    def feed(self, line: bytes) -> str:
        """Checks one line against the chain so far and absorbs it; returns its hash."""
        rec, digest = unseal(line)
        rec = check_signature(rec, self.header)
        if rec.get("prev") != self.head:
            raise Fault(
                "broken chain: prev is not the hash of the previous line "
                "(a record was deleted, inserted or reordered)"
            )
        if rec.get("seq") != self.next_seq:
            raise Fault(f"schema violation: seq {rec.get('seq')!r}, expected {self.next_seq}")
        kind = rec.get("kind")
        if self.header is None:
            check_header(rec)
            self.header = rec
        elif kind == "event":
            event = check_event(rec, self.header)
            self.events[rec["seq"]] = event
            self.event_seq.setdefault(event, rec["seq"])
        elif kind == "query":
            check_keys(rec, QUERY_KEYS, "query record")
            event = self.events.get(rec["event_seq"])
            if event is None:
                raise Fault(
                    f"schema violation: event_seq {rec['event_seq']!r} is not an event record"
                )
            if rec["status"] != status_of(event):
                raise Fault(f"schema violation: status {rec['status']!r} differs from its event's")
            self.tally[event] = self.tally.get(event, 0) + 1
            self.n_queries += 1
            self.n_public_steps += isinstance(event, dp_event.NoOpDpEvent)
        else:
            raise Fault(f"schema violation: unknown record kind {kind!r}")
        self.head = digest
        self.next_seq += 1
        return digest


def status_of(event: dp_event.DpEvent) -> str:
    return getattr(event, "status", "certified")


def split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines (without newline) and the torn remainder after the last newline."""
    *lines, rest = data.split(b"\n")
    return lines, rest


def _scan(path: Path, digests: list[str] | None = None) -> LedgerContents:
    data = path.read_bytes()
    if not data:
        raise LedgerCorrupt(1, "empty file: no header record", path)
    lines, rest = split_lines(data)
    contents = LedgerContents()
    for i, line in enumerate(lines, start=1):
        try:
            digest = contents.feed(line)
        except Fault as fault:
            raise LedgerCorrupt(i, str(fault), path) from None
        if digests is not None:
            digests.append(digest)
    if rest:
        raise LedgerCorrupt(len(lines) + 1, "truncated last line (no newline at the end)", path)
    return contents


def read_ledger(path: str | os.PathLike) -> LedgerContents:
    """Reads and verifies a ledger; raises :class:`LedgerCorrupt` at the first bad line."""
    return _scan(Path(path))


def verify(
    path: str | os.PathLike,
    *,
    expect_head: str | None = None,
    restricted: bool = False,
    public_key: str | None = None,
) -> Verification:
    """Checks every line of a ledger; reports the first fault with its 1-based line number.

    Beyond the chain and the schema: every signature of a signed ledger, and the budget invariant
    (:func:`accounting.overruns`: spent within the header's budget at every monitored order and
    in composed ε). An overrun fails verification, with a reason that starts with ``OVERRUN``.

    Args:
        path: the public ledger file.
        expect_head: ``sha256:<hex>`` published elsewhere (a report, a receipt): the chain must end
            there. This is what detects a deleted last line, which a chain alone cannot.
        restricted: also check the restricted sibling's chain, mode 0600 and links to public records.
        public_key: the hex Ed25519 public key the ledger must be signed with (an unsigned ledger,
            or one signed by another key, then fails).
    """
    from accounting.signing import fingerprint

    path = Path(path)
    digests: list[str] = []
    try:
        c = _scan(path, digests)
    except LedgerCorrupt as err:
        return Verification(False, str(path), err.line, err.reason, err.line - 1, 0, None)
    except OSError as err:
        return Verification(False, str(path), 1, f"cannot read: {err.strerror}", 0, 0, None)
    n = len(digests)
    signing = c.header.get("signing")
    signed_by = fingerprint(signing["public_key"]) if signing else None
    if public_key is not None and (signing is None or signing["public_key"] != public_key):
        found = "unsigned" if signing is None else f"signed by key {signed_by}"
        reason = f"the ledger is {found}, not by the expected key {fingerprint(public_key)}"
        return Verification(False, str(path), 1, reason, n, c.n_queries, c.head, signed_by)
    if expect_head is not None and c.head != expect_head:
        if expect_head in digests:
            at = digests.index(expect_head) + 1
            where = f"the expected head is line {at}; {n - at} records follow it"
        else:
            where = (
                "the expected head is not in the chain (records at the end were deleted, "
                "or this is another ledger)"
            )
        reason = f"head {c.head} != expected {expect_head}: {where}"
        return Verification(False, str(path), n + 1, reason, n, c.n_queries, c.head, signed_by)
    if restricted:
        fault = verify_restricted(restricted_path(path), digests)
        if fault is not None:
            line, reason = fault
            return Verification(
                False, str(restricted_path(path)), line, reason, n, c.n_queries, c.head, signed_by
            )
    over = tuple(overruns(c))
    if over:
        reason = "OVERRUN: " + "; ".join(over)
        return Verification(False, str(path), n, reason, n, c.n_queries, c.head, signed_by, over)
    return Verification(True, str(path), None, "", n, c.n_queries, c.head, signed_by)


def verify_restricted(rpath: Path, public: list[str]) -> tuple[int, str] | None:
    try:
        mode = stat.S_IMODE(rpath.stat().st_mode)
        data = rpath.read_bytes()
    except OSError as err:
        return 1, f"cannot read the restricted file: {err.strerror}"
    if mode & 0o077:
        return 1, f"restricted file mode is {mode:o}; it must be 600"
    lines, rest = split_lines(data)
    head = GENESIS
    for i, line in enumerate(lines, start=1):
        try:
            rec, digest = unseal(line)
        except Fault as fault:
            return i, str(fault)
        if rec.get("prev") != head:
            return i, "broken chain in the restricted file"
        seq = rec.get("seq")
        if rec.get("kind") != ("header" if i == 1 else "data"):
            return i, "schema violation: line 1 is the header, every other line a data record"
        if (
            not isinstance(seq, int)
            or not 0 <= seq < len(public)
            or rec.get("public") != public[seq]
        ):
            return i, f"restricted record does not link to public record seq {seq!r}"
        head = digest
    if rest:
        return len(lines) + 1, "truncated last line (no newline at the end)"
    return None


# ------------------------------------------------------------------------------------ writing

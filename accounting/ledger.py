"""The append-only, hash-chained privacy ledger: one public JSON-lines file and a restricted sibling.

Public file (``ledger.jsonl``), one sealed record per line (see ``_records.py`` for the encoding):

* line 1, the **header**: schema, run id, creation time, mode, relation, status, orders, the public
  calibration summary, the budget fixed before deployment, library versions, whether the randomness
  was seeded (the seed itself is restricted);
* **event** records: the first time an event is charged, its full description (``events.py``);
* **query** records: one per charged query, naming the event it paid for by the event record's ``seq``.

Restricted file (``ledger.restricted.jsonl``, created with mode 0600): its own hash chain of records
``{"seq": s, "public": <hash of public record s>, "data": {...}}`` holding what must never be public
(subsets, their sizes, λ, data-dependent values, the seed). The restricted side points at the public
side, never the other way round: a public hash of a low-entropy subset could be inverted by brute force.

Writing: every append holds an exclusive ``flock`` on the public file, first reads what other processes
appended (verifying it), writes whole lines with one ``write`` and ``fsync``s before returning.
:meth:`Ledger.transaction` groups several appends under one lock, one write and one fsync (group
commit): the caller releases nothing until the block exits. A writer killed mid-append can leave at most
one torn last line; it was never acknowledged, so the next writer removes it under the lock (a WARNING
says so) and :func:`accounting.reading.verify` reports it meanwhile.

Reading and verification: :mod:`accounting.reading`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import stat
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dp_accounting import dp_event

from accounting._files import TailCorrupt, publish, tail_hash, write_all
from accounting._records import (
    GENESIS,
    SCHEMA,
    Fault,
    check_event,
    check_header,
    jsonable,
    seal,
)
from accounting.events import event_to_json
from accounting.reading import (
    LedgerContents,
    LedgerCorrupt,
    restricted_path,
    split_lines,
    status_of,
)

__all__ = ["Ledger", "Receipt"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Receipt:
    """The durable query record: its sequence number (line number − 1) and hash."""

    seq: int
    hash: str


def _versions(extra: Sequence[str]) -> list[str]:
    out = [f"python=={platform.python_version()}"]
    for dist in ("pmixed-audit", "dp-accounting", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{dist}=={version(dist)}")
    return out + [v for v in extra if v not in out]


class Ledger:
    """An open ledger for appending (several processes may hold one on the same file).

    Args:
        path: an existing ledger (see :meth:`create`).
        fsync: fsync after every write (default). ``False`` survives a process crash but not a
            power cut; use it for benchmarks and simulations only.

    Raises:
        LedgerCorrupt: the file does not verify (a torn last line from a killed writer is removed).
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True, signing_key=None) -> None:
        self.path = Path(path)
        self.restricted_path = restricted_path(self.path)
        self.fsync = bool(fsync)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        self._rfd: int | None = None
        self._offset = 0
        self._state = LedgerContents()
        self._tlock = threading.RLock()
        try:
            with self._locked():
                pass
            self._signer = _signer_for(self._state.header, signing_key, self.path)
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        mode: str,
        relation: str,
        status: str,
        orders: Sequence[float],
        calibration: Mapping,
        seeded: bool,
        budget: Mapping | None = None,
        seed: int | None = None,
        run_id: str | None = None,
        versions: Sequence[str] = (),
        fsync: bool = True,
        signing_key=None,
    ) -> Ledger:
        """Creates the public ledger and its 0600 restricted sibling; refuses to overwrite either.

        ``calibration`` is the mechanism's public summary (lower-case keys it chooses, scalar or
        list values; the mechanism vouches that each is data-independent); ``budget``
        is ``{"epsilon", "delta", "monitored_orders"}`` when a Rényi filter guards the ledger;
        ``seed`` goes to the restricted header only, ``seeded`` to the public one. With an Ed25519
        ``signing_key`` (``accounting.signing.load_private_key``) the header names its public key
        and every record is signed (:mod:`accounting.signing`).
        """
        path = Path(path)
        rpath = restricted_path(path)
        if not isinstance(seeded, bool):
            raise ValueError(f"seeded must be True or False. Found {seeded!r}.")
        if seed is not None and (not seeded or isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer and needs seeded=True. Found {seed!r}.")
        for p in (path, rpath):
            if p.exists():
                raise FileExistsError(f"ledger file already exists: {p}")
        header = jsonable(
            {
                "kind": "header",
                "seq": 0,
                "schema": SCHEMA,
                "run_id": run_id or uuid.uuid4().hex,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "mode": mode,
                "relation": relation,
                "status": status,
                "orders": list(orders),
                "calibration": dict(calibration),
                "budget": None if budget is None else dict(budget),
                "versions": _versions(versions),
                "seeded": seeded,
                "prev": GENESIS,
            }
        )
        if signing_key is not None:
            from accounting.signing import ALGORITHM, public_hex

            header["signing"] = {"algorithm": ALGORITHM, "public_key": public_hex(signing_key)}
        try:
            check_header(header)
        except Fault as fault:
            raise ValueError(f"header: {fault}") from None
        line, digest = seal(header, signing_key)
        rline, _ = seal(
            {"kind": "header", "seq": 0, "public": digest, "seed": seed, "prev": GENESIS}
        )
        publish(rpath, rline, 0o600)
        publish(path, line, 0o644)
        return cls(path, fsync=fsync, signing_key=signing_key)

    # -------------------------------------------------------------------------------- state

    @property
    def header(self) -> dict:
        return self._state.header

    @property
    def head(self) -> str:
        return self._state.head

    def contents(self) -> LedgerContents:
        """A snapshot after reading what other processes appended."""
        with self._locked():
            s = self._state
            return LedgerContents(
                s.header,
                s.next_seq,
                s.head,
                dict(s.events),
                dict(s.event_seq),
                dict(s.tally),
                s.n_queries,
                s.n_public_steps,
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._tlock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._sync()
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _sync(self) -> None:
        """Reads and verifies what was appended since the last look (the lock is held)."""
        size = os.fstat(self._fd).st_size
        if size < self._offset:
            raise LedgerCorrupt(self._state.next_seq, "the file shrank while open", self.path)
        if size == self._offset:
            return
        lines, rest = split_lines(os.pread(self._fd, size - self._offset, self._offset))
        for line in lines:
            try:
                self._state.feed(line)
            except Fault as fault:
                raise LedgerCorrupt(self._state.next_seq + 1, str(fault), self.path) from None
            self._offset += len(line) + 1
        if rest:
            # Only a dead writer leaves a partial line: live ones write under this lock.
            log.warning(
                "%s: removing a torn last line (%d bytes) left by an interrupted append; "
                "it was never acknowledged",
                self.path,
                len(rest),
            )
            os.ftruncate(self._fd, self._offset)
            os.fsync(self._fd)
        if self._state.header is None:
            raise LedgerCorrupt(1, "empty file: no header record", self.path)

    # -------------------------------------------------------------------------------- appends

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Transaction]:
        """Group commit: appends inside the block are written with one write and one fsync at exit.

        Nothing is written if the block raises. Release nothing that depends on these records until
        the block has exited.
        """
        with self._locked():
            tx = _Transaction(self._state, self._signer)
            yield tx
            if tx.lines:
                data = b"\n".join(tx.lines) + b"\n"
                write_all(self._fd, data)
                if self.fsync:
                    os.fsync(self._fd)
                for line in tx.lines:
                    self._state.feed(line)
                self._offset += len(data)

    def append(self, event: dp_event.DpEvent, *, admit=None) -> Receipt:
        """Charges one query to ``event``; durable when this returns.

        Args:
            event: a PMixED query, an RDP curve, or a public step (``accounting.events``).
            admit: ``admit(tally, event)`` is called under the lock with the up-to-date
                ``{event: count}``; it raises (e.g. ``BudgetExhausted``) to refuse, and then nothing
                is written.
        """
        with self.transaction() as tx:
            return tx.append(event, admit=admit)

    def append_restricted(self, receipt: Receipt, data: Mapping) -> None:
        """Writes restricted ``data`` for the query of ``receipt`` to the 0600 sibling file."""
        record = jsonable(dict(data))
        with self._tlock:
            if self._rfd is None:
                fd = os.open(self.restricted_path, os.O_RDWR | os.O_APPEND)
                if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                    os.close(fd)
                    raise PermissionError(f"{self.restricted_path} must have mode 600.")
                self._rfd = fd
            fcntl.flock(self._rfd, fcntl.LOCK_EX)
            try:
                try:
                    prev = tail_hash(self._rfd, self.restricted_path)
                except TailCorrupt as err:
                    raise LedgerCorrupt(1, str(err), self.restricted_path) from None
                line, _ = seal(
                    {
                        "kind": "data",
                        "seq": receipt.seq,
                        "public": receipt.hash,
                        "data": record,
                        "prev": prev,
                    }
                )
                write_all(self._rfd, line + b"\n")
                if self.fsync:
                    os.fsync(self._rfd)
            finally:
                fcntl.flock(self._rfd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._fd, self._rfd):
            if fd is not None:
                os.close(fd)
        self._fd = self._rfd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signer_for(header: dict, key, path: Path):
    """The key appends are signed with: None (unsigned ledger), the key, or False (a signed
    ledger opened without its key: readable, and every append refused)."""
    signing = header.get("signing")
    if signing is None:
        if key is not None:
            raise ValueError(f"{path} is an unsigned ledger; it cannot take a signing key.")
        return None
    if key is None:
        return False
    from accounting.signing import public_hex

    if public_hex(key) != signing["public_key"]:
        raise ValueError(f"{path} is signed by another key than the one given.")
    return key


class _Transaction:
    """Records staged under the ledger lock; see :meth:`Ledger.transaction`."""

    def __init__(self, state: LedgerContents, signer=None) -> None:
        self._state = state
        self._signer = signer
        self._seq = state.next_seq
        self._head = state.head
        self._new: dict[dp_event.DpEvent, int] = {}
        self.tally = dict(state.tally)
        self.lines: list[bytes] = []

    def _add(self, record: dict) -> str:
        if self._signer is False:
            raise PermissionError("this ledger is signed: open it with its signing key to append.")
        line, digest = seal(record, self._signer or None)
        self.lines.append(line)
        self._seq, self._head = self._seq + 1, digest
        return digest

    def append(self, event: dp_event.DpEvent, *, admit=None) -> Receipt:
        body = event_to_json(event)  # TypeError for an event type the ledger does not know
        if admit is not None:
            admit(self.tally, event)
        es = self._state.event_seq.get(event, self._new.get(event))
        if es is None:
            record = {
                "kind": "event",
                "seq": self._seq,
                "event": body,
                "status": status_of(event),
                "prev": self._head,
            }
            try:
                check_event(record, self._state.header)
            except Fault as fault:
                raise ValueError(str(fault)) from None
            es = self._new[event] = self._seq
            self._add(record)
        seq = self._seq
        digest = self._add(
            {
                "kind": "query",
                "seq": seq,
                "event_seq": es,
                "status": status_of(event),
                "prev": self._head,
            }
        )
        self.tally[event] = self.tally.get(event, 0) + 1
        return Receipt(seq, digest)

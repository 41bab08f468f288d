"""Low-level file operations of the ledger: whole writes, atomic creation, the last line's hash."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from accounting._records import _SUFFIX

log = logging.getLogger("accounting.ledger")


class TailCorrupt(Exception):
    """The restricted file's tail cannot be read (the caller adds the path)."""


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def publish(path: Path, line: bytes, mode: int) -> None:
    """Writes ``line`` to a new file at ``path`` atomically: temp file, fsync, hard link."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if mode == 0o600:
            os.fchmod(fd, 0o600)
        write_all(fd, line + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def tail_hash(fd: int, path: Path) -> str:
    """Hash of the last complete line of an append-only file (a torn tail is removed)."""
    size = os.fstat(fd).st_size
    chunk = 4096
    while True:
        if size == 0:
            raise TailCorrupt(f"{path}: no header")
        start = max(0, size - chunk)
        data = os.pread(fd, size - start, start)
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n")
            if cut < 0 and start > 0:
                chunk *= 2
                continue
            if cut < 0:
                raise TailCorrupt(f"{path}: no complete line")
            log.warning("%s: removing a torn last line left by an interrupted append", path)
            size = start + cut + 1
            os.ftruncate(fd, size)
            continue
        cut = data.rfind(b"\n", 0, len(data) - 1)
        if cut < 0 and start > 0:
            chunk *= 2
            continue
        m = _SUFFIX.search(data[cut + 1 : -1])
        if m is None:
            raise TailCorrupt(f"{path}: the last line has no hash")
        return m.group(1).decode("ascii")

"""The one atomic-write helper of the project: a file appears whole or not at all.

Every artefact (reports, run configs, metrics, CSV exports, adapter weights, benchmark results) is
written to a unique temporary name in the target's folder, flushed, given its final mode, and
renamed over the target. A crash leaves the old file (or none) and at most a hidden temporary that
the next write does not reuse. Restricted files are created 0600 before the first byte is written.
The ledger itself is append-only and does not use this (:mod:`accounting._files`).

It lives in the lowest layer so that every package above may use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "write_bytes", "write_json"]

PUBLIC, PRIVATE = 0o644, 0o600


def atomic_write(
    path: str | os.PathLike, fill: Callable[[IO[bytes]], None], *, private: bool = False
) -> Path:
    """Writes the file at ``path`` by calling ``fill`` on a binary file object, atomically;
    ``private`` makes it mode 0600 (else 0644). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, PRIVATE if private else PUBLIC)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes, *, private: bool = False) -> Path:
    """``data`` to ``path``, atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), private=private)


def write_json(path: str | os.PathLike, obj: object, *, private: bool = False) -> Path:
    """``obj`` as indented JSON (two spaces), atomically (see :func:`atomic_write`)."""
    return write_bytes(path, json.dumps(obj, indent=2).encode(), private=private)

"""A ledger as a pandas DataFrame: one verified row per record, public columns unless asked.

pandas is imported when a frame is built, never when ``accounting`` is imported. Columns of
:func:`ledger_frame` (public: what the public ledger file already says):

=================  =========================================================================
``seq``            the record's sequence number (its line number − 1)
``kind``           ``header`` / ``event`` / ``query``
``status``         the claim's status (certified / conditional / UNCERTIFIED); header: its own
``event_seq``      query: the event record it paid for; event: its own seq; header: <NA>
``event_type``     the event's class (``PMixEDQueryEvent``, ``RdpCurveEvent``, ``NoOpDpEvent``)
``query``          1-based index among the queries (<NA> on header and event rows)
``public_step``    query answered by the public model alone (charged 0)
``rdp@<k>``        query: the RDP it was charged at monitored order k (the header's budget)
``spent@<k>``      the RDP spent at order k after this record (a running float sum; the
                   filter's ``math.fsum`` agrees to rounding)
``hash``, ``prev`` the record's chain hash and its predecessor's
=================  =========================================================================

``restricted=True`` adds ``restricted.<key>`` for each key of the restricted sibling's data
(subsets, λ, ... of that query; lists stay lists; the header row gets ``restricted.seed``) after
verifying that file's own chain, its 0600 mode and its links to the public records. Without the
flag that file is never opened.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from dp_accounting import dp_event

from accounting._records import Fault
from accounting.events import curve_at
from accounting.files import write_bytes
from accounting.reading import (
    LedgerContents,
    LedgerCorrupt,
    restricted_path,
    split_lines,
    verify_restricted,
)

__all__ = ["PUBLIC_COLUMNS", "export_csv", "ledger_frame"]

#: Public columns, in order (``rdp@k`` and ``spent@k`` follow ``public_step``, one per order k).
PUBLIC_COLUMNS = (
    "seq",
    "kind",
    "status",
    "event_seq",
    "event_type",
    "query",
    "public_step",
    "hash",
    "prev",
)
RESTRICTED_PREFIX = "restricted."


def ledger_frame(path: str | os.PathLike, *, restricted: bool = False):
    """The verified ledger at ``path`` as a ``pandas.DataFrame`` (columns: module docstring).

    Raises :class:`LedgerCorrupt` at the first line that fails verification (an overrun is not
    corruption: the ``spent@k`` columns show it).
    """
    import pandas as pd

    path = Path(path)
    lines, rest = split_lines(path.read_bytes())
    if not lines or rest:
        raise LedgerCorrupt(len(lines) + 1, "truncated last line (no newline at the end)", path)
    contents, rows, digests, spent = LedgerContents(), [], [], None
    for i, line in enumerate(lines, start=1):
        try:
            digest = contents.feed(line)  # unseals and checks the line
        except Fault as fault:
            raise LedgerCorrupt(i, str(fault), path) from None
        rec = json.loads(line)  # verified above: only its fields are read here
        digests.append(digest)
        if spent is None:  # the header: the monitored orders fix the rdp@k columns
            budget = contents.header.get("budget") or {}
            orders = [float(k) for k in budget.get("monitored_orders", [])]
            spent = [0.0] * len(orders)
        row = {
            "seq": rec["seq"],
            "kind": rec["kind"],
            "status": rec.get("status"),
            "event_seq": pd.NA,
            "event_type": None,
            "query": pd.NA,
            "public_step": pd.NA,
            "hash": digest,
            "prev": rec["prev"],
        }
        costs = [math.nan] * len(orders)
        if rec["kind"] == "event":
            event = contents.events[rec["seq"]]
            row.update(event_seq=rec["seq"], event_type=type(event).__name__)
        elif rec["kind"] == "query":
            event = contents.events[rec["event_seq"]]
            costs = [float(c) for c in curve_at(event, orders)] if orders else []
            spent = [s + c for s, c in zip(spent, costs)]
            row.update(
                event_seq=rec["event_seq"],
                event_type=type(event).__name__,
                query=contents.n_queries,
                public_step=isinstance(event, dp_event.NoOpDpEvent),
            )
        for k, c, s in zip(orders, costs, spent):
            row[f"rdp@{k:g}"], row[f"spent@{k:g}"] = c, s
        rows.append(row)
    frame = pd.DataFrame(rows)
    for col in ("event_seq", "query"):
        frame[col] = frame[col].astype("Int64")
    frame["public_step"] = frame["public_step"].astype("boolean")
    if restricted:
        frame = frame.merge(_restricted_columns(path, digests), on="seq", how="left")
    return frame


def _restricted_columns(path: Path, digests: list[str]):
    import pandas as pd

    rpath = restricted_path(path)
    fault = verify_restricted(rpath, digests)
    if fault is not None:
        raise LedgerCorrupt(fault[0], fault[1], rpath)
    rows = []
    for line in split_lines(rpath.read_bytes())[0]:
        rec = json.loads(line)  # verify_restricted unsealed and linked every line
        data = {"seed": rec.get("seed")} if rec["kind"] == "header" else rec.get("data") or {}
        rows.append({"seq": rec["seq"], **{RESTRICTED_PREFIX + k: v for k, v in data.items()}})
    frame = pd.DataFrame(rows)
    if RESTRICTED_PREFIX + "seed" in frame:  # OS-entropy seeds exceed int64: keep Python ints
        frame[RESTRICTED_PREFIX + "seed"] = pd.Series(
            [None if pd.isna(v) else int(v) for v in frame[RESTRICTED_PREFIX + "seed"]],
            dtype=object,
        )
    return frame


def export_csv(
    path: str | os.PathLike, csv_path: str | os.PathLike, *, restricted: bool = False
) -> int:
    """Writes :func:`ledger_frame` to ``csv_path`` (lists as JSON text); returns the row count.

    The file appears whole (written beside it, then renamed); with ``restricted`` it is created
    with mode 0600, as the restricted ledger is: it holds the same data.
    """
    frame = ledger_frame(path, restricted=restricted)
    for col in frame.columns:
        if col.startswith(RESTRICTED_PREFIX):
            frame[col] = [v if not isinstance(v, list) else json.dumps(v) for v in frame[col]]
    write_bytes(
        csv_path, frame.to_csv(index=False, lineterminator="\n").encode(), private=restricted
    )
    return len(frame)

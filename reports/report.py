"""``pmixed report``: build, check and write the report files of one run directory.

Writes ``report.json`` (canonical, validated against ``reports/schema/report-v1.json``),
``report.md``, ``report.html`` and the restricted annex ``report.restricted.md`` (mode 0600). Every
file is written to a temporary name and renamed, so a failure leaves the previous report (or none),
never half of one. Before anything is written, the public bytes are checked for every number of the
annex: a restricted value found in a public file aborts the write (rule F8).

``created`` is the current UTC time, or ``SOURCE_DATE_EPOCH`` when set (reproducible builds): with
it fixed, the same inputs give byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from pathlib import Path

from accounting.files import write_bytes
from reports.build import build_report
from reports.plots import figures
from reports.render import render_annex, render_html, render_markdown
from reports.schema import canonical_bytes, seal_report, validate
from reports.verdict import compute_verdict

__all__ = ["leaks", "restricted_numbers", "write_report"]


def _created() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = dt.datetime.fromtimestamp(int(epoch), dt.UTC) if epoch else dt.datetime.now(dt.UTC)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def restricted_numbers(annex: object) -> set[str]:
    """Text forms of every float in the annex (repr and the annex's own 6-digit form)."""
    out: set[str] = set()
    if isinstance(annex, float):
        out |= {repr(annex), f"{annex:.6g}"}
    elif isinstance(annex, dict):
        for v in annex.values():
            out |= restricted_numbers(v)
    elif isinstance(annex, (list, tuple)):
        for v in annex:
            out |= restricted_numbers(v)
    return out


def leaks(text: str, secrets: set[str]) -> list[str]:
    """The ``secrets`` found in ``text`` outside inline SVG. Figures are drawn from the public
    document only (checked through report.json); their path coordinates can coincide with a
    6-digit restricted value by chance."""
    outside = re.sub(r"<svg.*?</svg>", "", text, flags=re.S)
    return sorted(s for s in secrets if s in outside)


def write_report(run: str | Path) -> dict:
    """Builds and writes the report of ``run``; returns the public document."""
    run = Path(run)
    doc, annex = build_report(run)
    annex_md = render_annex(annex, doc["report_id"]).encode()
    figs = figures(doc)
    doc["created"] = _created()
    doc["figures"] = {n: {"caption": f["caption"], "sha256": f["sha256"]} for n, f in figs.items()}
    doc["annex"] = {
        "file": "report.restricted.md",
        "sha256": "sha256:" + hashlib.sha256(annex_md).hexdigest(),
    }
    doc["verdict"] = compute_verdict(doc)
    doc = seal_report(doc)
    validate(doc)
    files = {
        "report.json": canonical_bytes(doc),
        "report.md": render_markdown(doc, figs).encode(),
        "report.html": render_html(doc, figs).encode(),
    }
    secrets = {s for s in restricted_numbers(annex) if len(s) >= 6}
    for name, data in files.items():
        leaked = leaks(data.decode(), secrets)
        if leaked:
            raise ValueError(f"{name} would contain restricted value(s) {leaked[:3]}: not written.")
    write_bytes(run / "report.restricted.md", annex_md, private=True)
    for name, data in files.items():
        write_bytes(run / name, data)
    return doc

"""Renderers: pure functions from the report document (and its figures) to text.

``report.md`` keeps figures out (captions and SHA-256 only); ``report.html`` is one self-contained
file: inline CSS, inline SVG figures, a Content-Security-Policy that blocks any external load, no
scripts. Templates live in ``reports/templates``; Jinja2 autoescapes the HTML.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

__all__ = ["fmt", "render_annex", "render_html", "render_markdown"]

_TEMPLATES = Path(__file__).parent / "templates"


def fmt(x: object) -> str:
    """One cell: 4 significant digits for floats, "missing" for None, lists joined."""
    if x is None:
        return "missing"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v) for v in x)
    return str(x)


def _env(autoescape: bool) -> Environment:
    env = Environment(
        loader=FileSystemLoader(_TEMPLATES),
        undefined=StrictUndefined,
        autoescape=select_autoescape(["html"]) if autoescape else False,
        trim_blocks=False,
        lstrip_blocks=False,
        keep_trailing_newline=True,
    )
    env.globals["fmt"] = fmt
    return env


def render_html(doc: dict, figures: dict[str, dict]) -> str:
    figs = {
        name: Markup(
            f'<figure id="fig-{name}">{f["svg"]}<figcaption>{escape(f["caption"])}'
            f"</figcaption></figure>"
        )
        for name, f in figures.items()
    }
    return _env(True).get_template("report.html.j2").render(doc=doc, figs=figs)


def render_markdown(doc: dict, figures: dict[str, dict]) -> str:
    figs = {
        name: f"*Figure `{name}`*: {f['caption']} (SVG in report.html, {f['sha256']})"
        for name, f in figures.items()
    }
    return _env(False).get_template("report.md.j2").render(doc=doc, figs=figs)


def render_annex(annex: dict, report_id: str) -> str:
    """The restricted annex as Markdown, with its banner."""
    lines = [
        "# RESTRICTED: not covered by the privacy guarantee",
        "",
        f"Annex of report {report_id}. These values derive from private data (mixing weights,",
        "the audited member, the canary token). Keep this file at mode 0600; never publish,",
        "link or plot it.",
        "",
    ]
    for name, s in annex.get("lambda_statistics", {}).items():
        q = ", ".join(f"{v:.6g}" for v in s["lambda_min_p5_median_p95_max"])
        lines.append(
            f"- {name}: lambda min/p5/median/p95/max {q}; mean {s['lambda_mean']:.6g}; "
            f"mean subset size {s['subset_size_mean']:.4g} over {s['queries']} queries"
        )
    audit = annex.get("audit")
    if audit:
        lines += [
            "",
            f"- audited member: {audit.get('member')}",
            f"- canary game: {audit.get('game')}",
        ]
    return "\n".join(lines) + "\n"

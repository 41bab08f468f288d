"""The report's figures as inline SVG, drawn from the report document only (REPORT.md §6).

Deterministic bytes: Agg backend, fixed rcParams, ``svg.hashsalt`` set, no date metadata, text
kept as text (``svg.fonttype = none``), so one input gives one output on one machine. Each figure
comes with a caption that states δ, unit, relation and accountant, and the SHA-256 of its SVG.
"""

from __future__ import annotations

import hashlib
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["figures"]

_RC = {
    "svg.hashsalt": "pmixed-audit",
    "svg.fonttype": "none",
    "font.size": 9,
    "figure.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "path.simplify": False,
}
_NAMES = {
    "pmixed_certified_add_remove": "PMixED certified (add/remove member)",
    "pmixed_certified_replace_one": "PMixED certified (replace one user)",
    "pmixed_reference": "PMixED reference (UNCERTIFIED)",
    "dpsgd": "DP-SGD (Opacus)",
    "finetuned": "non-private fine-tune",
    "public": "public model",
}


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: inlined in HTML


def _f(x) -> float:
    return math.inf if x == "inf" else float(x)


def _burn_down(doc: dict):
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    eps_budget = None
    for name, budget in doc["budget"].items():
        rows = budget["burn_down"]
        if doc["mechanisms"][name]["kind"] == "pmixed":
            ls = "--" if not doc["mechanisms"][name]["certified"] else "-"
            a.plot(
                [r["queries"] for r in rows],
                [r["epsilon"] for r in rows],
                ls,
                label=_NAMES.get(name, name),
            )
            if budget["epsilon"] is not None:
                eps_budget = budget["epsilon"]
        else:
            b.plot([r["steps"] for r in rows], [r["epsilon"] for r in rows], label="RDP")
            pld = [r for r in rows if r.get("epsilon_pld") is not None]
            b.plot(
                [r["steps"] for r in pld], [r["epsilon_pld"] for r in pld], "s--", ms=3, label="PLD"
            )
            b.axhline(budget["epsilon"], color="k", lw=0.8, ls=":", label="target")
    if eps_budget is not None:
        a.axhline(eps_budget, color="k", lw=0.8, ls=":", label="budget")
    a.set(xlabel="tokens released", ylabel="epsilon", title="PMixED: epsilon burn-down")
    b.set(xlabel="training steps", ylabel="epsilon", title="DP-SGD: epsilon after each step")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    return fig


def _cost_trace(doc: dict):
    fig, ax = plt.subplots(figsize=(8, 2.6))
    for name, ledger in doc["ledgers"].items():
        if not ledger["verified"]:
            continue
        t = ledger["cost_trace"]
        xs = range(1, len(t["rdp"]) + 1)
        ax.plot(xs, t["rdp"], lw=1, label=f"{_NAMES.get(name, name)}, order {t['order']:g}")
        pub = [i + 1 for i, p in enumerate(t["public"]) if p]
        if pub:
            ax.plot(pub, [0.0] * len(pub), "k|", label="public fallback (zero cost)")
    ax.ticklabel_format(axis="y", useOffset=False)
    top = max(
        (max(ledger["cost_trace"]["rdp"], default=0.0) for ledger in doc["ledgers"].values()),
        default=0.0,
    )
    ax.set_ylim(0, 1.2 * top if top > 0 else 1.0)  # equal costs would sit on the frame
    ax.set(xlabel="query", ylabel="RDP charged", title="Per-query cost at the optimal order")
    ax.legend(fontsize=7)
    return fig


def _rdp(doc: dict):
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    for name, acc in doc["accounting"].items():
        if "rdp" not in acc:
            continue
        orders = acc["rdp"]["orders"]
        a.plot(orders, [_f(r) for r in acc["rdp"]["rdp"]], label=_NAMES.get(name, name))
        line = b.plot(orders, [_f(e) for e in acc["by_order"]], label=_NAMES.get(name, name))[0]
        b.plot([acc["optimal_order"]], [acc["epsilon"]], "o", color=line.get_color())
    a.set(xlabel="order alpha", ylabel="total RDP", yscale="log", title="RDP curve")
    b.set(
        xlabel="order alpha",
        ylabel="epsilon from this order",
        yscale="log",
        title="Conversion per order (dot: optimum)",
    )
    b.legend(fontsize=7)
    return fig


def _profile(doc: dict):
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, acc in doc["accounting"].items():
        ax.plot(
            [p["delta"] for p in acc["profile"]],
            [p["epsilon"] for p in acc["profile"]],
            "o-",
            ms=3,
            label=f"{_NAMES.get(name, name)}, RDP",
        )
        if acc["profile"] and "epsilon_pld" in acc["profile"][0]:
            ax.plot(
                [p["delta"] for p in acc["profile"]],
                [p["epsilon_pld"] for p in acc["profile"]],
                "s--",
                ms=3,
                label=f"{_NAMES.get(name, name)}, PLD",
            )
    ax.set(xscale="log", xlabel="delta", ylabel="epsilon", title="Privacy profile epsilon(delta)")
    ax.legend(fontsize=7)
    return fig


def _roc(doc: dict):
    fig, ax = plt.subplots(figsize=(5, 4))
    rows = doc["audit"].get("rows", {})
    lo = 1.0
    for name, row in rows.items():
        if row.get("roc"):
            r = row["roc"]
            lo = min(lo, r["fpr"][0])
            ax.plot(r["fpr"], [max(t, 1e-4) for t in r["tpr"]], label=_NAMES.get(name, name))
    if lo == 1.0:
        ax.text(0.5, 0.5, "no ROC arrays in the audit", ha="center", transform=ax.transAxes)
        lo = 1e-3
    grid = [lo * (1 / lo) ** (i / 40) for i in range(41)]
    ax.plot(grid, grid, "k:", lw=0.8, label="chance")
    eps, delta = rows.get("dpsgd", {}).get("epsilon_ub"), rows.get("dpsgd", {}).get("delta")
    if eps is not None:
        bound = [
            min(math.exp(eps) * f + delta, 1 - math.exp(-eps) * (1 - delta - f), 1.0) for f in grid
        ]
        ax.plot(grid, bound, "r--", lw=0.8, label=f"DP bound at epsilon {eps:.2f}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="Membership inference ROC (log-log)",
        ylim=(1e-4, 1.05),
    )
    ax.legend(fontsize=7)
    return fig


def _utility(doc: dict):
    fig, ax = plt.subplots(figsize=(5, 3))
    ppl, eps = doc["utility"]["perplexity"], doc["utility"]["epsilon"]
    for name in ("public", "finetuned"):
        ax.axhline(ppl[name], ls=":", color="grey")
        ax.annotate(_NAMES.get(name, name), (0.2, ppl[name]), fontsize=7, va="bottom")
    for name, value in ppl.items():
        if name in ("public", "finetuned"):
            continue
        y = value["exact"] if isinstance(value, dict) else value
        ax.plot([eps[name]], [y], "o", label=_NAMES.get(name, name))
    ax.ticklabel_format(useOffset=False)
    ax.set_xlim(0, 1.15 * max(e for e in eps.values() if e is not None))
    ax.set(xlabel="epsilon", ylabel="held-out perplexity", title="Utility vs epsilon")
    ax.legend(fontsize=7)
    return fig


def _power(doc: dict):
    fig, ax = plt.subplots(figsize=(6, 3))
    rows = [(n, r) for n, r in doc["audit"].get("rows", {}).items() if r.get("epsilon_ub")]
    tb = (doc["audit"].get("power") or {}).get("testbed") or {}
    labels, claims, lbs, pairs = [], [], [], []
    for name, r in rows:
        labels.append(_NAMES.get(name, name))
        claims.append(r["epsilon_ub"])
        lbs.append(r["epsilon_lb"] or 0.0)
        pairs.append(r["epsilon_pair"] or 0.0)
    for row in tb.get("rows", []):
        labels.append(f"LR DP-SGD eps {row['claim']['epsilon']:.0f}")
        claims.append(row["claim"]["epsilon"])
        lbs.append(row["epsilon_lb"])
        pairs.append(0.0)
    x = range(len(labels))
    ax.bar([i - 0.27 for i in x], claims, 0.27, label="claim", color="#888")
    ax.bar(list(x), pairs, 0.27, label="exact pair (PMixED)")
    ax.bar([i + 0.27 for i in x], lbs, 0.27, label="empirical lower bound")
    ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=6)
    ax.set(ylabel="epsilon", title="Claims against the audits' lower bounds")
    ax.legend(fontsize=7)
    return fig


_FIGURES = {
    "burn_down": (
        _burn_down,
        "Epsilon at the report's delta against tokens released (PMixED, "
        "each ledger's prefix composed by dp-accounting RDP) and training steps (DP-SGD, "
        "dp-accounting RDP and PLD); dotted: budget/target.",
    ),
    "cost_trace": (
        _cost_trace,
        "RDP charged by each query at its ledger's optimal order; every "
        "charge is data-independent (fixed before the query).",
    ),
    "rdp_curve": (
        _rdp,
        "Total RDP over the order grid and the epsilon each order alone gives "
        "(dp-accounting conversion); the dot marks the optimal order.",
    ),
    "privacy_profile": (
        _profile,
        "Epsilon as a function of delta for each mechanism (RDP conversion; DP-SGD also by PLD).",
    ),
    "roc": (
        _roc,
        "ROC hull of the strongest attack per model on log-log axes. PMixED "
        "replace_one: the black-box game's exact log-likelihood-ratio score over fresh "
        "deployments with and without the canary member (the other PMixED rows rest on the "
        "exact pair); DP-SGD and the fine-tune: the canary audit (Poisson-included canaries); "
        "public: training vs held-out blocks; red: the DP trade-off bound at DP-SGD's claim.",
    ),
    "power": (
        _power,
        "Audit power: each claim next to the exact-pair and empirical lower bounds "
        "that the audit reached (PMixED deployments, DP-SGD, and the logistic-regression "
        "DP-SGD test bed of `pmixed audit --power`).",
    ),
    "utility": (
        _utility,
        "Held-out perplexity (exact mixture for PMixED) against epsilon; "
        "utility is measured outside the guarantee.",
    ),
}


def figures(doc: dict) -> dict[str, dict]:
    """name -> {"svg", "caption", "sha256"} for every figure of the report."""
    delta = doc["accounting"]["dpsgd"]["delta"]
    out = {}
    with plt.rc_context(_RC):
        for name, (draw, caption) in _FIGURES.items():
            svg = _svg(draw(doc))
            out[name] = {
                "svg": svg,
                "caption": f"{caption} delta = {delta:g}.",
                "sha256": "sha256:" + hashlib.sha256(svg.encode()).hexdigest(),
            }
    return out

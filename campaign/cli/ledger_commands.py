"""Commands on the mechanism and its ledgers: ``calibrate``, ``exact-audit``, ``worst-case``,
``verify-ledger``, ``account``, ``ledger export`` and ``keygen``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import accounting
from accounting.files import write_json
from pmixed import PMixEDConfig, neighbour_divergence
from pmixed.standard_modes import R2_MEMBER, R2_PUBLIC, R2_SETTINGS

PAPER = dict(n_members=80, sampling_rate=0.03, epsilon=8.0, delta=1e-5, query_budget=1024)


def _summary(cal) -> dict:
    cfg = cal.config
    out = {
        "mode": cfg.mode,
        "status": cal.status,
        "relation": cfg.relation,
        "sampling_rate": cfg.sampling_rate,
        "query_budget": cfg.query_budget,
        "delta": cfg.delta,
        "planned_epsilon": cal.planned_epsilon,
        "optimal_order": cal.planned_order,
        "orders": list(cal.orders),
        "per_query_rdp": [c if np.isfinite(c) else None for c in cal.per_query_rdp],
    }
    if cal.beta is not None:
        out["beta"] = cal.beta
    else:
        out["beta_by_size"] = list(cal.beta_by_size)
    return out


def _print_summary(s: dict) -> None:
    label = " (UNCERTIFIED: not a DP guarantee)" if s["status"] == "UNCERTIFIED" else ""
    beta = (
        f"{s['beta']:.6g}"
        if "beta" in s
        else ("by subset size: " + ", ".join(f"{b:.4f}" for b in s["beta_by_size"][:6]) + ", ...")
    )
    print(f"mode={s['mode']} relation={s['relation']} status={s['status']}{label}")
    print(f"  beta            {beta}")
    print(f"  planned epsilon {s['planned_epsilon']:.6f} at delta={s['delta']:g}{label}")
    print(f"  optimal order   {s['optimal_order']}")
    k = s["orders"].index(s["optimal_order"])
    print(
        f"  per-query RDP at the optimal order {s['per_query_rdp'][k]:.6g} "
        f"x {s['query_budget']} queries"
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    s = _summary(_config(args).calibrate())
    print(json.dumps(s, indent=2)) if args.json else _print_summary(s)
    return 0


def _config(args: argparse.Namespace) -> PMixEDConfig:
    return PMixEDConfig(
        n_members=args.n_members,
        sampling_rate=args.sampling_rate,
        epsilon=args.epsilon,
        delta=args.delta,
        query_budget=args.query_budget,
        mode=args.mode,
        relation=args.relation,
        lambda_max=args.lambda_max,
    )


#: ``worst-case``'s search flags and their smallest allowed values.
WORST_CASE_MINIMA = {"starts": 1, "refine": 1, "iterations": 1, "vocab": 2, "seed": 0}


def cmd_worst_case(args: argparse.Namespace) -> int:
    """The configuration's worst case (audit.worstcase.configuration_worst_case) for one
    deployment: p0, the other members and member j (and its replacement, ``--pair
    replace_one``) chosen on a public toy to maximise exact/charged. Public: no data is read.
    Exits 1 when the toy exceeds the charge (an alarm), 0 otherwise."""
    from audit.worstcase import configuration_worst_case

    for name, low in WORST_CASE_MINIMA.items():
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}. Found {getattr(args, name)}.")
    if args.refine > args.starts:
        raise ValueError(f"--refine must be <= --starts ({args.starts}). Found {args.refine}.")
    cal = _config(args).calibrate()
    if args.pair == "replace_one" and cal.certified and cal.config.relation != "replace_one":
        raise ValueError(
            "--pair replace_one needs --relation replace_one (or --mode reference): an "
            "add_remove charge does not cover replacing a member."
        )
    result = configuration_worst_case(
        cal,
        rng=np.random.default_rng(args.seed),
        starts=args.starts,
        refine=args.refine,
        iterations=args.iterations,
        vocab=args.vocab,
        relation=args.pair,
    )
    result = {"deployment": _summary(cal), "seed": args.seed, **result}
    if args.json:
        print(json.dumps(result, indent=2))
        return 1 if result["alarm"] else 0
    label = " (UNCERTIFIED claim)" if not cal.certified else ""
    verdict = "EXCEEDS the charge: an alarm" if result["alarm"] else "within the charge"
    print(
        f"mode={cal.config.mode} N={cal.config.n_members} q={cal.config.sampling_rate:g} "
        f"T={cal.config.query_budget} pair={args.pair}{label}"
    )
    print(f"  searched   {result['searched']} (seed {args.seed})")
    print(f"  worst      exact/charged {result['ratio']:.4f} at order {result['order']}: {verdict}")
    print(f"  evaluated  {result['evaluations']} toys")
    return 1 if result["alarm"] else 0


def cmd_exact_audit(args: argparse.Namespace) -> int:
    """Calibrate every mode at the paper's defaults, then audit one adversarial instance exactly."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    modes = {
        "certified": PMixEDConfig(**PAPER),
        "capped": PMixEDConfig(**PAPER, mode="capped", lambda_max=0.3),
        "reference": PMixEDConfig(**PAPER, mode="reference"),
        "certified_replace_one": PMixEDConfig(**PAPER, relation="replace_one"),
    }
    result = {"calibration": {}, "exact_audit": {}}
    for name, cfg in modes.items():
        result["calibration"][name] = s = _summary(cfg.calibrate())
        print(f"[{name}]")
        _print_summary(s)
    # PMIXED_MATH.md R2: one member, three tokens, alpha = 6, q = 0.1, per-query claim 0.05.
    pm, p0 = np.array([R2_MEMBER]), np.array(R2_PUBLIC)
    pm, p0 = pm / pm.sum(), p0 / p0.sum()
    print("\nexact per-query audit (public toy instance: N=1, |V|=3, order 6, q=0.1)")
    for mode in ("certified", "reference"):
        cal = PMixEDConfig(
            **R2_SETTINGS, mode=mode, **({"reference_alpha": 6} if mode == "reference" else {})
        ).calibrate()
        nd = neighbour_divergence(pm, p0, cal, member=0, orders=[6])
        claim = float(cal.per_query_rdp[cal.orders.index(6)])
        ratio = float(nd.worst[0]) / claim
        verdict = "within claim" if ratio <= 1 else "EXCEEDS its claim"
        label = " (UNCERTIFIED)" if not cal.certified else ""
        print(
            f"  {mode:<10} exact D_6 = {nd.worst[0]:.4g}  charged = {claim:.4g}  "
            f"ratio = {ratio:.2f}  {verdict}{label}"
        )
        result["exact_audit"][mode] = {
            "exact_rdp": float(nd.worst[0]),
            "charged": claim,
            "ratio": ratio,
            "status": cal.status,
        }
    print(f"\nwrote {write_json(out / 'exact_audit.json', result)}")
    return 0


def cmd_verify_ledger(args: argparse.Namespace) -> int:
    """Exit 0 when the chain is intact (and ends at --expect-head); 1 with the first fault."""
    head = args.expect_head
    if head is not None and not (head.startswith("sha256:") and len(head) == 71):
        raise ValueError(f"--expect-head must be sha256:<64 hex digits>. Found {head!r}.")
    key = None
    if args.public_key is not None:
        from accounting.signing import load_public_key

        key = load_public_key(args.public_key)
    result = accounting.verify(
        args.ledger, expect_head=head, restricted=args.restricted, public_key=key
    )
    print(result if result.ok else f"FAIL {result} ({result.signature})")
    return 0 if result.ok else 1


def cmd_account(args: argparse.Namespace) -> int:
    """Verify, compose with dp-accounting, print (epsilon, delta, order, steps, certified)."""
    if not 0 < args.delta < 1:
        raise ValueError(f"--delta must be in (0, 1). Found {args.delta}.")
    try:
        spent = accounting.compose(args.ledger, args.delta)
    except accounting.LedgerCorrupt as err:
        print(f"pmixed account: ledger does not verify: {err}", file=sys.stderr)
        return 1
    rc = 1 if spent.overrun else 0
    if args.json:
        print(json.dumps(spent.to_json(), indent=2))
        return rc
    label = "" if spent.certified else "  (UNCERTIFIED: not a DP guarantee)"
    certified = "yes" if spent.certified else "no"
    if spent.status == "conditional":
        certified = "conditional (unproven tight amplification)"
    print(f"epsilon        {spent.epsilon:.6f}{label}")
    print(
        f"delta          {spent.delta:g} (+ {spent.delta_sampler:.3g} for the token sampler's "
        "float64 law)"
    )
    print(f"optimal order  {spent.optimal_order:g}")
    print(f"steps          {spent.steps} ({spent.public_steps} answered by the public model)")
    print(f"relation       {spent.relation}")
    print(f"certified      {certified}")
    print(f"cross-check    compute_epsilon(fsum of curves) = {spent.epsilon_cross_check:.6f}")
    if spent.budget is not None:
        b = spent.budget
        limits = accounting.PrivacyBudget(b["epsilon"], b["delta"], spent.orders)
        for k in b["monitored_orders"]:
            used = spent.rdp[spent.orders.index(float(k))]
            print(
                f"budget         epsilon {b['epsilon']:g} at delta {b['delta']:g}: RDP at order "
                f"{k:g} spent {used:.6g} of {limits.limits([k])[0]:.6g}"
            )
    for line in spent.overrun:
        print(f"OVERRUN        {line}")
    return rc


def cmd_ledger_export(args: argparse.Namespace) -> int:
    """One verified row per ledger record as CSV (restricted columns only with --restricted)."""
    from accounting.frames import export_csv

    if not args.csv.parent.is_dir():
        raise ValueError(f"--csv {args.csv}: the folder {args.csv.parent} does not exist.")
    rows = export_csv(args.ledger, args.csv, restricted=args.restricted)
    kind = "with restricted columns, mode 0600" if args.restricted else "public columns"
    print(f"wrote {args.csv}: {rows} records ({kind})")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """An Ed25519 key pair for signing a deployment's ledger."""
    from accounting.signing import fingerprint, generate_keypair

    key, pub = Path(f"{args.out}.key"), Path(f"{args.out}.pub")
    fp = fingerprint(generate_keypair(key, pub))
    print(f"wrote {key} (private, mode 0600) and {pub} (public); key {fp}")
    print(
        f"sign a deployment: pmixed generate --run DIR --signing-key {key} ...; check it: "
        f"pmixed verify-ledger DIR/generate.jsonl --public-key {pub}"
    )
    return 0

"""The ``pmixed`` command line.

``calibrate`` (β and the per-query RDP curve for a deployment), ``verify-ledger`` and ``account``
(check a ledger's hash chain; recompute the privacy it spent with dp-accounting), ``exact-audit``
(the exact neighbour audit on a public toy instance), ``train`` / ``evaluate`` / ``demo`` (the
campaign: models, perplexities through real ledgers, and, for ``demo``, the audit), ``audit`` (the
audit of a trained run) and ``generate`` (private text generation from a trained run). The
compliance report arrives with its issue."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

import accounting
from pmixed import InfeasibleBudget, PMixEDConfig, mode_names, neighbour_divergence
from pmixed.deployment import InvalidRequest
from pmixed.executor import EXECUTORS, make_executor
from reports.files import write_json

PAPER = dict(n_members=80, sampling_rate=0.03, epsilon=8.0, delta=1e-5, query_budget=1024)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-members", type=int, default=PAPER["n_members"])
    p.add_argument("--sampling-rate", type=float, default=PAPER["sampling_rate"])
    p.add_argument("--epsilon", type=float, default=PAPER["epsilon"])
    p.add_argument("--delta", type=float, default=PAPER["delta"])
    p.add_argument("--query-budget", type=int, default=PAPER["query_budget"])
    p.add_argument("--mode", default="certified", choices=mode_names())
    p.add_argument("--relation", default="add_remove", choices=["add_remove", "replace_one"])
    p.add_argument("--lambda-max", type=float, default=None, help="capped mode only")


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
    print(f"  per-query RDP at the optimal order {s['per_query_rdp'][k]:.6g} "
          f"x {s['query_budget']} queries")  # fmt: skip


def cmd_calibrate(args: argparse.Namespace) -> int:
    cfg = PMixEDConfig(
        n_members=args.n_members, sampling_rate=args.sampling_rate, epsilon=args.epsilon,
        delta=args.delta, query_budget=args.query_budget, mode=args.mode,
        relation=args.relation, lambda_max=args.lambda_max,
    )  # fmt: skip
    s = _summary(cfg.calibrate())
    print(json.dumps(s, indent=2)) if args.json else _print_summary(s)
    return 0


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
    pm = np.array([[0.9005, 0.0979, 0.0016]])
    p0 = np.array([0.1213, 0.8682, 0.0105])
    pm, p0 = pm / pm.sum(), p0 / p0.sum()
    common = dict(n_members=1, sampling_rate=0.1, epsilon=6.7617, delta=1e-5, query_budget=100,
                  orders=tuple(range(2, 9)))  # fmt: skip
    print("\nexact per-query audit (public toy instance: N=1, |V|=3, order 6, q=0.1)")
    for mode in ("certified", "reference"):
        cal = PMixEDConfig(**common, mode=mode, **({"reference_alpha": 6} if mode == "reference"
                                                    else {})).calibrate()  # fmt: skip
        nd = neighbour_divergence(pm, p0, cal, member=0, orders=[6])
        claim = float(cal.per_query_rdp[cal.orders.index(6)])
        ratio = float(nd.worst[0]) / claim
        verdict = "within claim" if ratio <= 1 else "EXCEEDS its claim"
        label = " (UNCERTIFIED)" if not cal.certified else ""
        print(f"  {mode:<10} exact D_6 = {nd.worst[0]:.4g}  charged = {claim:.4g}  "
              f"ratio = {ratio:.2f}  {verdict}{label}")  # fmt: skip
        result["exact_audit"][mode] = {"exact_rdp": float(nd.worst[0]), "charged": claim,
                                       "ratio": ratio, "status": cal.status}  # fmt: skip
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
    result = accounting.verify(args.ledger, expect_head=head, restricted=args.restricted,
                               public_key=key)  # fmt: skip
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
    print(f"delta          {spent.delta:g} (+ {spent.delta_sampler:.3g} for the token sampler's "
          "float64 law)")  # fmt: skip
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
            print(f"budget         epsilon {b['epsilon']:g} at delta {b['delta']:g}: RDP at order "
                  f"{k:g} spent {used:.6g} of {limits.limits([k])[0]:.6g}")  # fmt: skip
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
    print(f"sign a deployment: pmixed generate --run DIR --signing-key {key} ...; check it: "
          f"pmixed verify-ledger DIR/generate.jsonl --public-key {pub}")  # fmt: skip
    return 0


def _bars(name: str, total: int):
    """A tqdm bar for one stage; the returned callback takes the number of steps done."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"{name:<30}", unit="step", leave=True, dynamic_ncols=True)

    def update(done: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _campaign_config(args: argparse.Namespace):
    from dataclasses import replace

    from reports.campaign import FULL, QUICK

    cfg = QUICK if args.quick else FULL
    if args.members is not None:
        if args.members < 1:
            raise InvalidRequest("members", "must be an integer >= 1", args.members)
        cfg = replace(cfg, n_members=args.members)
    if args.salt is not None:
        if not args.salt:
            raise InvalidRequest("salt", "must be a non-empty string", args.salt)
        cfg = replace(cfg, salt=args.salt)
    for flag, path in (("--public-dir", args.public_dir), ("--private-jsonl", args.private_jsonl),
                       ("--base", args.base)):  # fmt: skip
        if path is not None and not path.exists():
            raise ValueError(f"{flag} {path} does not exist.")
    if args.base is not None:  # a model of the user's own: no public text needed
        if args.private_jsonl is None:
            raise ValueError("--base needs --private-jsonl: the records its members learn from.")
        targets = None if args.lora_targets is None else tuple(args.lora_targets.split(","))
        cfg = replace(cfg, base=str(args.base), private_jsonl=str(args.private_jsonl),
                      public_dir=None if args.public_dir is None else str(args.public_dir),
                      lora=replace(cfg.lora, target_modules=targets),
                      max_private_records=None)  # fmt: skip
    elif args.lora_targets is not None:
        raise ValueError("--lora-targets needs --base (the demo's GPT-2 targets are fixed).")
    elif args.public_dir is not None or args.private_jsonl is not None:
        if args.public_dir is None or args.private_jsonl is None:
            raise ValueError("--public-dir and --private-jsonl must be given together.")
        cfg = replace(cfg, public_dir=str(args.public_dir), private_jsonl=str(args.private_jsonl),
                      max_private_records=None)  # fmt: skip
    return cfg


@contextlib.contextmanager
def _fresh_folder(out: Path):
    """Removes ``out`` again if this command created it and then failed: no half-made run."""
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and out.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def cmd_train(args: argparse.Namespace) -> int:
    from reports.campaign import run_demo

    cfg = _campaign_config(args)
    executor = make_executor(args.executor, args.ray_address)
    with _fresh_folder(args.out):
        run_demo(cfg, args.out, _bars, evaluate=False, executor=executor)
    print(f"trained run in {args.out}")
    return 0


def _print_table(metrics: dict) -> None:
    ppl, priv = metrics["perplexity"], metrics["privacy"]
    print(f"\n{'model':<30}{'perplexity':>12}{'realized':>18}{'epsilon':>10}  guarantee")
    for name, p in ppl.items():
        info = priv[name]
        eps = "-" if info.get("epsilon") is None else f"{info['epsilon']:.3f}"
        if isinstance(p, dict):
            exact = f"{p['exact']:.2f}"
            real = f"{p['realized_mean']:.2f} +- {p['realized_sd']:.2f}"
        else:
            exact, real = f"{p:.2f}", ""
        if info["relation"] == "n/a":
            claim = info["note"]
        else:
            claim = f"{info['relation']}, {info['unit']}"
            if not info["certified"]:
                claim = "UNCERTIFIED: not a DP guarantee (" + claim + ")"
        print(f"{name:<30}{exact:>12}{real:>18}{eps:>10}  {claim}")
    print(f"(delta = {priv['dpsgd']['delta']:g}; {metrics['note']})")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from reports.campaign import run_demo

    audit = getattr(args, "audit", False)
    cfg = _campaign_config(args)
    executor = make_executor(args.executor, args.ray_address)
    with _fresh_folder(args.out):
        metrics = run_demo(cfg, args.out, _bars, audit=audit, executor=executor)
    _print_table(metrics)
    print(f"wrote {args.out / 'metrics.json'}")
    if audit:
        _print_audit(json.loads((args.out / "audit.json").read_text()))
        print(f"wrote {args.out / 'audit.json'} (+ audit.restricted.json, mode 0600)")
    return 0


def _print_audit(result: dict) -> None:
    print(f"\naudit ({result['statement']}):")
    print(f"{'mechanism':<30}{'eps_ub':>8}{'eps_pair':>10}{'exact/charged':>15}{'AUC':>7}  alarms")
    for name, m in result["mechanisms"].items():
        pair = m.get("exact_pair", {})
        auc = m.get("risk", {}).get("reference", m.get("risk", {}).get("loss", {}))
        ub = m["claim"]["epsilon_ub"]
        cells = ["-" if ub is None else f"{ub:.3f}",
                 f"{pair['epsilon_pair']:.4f}" if pair else "-",
                 f"{pair['worst_ratio_exact_over_charged']:.3g}" if pair.get("comparable") else "-",
                 f"{auc['auc']['value']:.3f}" if auc else "-"]  # fmt: skip
        flag = "ALARM" if m.get("alarms") else "none"
        if ub is None:
            flag += " (no privacy claim)"
        elif not m["claim"]["certified"]:
            flag += " (UNCERTIFIED claim)"
        print(f"{name:<30}{cells[0]:>8}{cells[1]:>10}{cells[2]:>15}{cells[3]:>7}  {flag}")
    for name, m in result["mechanisms"].items():
        if "game" in m:
            g = m["game"]
            lbs = ", ".join(f"{e['score']} {e['epsilon_lb']:.3f}" for e in g["empirical"])
            print(f"PMixED game vs {name}: {g['trials_per_world']} trials/world x "
                  f"{g['queries_per_trial']} queries; eps_pair {g['epsilon_pair']:.4f}; "
                  f"eps_lb {lbs}")  # fmt: skip
        if "exposure" in m:
            x = m["exposure"]
            p, c = x["pmixed"], x["non_private_release"]
            print(f"exposure vs {name}: {p['trials']} trials, K={x['references']}; first "
                  f"{p['first_places']}/{p['trials']}, eps_lb {p['epsilon_lb']:.3f}, "
                  f"{p['mean_exposure_bits']:.2f} bits; non-private release first "
                  f"{c['first_places']}/{c['trials']}, eps_lb {c['epsilon_lb']:.3f}, "
                  f"{c['mean_exposure_bits']:.2f} bits")  # fmt: skip
        for e in m.get("empirical", []):
            if "one_run" in e:
                r = e["one_run"]
                print(f"canary one-run vs {name} ({e['target']}): eps_lb {r['epsilon_lb']:.3f} "
                      f"by {r['attack']} (precision {r['precision']:.2f} of {r['r']} guesses, "
                      f"m={r['m']}); AUC " + ", ".join(f"{a} {v['risk']['auc']['value']:.3f}"
                                                     for a, v in e["attacks"].items()))  # fmt: skip
    ok = "all passed" if result["controls_passed"] else "FAILED"
    print("controls: " + ", ".join(f"{c['id']} {'ok' if c['passed'] else 'FAILED'}"
                                   for c in result["controls"]) + f" ({ok})")  # fmt: skip


#: Runs per world of the logistic-regression test bed, by --scale.
TESTBED_RUNS = {"test": 2000, "quick": 10_000, "full": 100_000}


def cmd_power(args: argparse.Namespace) -> int:
    """Planted violations and the DP-SGD test beds: DIR/power.json, then the report if any."""
    if args.repetitions < 0:
        raise InvalidRequest("repetitions", "must be an integer >= 0", args.repetitions)
    return power_stage(args.run, args.scale, args.repetitions, args.seed)


def power_stage(run: Path, scale: str, repetitions: int, seed: int, *, show_report=True) -> int:
    """:func:`cmd_power` (also the demo's last stage): 0 when every mutant is detected and no
    sound twin is."""
    import logging

    from audit.manyrun import ManyRunPlan, corrected_dpsgd_audit, seed_dpsgd_audit, tightness
    from audit.mutants import MUTANTS, run_mutants

    logging.getLogger("absl").setLevel(logging.ERROR)
    mutants = run_mutants(scale, seed=seed, repetitions=repetitions,
                          progress=_bars("audit: planted violations", len(MUTANTS)))  # fmt: skip
    plan = ManyRunPlan(runs=TESTBED_RUNS[scale], pilot_runs=TESTBED_RUNS[scale],
                       seed=seed)  # fmt: skip
    rows = corrected_dpsgd_audit(plan, progress=_bars("audit: LR DP-SGD test bed",
                                                      len(plan.claims)))  # fmt: skip
    power = {"seed": seed, "scale": scale, "mutants": mutants,
             "testbed": {"plan": plan.__dict__, "rows": rows, "tightness": tightness(rows)},
             "seed_dpsgd": seed_dpsgd_audit(seed=seed)}  # fmt: skip
    write_json(run / "power.json", json.loads(json.dumps(power, default=float)))
    print(f"\npower ({scale}): planted violations detected {mutants['detected']} of "
          f"{mutants['total']}; sound twins {'clean' if mutants['twins_clean'] else 'ALARMED'}")  # fmt: skip
    for name, m in mutants["mutants"].items():
        rate = m["twin_false_alarm_rate"]
        fa = "-" if rate is None else f"{m['twin_false_alarms']}/{m['twin_repetitions']}"
        print(f"  {name:<30} {'detected' if m['detected'] else 'MISSED':<9} {m['evidence']}; "
              f"twin false alarms {fa}")  # fmt: skip
    print(f"LR DP-SGD test bed ({plan.runs} runs per world, white-box Dirac canary, q={plan.q}, "
          f"{plan.steps} steps):")  # fmt: skip
    for r in rows:
        one = r["one_run"]["epsilon_lb"] if r["one_run"] else float("nan")
        print(f"  claim {r['claim']['epsilon']:.3f}: eps_lb {r['epsilon_lb']:.3f} "
              f"({r['ratio']:.2f} of the claim, {r['best']}); one-run {one:.3f}")  # fmt: skip
    sd = power["seed_dpsgd"]
    print(f"seed DP-SGD: claimed {sd['claimed_epsilon']:.3f}, eps_lb "
          f"{max(b['epsilon_lb'] for b in sd['bounds'].values()):.3f} "
          f"({'VIOLATION detected' if sd['violation'] else 'not detected'})")  # fmt: skip
    print(f"wrote {run / 'power.json'}")
    if (run / "metrics.json").exists():
        from reports.report import write_report

        doc = write_report(run)
        if show_report:
            _print_report(run, doc)
    return 0 if mutants["all_detected"] and mutants["twins_clean"] else 1


def _by_path(args: argparse.Namespace) -> bool:
    """True for ``--base PATH --adapters DIR``, False for ``--run`` (or its default)."""
    if (args.base is None) != (args.adapters is None):
        raise ValueError("--base and --adapters must be given together.")
    if args.base is not None and args.run is not None:
        raise ValueError("--run or --base/--adapters: not both.")
    return args.base is not None


def _run_of(args: argparse.Namespace) -> Path:
    """``--run``, or the run whose ensemble ``--adapters`` are (exported by ``pmixed train
    --base``): an audit needs the records and the recipe behind the adapters, which a run holds."""
    if not _by_path(args):
        return args.run or Path("runs/demo")
    from pmixed.backend import base_fingerprint, load_base

    marker, run = args.adapters / "ensemble-stage.txt", args.adapters.parent
    config = run / "config.json"
    if not marker.is_file() or not config.is_file():
        raise ValueError(f"--adapters {args.adapters} was not exported by `pmixed train --base`: "
                         "an audit needs the private records and the recipe behind the adapters "
                         "(train them with pmixed train --base PATH --private-jsonl FILE).")  # fmt: skip
    config = json.loads(config.read_text())
    if config["stage_hashes"].get("ensemble") != marker.read_text():
        raise ValueError(f"--adapters {args.adapters} are not the members of {run} (another "
                         "training): audit that run with --run.")  # fmt: skip
    base = base_fingerprint(load_base(args.base)[1])
    if config.get("base") is None or base["sha256"] != config["base"]["sha256"]:
        raise ValueError(f"--base {args.base} is not the base {run} was trained on.")
    return run


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit a trained run: resumes every cached stage, then writes audit.json."""
    args.run = _run_of(args)
    if args.mutants:
        return cmd_power(args)
    from reports.campaign import config_from_run, run_demo

    executor = make_executor(args.executor, args.ray_address)
    run_demo(config_from_run(args.run), args.run, _bars, audit=True, executor=executor)
    result = json.loads((args.run / "audit.json").read_text())
    _print_audit(result)
    print(f"wrote {args.run / 'audit.json'} (+ audit.restricted.json, mode 0600)")
    return (
        1
        if result["alarms"]
        and any(
            result["mechanisms"][a["mechanism"]]["claim"]["certified"] for a in result["alarms"]
        )
        else 0
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole campaign; then verify and recompute the main ledger as a reviewer would."""
    args.audit = True
    rc = cmd_evaluate(args)
    if not args.no_power:  # planted violations and test beds; rewrites the report with them
        print("\naudit power: planted violations with their sound twins, the DP-SGD test beds")
        # "quick" for both demos: at "test" scale (400 runs per world, 20 search evaluations)
        # dpsgd_noise_div4 and pmixed_beta_x4 go undetected (eps_lb 1.41 <= 2; ratio 0.714)
        rc = max(rc, power_stage(args.out, "quick", 100, 0, show_report=False))
    ledger = args.out / "ledger.jsonl"
    check = accounting.verify(ledger, restricted=True)
    spent = accounting.compose(ledger, 1e-5)
    print(f"ledger {ledger}: {'intact' if check.ok else 'FAILED ' + str(check)}, head {check.head}")
    print(f"pmixed account {ledger} --delta 1e-5  ->  epsilon {spent.epsilon:.6f} "
          f"(certified: {'yes' if spent.certified else 'no'})")  # fmt: skip
    report_rc = _print_report(args.out, json.loads((args.out / "report.json").read_text()))
    return rc if check.ok and report_rc == 0 else 1


def _print_report(run: Path, doc: dict) -> int:
    v = doc["verdict"]
    print(f"\nreport: {run / 'report.html'}, {run / 'report.md'}, {run / 'report.json'} "
          f"(+ {run / 'report.restricted.md'}, mode 0600)")  # fmt: skip
    print(f"verdict: {v['level'].upper()} ({v['overall_from']})")
    for r in v["rules"]:
        extra = " [comparison only]" if r["mechanism"] in v["policy"]["comparison_only"] else ""
        print(f"  {r['id']} {r['level']:<7} {r['mechanism'] or 'all':<30} {r['reason']}{extra}")
    return 1 if v["level"] == "fail" else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild the report of a run from its files (no training, no audit)."""
    args.run = _run_of(args)
    for name in ("config.json", "metrics.json"):
        if not (args.run / name).exists():
            raise FileNotFoundError(f"{args.run / name} is missing: run `pmixed demo --out "
                                    f"{args.run}` first.")  # fmt: skip
    from reports.report import write_report

    return _print_report(args.run, write_report(args.run))


#: Exit code of ``pmixed generate`` when the budget ran out and a prompt was refused.
EXIT_REFUSED = 3


def _deployment(args: argparse.Namespace, path: Path, cfg: dict):
    """The deployment at ``path``: opened when it exists, else created from ``cfg`` (the run's
    config, or the --base/--adapters flags; with ``args.seed`` if the command has one; callers
    refuse a seed for an existing ledger before loading anything)."""
    from pmixed.deployment import Deployment

    key = None
    if args.signing_key is not None:
        from accounting.signing import load_private_key

        key = load_private_key(args.signing_key)
    if path.exists():
        if _deployment_flags(args):
            raise ValueError(f"{', '.join(_deployment_flags(args))}: fixed when a deployment is "
                             f"created; {path} exists.")  # fmt: skip
        return Deployment.open(path, on_exhausted=args.on_exhausted, signing_key=key)
    pcfg = PMixEDConfig(n_members=cfg["n_members"], sampling_rate=cfg["sampling_rate"],
                        epsilon=cfg["epsilon"], delta=cfg["delta"],
                        query_budget=cfg["query_budget"])  # fmt: skip
    return Deployment.create(path, pcfg.calibrate(), seed=getattr(args, "seed", None),
                             on_exhausted=args.on_exhausted, signing_key=key)  # fmt: skip


#: Deployment settings a --base/--adapters deployment takes from flags (a run has its own).
DEPLOYMENT_FLAGS = ("sampling_rate", "epsilon", "delta", "query_budget")


def _deployment_flags(args: argparse.Namespace) -> list[str]:
    """The deployment-setting flags given on this command line."""
    return [f"--{f.replace('_', '-')}" for f in DEPLOYMENT_FLAGS if getattr(args, f) is not None]


def _load_lm(args: argparse.Namespace, ledger: str):
    """(deployment settings, tokenizer, EnsembleLM, name, default ledger path) of ``--run`` or of
    ``--base PATH --adapters DIR``; every mismatch is an error here, before any ledger exists."""
    from transformers.utils import logging as hf_logging

    from pmixed.models import EnsembleLM

    hf_logging.disable_progress_bar()  # a weight-loading bar per call is noise on a service
    given = _deployment_flags(args)
    if not _by_path(args):
        from reports.campaign import load_run

        if given:
            raise ValueError(f"{', '.join(given)}: a run's deployment settings are its own "
                             "(only with --base/--adapters).")  # fmt: skip
        run = args.run or Path("runs/demo")
        cfg, tok, model, members = load_run(run)
        name, folder = run.name, run
    else:
        from pmixed.backend import load_adapters, load_base
        from reports.campaign import FULL

        tok, base = load_base(args.base)
        model, members = load_adapters(base, args.adapters)
        cfg = {f: getattr(args, f) if getattr(args, f) is not None else getattr(FULL, f)
               for f in DEPLOYMENT_FLAGS} | {"n_members": len(members)}  # fmt: skip
        name, folder = args.base.name, args.adapters
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return cfg, tok, EnsembleLM(model, members, pad), name, args.ledger or folder / ledger


def cmd_generate(args: argparse.Namespace) -> int:
    """Serve prompts from a trained run through its deployment ledger (created on first use)."""
    from pmixed.deployment import check_prompt, check_sampling
    from pmixed.generator import PrivateGenerator

    cfg, tok, lm, _, path = _load_lm(args, "generate.jsonl")
    if path.exists() and args.seed is not None:
        raise InvalidRequest("seed", f"is fixed when a deployment is created; {path} exists",
                             args.seed)  # fmt: skip
    prompts = [tok(p)["input_ids"] for p in args.prompt]
    check_sampling(args.temperature, args.top_k, lm.vocab_size)  # before any file is touched
    for p in prompts:
        check_prompt(p, vocab_size=lm.vocab_size, max_positions=lm.max_positions,
                     new_tokens=args.max_new_tokens, truncate=args.truncate_prompt)  # fmt: skip
    deployment = _deployment(args, path, cfg)
    with deployment:
        if deployment.seeded:
            print("audit deployment: its randomness is seeded (reproducible); never serve real "
                  "users from it", file=sys.stderr)  # fmt: skip
        outs = PrivateGenerator(lm, deployment).generate(
            prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            truncate=args.truncate_prompt,
        )  # fmt: skip
        spent = deployment.spent()
    for text, g in zip(args.prompt, outs):
        print(f"{text}{tok.decode(list(g.tokens))}")
        status = "refused: budget exhausted" if g.refused else "ok"
        if g.prompt_truncated:
            status += f"; prompt truncated by {g.prompt_truncated} tokens on the left"
        print(f"  [{g.private_steps} private, {g.public_steps} public-model tokens; {status}]")
    signed = "signed" if deployment.signed else "unsigned"
    print(f"ledger {path} ({signed}): epsilon spent {spent.epsilon:.4f} of "
          f"{deployment.filter.budget.epsilon:g} over {spent.steps} tokens")  # fmt: skip
    return EXIT_REFUSED if any(g.refused for g in outs) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a trained run over HTTP (OpenAI-style completions) through one deployment ledger."""
    import uvicorn

    from pmixed.generator import PrivateGenerator
    from pmixed.server import create_app

    if not 1 <= args.port <= 65535:
        raise InvalidRequest("port", "must be in [1, 65535]", args.port)
    if args.max_batch < 1:
        raise InvalidRequest("max_batch", "must be >= 1", args.max_batch)
    cfg, tok, lm, name, path = _load_lm(args, "serve.jsonl")
    with _deployment(args, path, cfg) as deployment:
        gen = PrivateGenerator(lm, deployment, constant_work=not args.sampled_members_only)
        app = create_app(gen, tok, model_name=name, max_batch=args.max_batch)
        print(f"serving {name} on http://{args.host}:{args.port} (ledger {path})",
              file=sys.stderr)  # fmt: skip
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where the training jobs (members, fine-tune, DP-SGD, the DP-SGD audit's "
                        "runs) run: here, one after another, or as Ray tasks (pip install "
                        "'pmixed-audit[ray]'); the same files either way")  # fmt: skip
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="--executor ray: join this cluster (auto, ray://host:10001) instead of "
                        "starting a local one")  # fmt: skip


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, default=None, help="a trained run (default runs/demo)")
    p.add_argument("--base", type=Path, default=None, metavar="PATH",
                   help="instead of --run: a base model folder (with --adapters)")  # fmt: skip
    p.add_argument("--adapters", type=Path, default=None, metavar="DIR",
                   help="a folder of peft LoRA adapter folders on --base, one per member, in "
                        "name order (pmixed train --base writes RUN/adapters)")  # fmt: skip


def _deployment_args(p: argparse.ArgumentParser, ledger: str) -> None:
    _source_args(p)
    for flag, what in (("sampling-rate", "q"), ("epsilon", "epsilon"), ("delta", "delta"),
                       ("query-budget", "T")):  # fmt: skip
        kind = int if flag == "query-budget" else float
        p.add_argument(f"--{flag}", type=kind, default=None,
                       help=f"--base/--adapters: the new deployment's {what} (default: the "
                            "demo's)")  # fmt: skip
    p.add_argument("--signing-key", type=Path, default=None, metavar="FILE",
                   help="Ed25519 private key (pmixed keygen): sign every ledger record")  # fmt: skip
    p.add_argument("--ledger", type=Path, default=None,
                   help=f"deployment ledger (default RUN/{ledger} or ADAPTERS/{ledger}; reused "
                        "across calls)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmixed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("calibrate", help="beta and the per-query RDP curve for a deployment")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("verify-ledger", help="check a ledger's hash chain and schema")
    p.add_argument("ledger", type=Path)
    p.add_argument(
        "--expect-head",
        default=None,
        metavar="sha256:HEX",
        help="the chain head published elsewhere; detects deleted last records",
    )
    p.add_argument(
        "--restricted",
        action="store_true",
        help="also check the 0600 restricted sibling and its links",
    )
    p.add_argument("--public-key", type=Path, default=None, metavar="FILE",
                   help="the deployment's Ed25519 public key (PEM): every record must be signed "
                        "by it")  # fmt: skip
    p.set_defaults(func=cmd_verify_ledger)
    p = sub.add_parser("ledger", help="ledger tables (pandas): export")
    ledger_sub = p.add_subparsers(dest="ledger_command", required=True)
    p = ledger_sub.add_parser("export", help="one verified row per record, as CSV")
    p.add_argument("ledger", type=Path)
    p.add_argument("--csv", type=Path, required=True, metavar="FILE")
    p.add_argument("--restricted", action="store_true",
                   help="add the restricted sibling's columns (subsets, lambdas, seed); the CSV "
                        "is then mode 0600")  # fmt: skip
    p.set_defaults(func=cmd_ledger_export)
    p = sub.add_parser("keygen", help="an Ed25519 key pair that signs a deployment's ledger")
    p.add_argument("--out", type=Path, default=Path("deployment"),
                   help="writes OUT.key (mode 0600) and OUT.pub")  # fmt: skip
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("account", help="recompute the privacy a ledger spent (dp-accounting)")
    p.add_argument("ledger", type=Path)
    p.add_argument("--delta", type=float, required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_account)
    what = "calibrate all modes and run the exact neighbour audit on a toy instance"
    p = sub.add_parser("exact-audit", help=what)
    p.add_argument("--out", type=Path, default=Path("runs/exact-audit"))
    p.set_defaults(func=cmd_exact_audit)
    for name, func, what in [
        ("train", cmd_train, "train tokenizer, public model, ensemble, fine-tune and DP-SGD"),
        ("evaluate", cmd_evaluate, "train if needed, then evaluate through real ledgers"),
        ("demo", cmd_demo, "the whole campaign: train, evaluate, audit, print the tables"),
    ]:
        p = sub.add_parser(name, help=what)
        if name == "demo":
            p.add_argument("--no-power", action="store_true",
                           help="skip the audit-power stage (planted violations with 100 sound-"
                                "twin seeds each, the DP-SGD test beds): about 4 minutes")  # fmt: skip
        p.add_argument("--out", "--run", dest="out", type=Path, default=Path("runs/demo"))
        p.add_argument("--quick", action="store_true", help="small models and budget (minutes)")
        p.add_argument(
            "--public-dir",
            type=Path,
            default=None,
            help="your public text: a folder of .txt files (with --private-jsonl)",
        )
        p.add_argument(
            "--private-jsonl",
            type=Path,
            default=None,
            help='your private records: JSON lines {"user": ..., "text": ...}',
        )
        p.add_argument("--members", type=int, default=None,
                       help="ensemble members N (one per user partition); default 32, quick 8")  # fmt: skip
        p.add_argument("--salt", default=None,
                       help="the public salt of the user partition hash (fixed before training)")  # fmt: skip
        p.add_argument("--base", type=Path, default=None, metavar="PATH",
                       help="your base model folder (save_pretrained of model and tokenizer): "
                            "members are LoRA adapters on it; needs --private-jsonl")  # fmt: skip
        p.add_argument("--lora-targets", default=None, metavar="A,B",
                       help="--base: the modules LoRA adapts (default: peft's for the "
                            "architecture)")  # fmt: skip
        _executor_args(p)
        p.set_defaults(func=func)
    p = sub.add_parser("audit", help="audit a trained run: exact pairs, MIAs, controls")
    _source_args(p)
    _executor_args(p)
    p.add_argument("--mutants", action="store_true",
                   help="audit power instead: planted violations with their sound twins and the "
                        "DP-SGD test beds; writes RUN/power.json (the report shows it)")  # fmt: skip
    p.add_argument("--scale", choices=sorted(TESTBED_RUNS), default="quick",
                   help="--mutants: quick (minutes) or full (10^5 test-bed runs per world)")  # fmt: skip
    p.add_argument("--repetitions", type=int, default=100,
                   help="--mutants: seeds over which each cheap twin's false alarms are counted")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="--mutants: the audit's root seed")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("report", help="rebuild report.json/.md/.html of a run from its files")
    _source_args(p)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("generate", help="generate text privately from a trained run")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--on-exhausted", choices=["public", "refuse"], default="public")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="drop a too-long prompt's oldest tokens instead of refusing it")  # fmt: skip
    p.add_argument("--seed", type=int, default=None,
                   help="audit deployments only, fixed when the ledger is created; default: OS "
                        "entropy")  # fmt: skip
    _deployment_args(p, "generate.jsonl")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("serve", help="serve a trained run over HTTP (POST /v1/completions)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--on-exhausted", choices=["public", "refuse"], default="refuse")
    p.add_argument("--max-batch", type=int, default=32, help="prompts advanced together")
    p.add_argument("--sampled-members-only", action="store_true",
                   help="compute only sampled members (faster; step latency then depends on "
                        "the restricted subset)")  # fmt: skip
    _deployment_args(p, "serve.jsonl")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `pmixed account ... | head`: the reader left; exit quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except InvalidRequest as err:
        print(f"pmixed {args.command}: error: {err.for_flag()}", file=sys.stderr)
        return 2
    except (ValueError, InfeasibleBudget, OSError, accounting.LedgerCorrupt) as err:
        print(f"pmixed {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Commands on a run directory: ``train``, ``evaluate``, ``demo``, ``audit`` (and ``audit
--mutants``, the audit's power) and ``report``."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from pathlib import Path

import accounting
from pmixed.deployment import InvalidRequest
from pmixed.executor import make_executor
from reports.rundir import (
    AUDIT,
    AUDIT_RESTRICTED,
    CONFIG,
    METRICS,
    POWER,
    REPORT_ANNEX,
    REPORT_FILES,
    RunDir,
)


def bars(name: str, total: int):
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

    from campaign.config import FULL, QUICK

    cfg = QUICK if args.quick else FULL
    if args.members is not None:
        if args.members < 1:
            raise InvalidRequest("members", "must be an integer >= 1", args.members)
        cfg = replace(cfg, n_members=args.members)
    if args.salt is not None:
        if not args.salt:
            raise InvalidRequest("salt", "must be a non-empty string", args.salt)
        cfg = replace(cfg, salt=args.salt)
    for flag, path in (
        ("--public-dir", args.public_dir),
        ("--private-jsonl", args.private_jsonl),
        ("--base", args.base),
    ):
        if path is not None and not path.exists():
            raise ValueError(f"{flag} {path} does not exist.")
    if args.base is not None:  # a model of the user's own: no public text needed
        if args.private_jsonl is None:
            raise ValueError("--base needs --private-jsonl: the records its members learn from.")
        targets = None if args.lora_targets is None else tuple(args.lora_targets.split(","))
        cfg = replace(
            cfg,
            base=str(args.base),
            private_jsonl=str(args.private_jsonl),
            public_dir=None if args.public_dir is None else str(args.public_dir),
            lora=replace(cfg.lora, target_modules=targets),
            max_private_records=None,
        )
    elif args.lora_targets is not None:
        raise ValueError("--lora-targets needs --base (the demo's GPT-2 targets are fixed).")
    elif args.public_dir is not None or args.private_jsonl is not None:
        if args.public_dir is None or args.private_jsonl is None:
            raise ValueError("--public-dir and --private-jsonl must be given together.")
        cfg = replace(
            cfg,
            public_dir=str(args.public_dir),
            private_jsonl=str(args.private_jsonl),
            max_private_records=None,
        )
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
    from campaign.run import run_demo

    cfg = _campaign_config(args)
    executor = make_executor(args.executor, args.ray_address)
    with _fresh_folder(args.out):
        run_demo(cfg, args.out, bars, evaluate=False, executor=executor)
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


def cmd_evaluate(args: argparse.Namespace, executor=None, after_public=None) -> int:
    from campaign.run import run_demo

    audit = getattr(args, "audit", False)
    cfg = _campaign_config(args)
    executor = executor or make_executor(args.executor, args.ray_address)
    with _fresh_folder(args.out):
        metrics = run_demo(
            cfg, args.out, bars, audit=audit, executor=executor, after_public=after_public
        )
    _print_table(metrics)
    run = RunDir(args.out)
    print(f"wrote {run / METRICS}")
    if audit:
        _print_audit(run.read_json(AUDIT))
        print(f"wrote {run / AUDIT} (+ {AUDIT_RESTRICTED}, mode 0600)")
    return 0


def _print_audit(result: dict) -> None:
    print(f"\naudit ({result['statement']}):")
    print(f"{'mechanism':<30}{'eps_ub':>8}{'eps_pair':>10}{'exact/charged':>15}{'AUC':>7}  alarms")
    for name, m in result["mechanisms"].items():
        pair = m.get("exact_pair", {})
        auc = m.get("risk", {}).get("reference", m.get("risk", {}).get("loss", {}))
        ub = m["claim"]["epsilon_ub"]
        cells = [
            "-" if ub is None else f"{ub:.3f}",
            f"{pair['epsilon_pair']:.4f}" if pair else "-",
            f"{pair['worst_ratio_exact_over_charged']:.3g}" if pair.get("comparable") else "-",
            f"{auc['auc']['value']:.3f}" if auc else "-",
        ]
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
            print(
                f"PMixED game vs {name}: {g['trials_per_world']} trials/world x "
                f"{g['queries_per_trial']} queries; eps_pair {g['epsilon_pair']:.4f}; "
                f"eps_lb {lbs}"
            )
        if "exposure" in m:
            x = m["exposure"]
            p, c = x["pmixed"], x["non_private_release"]
            print(
                f"exposure vs {name}: {p['trials']} trials, K={x['references']}; first "
                f"{p['first_places']}/{p['trials']}, eps_lb {p['epsilon_lb']:.3f}, "
                f"{p['mean_exposure_bits']:.2f} bits; non-private release first "
                f"{c['first_places']}/{c['trials']}, eps_lb {c['epsilon_lb']:.3f}, "
                f"{c['mean_exposure_bits']:.2f} bits"
            )
        conf = (m.get("worst_case") or {}).get("configuration")
        if conf:
            print(
                f"any models at {name}'s configuration (toy, optimised): exact/charged "
                f"{conf['ratio']:.3g} at order {conf['order']}"
                + (" ALARM" if conf["alarm"] else "")
            )
        for e in m.get("empirical", []):
            if "one_run" in e:
                r = e["one_run"]
                print(
                    f"canary one-run vs {name} ({e['target']}): eps_lb {r['epsilon_lb']:.3f} "
                    f"by {r['attack']} (precision {r['precision']:.2f} of {r['r']} guesses, "
                    f"m={r['m']}); AUC "
                    + ", ".join(
                        f"{a} {v['risk']['auc']['value']:.3f}" for a, v in e["attacks"].items()
                    )
                )
    ok = "all passed" if result["controls_passed"] else "FAILED"
    print(
        "controls: "
        + ", ".join(f"{c['id']} {'ok' if c['passed'] else 'FAILED'}" for c in result["controls"])
        + f" ({ok})"
    )


#: Runs per world of the logistic-regression test bed, by --scale.
TESTBED_RUNS = {"test": 2000, "quick": 10_000, "full": 100_000}


def cmd_power(args: argparse.Namespace) -> int:
    """Planted violations and the DP-SGD test beds: DIR/power.json, then the report if any."""
    if args.repetitions < 0:
        raise InvalidRequest("repetitions", "must be an integer >= 0", args.repetitions)
    return power_stage(args.run, args.scale, args.repetitions, args.seed)


def power_result(scale: str, repetitions: int, seed: int, progress=None) -> dict:
    """The audit's power: planted violations with their sound twins, the LR DP-SGD test bed and
    the seed DP-SGD test bed. Independent of any run (toy mechanisms and their own seeds), so the
    demo computes it as a background job beside its training. ``progress`` (optional): the
    command line's bar factory."""
    import logging

    from audit.manyrun import ManyRunPlan, corrected_dpsgd_audit, seed_dpsgd_audit, tightness
    from audit.mutants import MUTANTS, run_mutants

    def bar(name: str, total: int):
        return None if progress is None else progress(name, total)

    logging.getLogger("absl").setLevel(logging.ERROR)
    mutants = run_mutants(
        scale,
        seed=seed,
        repetitions=repetitions,
        progress=bar("audit: planted violations", len(MUTANTS)),
    )
    plan = ManyRunPlan(runs=TESTBED_RUNS[scale], pilot_runs=TESTBED_RUNS[scale], seed=seed)
    rows = corrected_dpsgd_audit(plan, progress=bar("audit: LR DP-SGD test bed", len(plan.claims)))
    power = {
        "seed": seed,
        "scale": scale,
        "mutants": mutants,
        "testbed": {"plan": plan.__dict__, "rows": rows, "tightness": tightness(rows)},
        "seed_dpsgd": seed_dpsgd_audit(seed=seed),
    }
    return json.loads(json.dumps(power, default=float))


def power_stage(run: Path, scale: str, repetitions: int, seed: int, *, show_report=True) -> int:
    """:func:`cmd_power`: :func:`power_result`, written and shown by :func:`write_power`."""
    power = power_result(scale, repetitions, seed, progress=bars)
    return write_power(run, power, show_report=show_report)


def write_power(run: Path, power: dict, *, show_report=True) -> int:
    """Writes DIR/power.json, prints it, rewrites the report if the run has one; 0 when every
    mutant is detected and no sound twin is."""
    mutants, plan = power["mutants"], power["testbed"]["plan"]
    rows = power["testbed"]["rows"]
    RunDir(run).write_json(POWER, power)
    print(
        f"\npower ({power['scale']}): planted violations detected {mutants['detected']} of "
        f"{mutants['total']}; sound twins {'clean' if mutants['twins_clean'] else 'ALARMED'}"
    )
    for name, m in mutants["mutants"].items():
        rate = m["twin_false_alarm_rate"]
        fa = "-" if rate is None else f"{m['twin_false_alarms']}/{m['twin_repetitions']}"
        print(
            f"  {name:<30} {'detected' if m['detected'] else 'MISSED':<9} {m['evidence']}; "
            f"twin false alarms {fa}"
        )
    print(
        f"LR DP-SGD test bed ({plan['runs']} runs per world, white-box Dirac canary, "
        f"q={plan['q']}, {plan['steps']} steps):"
    )
    for r in rows:
        one = r["one_run"]["epsilon_lb"] if r["one_run"] else float("nan")
        print(
            f"  claim {r['claim']['epsilon']:.3f}: eps_lb {r['epsilon_lb']:.3f} "
            f"({r['ratio']:.2f} of the claim, {r['best']}); one-run {one:.3f}"
        )
    sd = power["seed_dpsgd"]
    print(
        f"seed DP-SGD: claimed {sd['claimed_epsilon']:.3f}, eps_lb "
        f"{max(b['epsilon_lb'] for b in sd['bounds'].values()):.3f} "
        f"({'VIOLATION detected' if sd['violation'] else 'not detected'})"
    )
    print(f"wrote {run / POWER}")
    if (run / METRICS).exists():
        from reports.report import write_report

        doc = write_report(run)
        if show_report:
            _print_report(run, doc)
    return 0 if mutants["all_detected"] and mutants["twins_clean"] else 1


def by_path(args: argparse.Namespace) -> bool:
    """True for ``--base PATH --adapters DIR``, False for ``--run`` (or its default)."""
    if (args.base is None) != (args.adapters is None):
        raise ValueError("--base and --adapters must be given together.")
    if args.base is not None and args.run is not None:
        raise ValueError("--run or --base/--adapters: not both.")
    return args.base is not None


def _run_of(args: argparse.Namespace) -> Path:
    """``--run``, or the run whose ensemble ``--adapters`` are (exported by ``pmixed train
    --base``): an audit needs the records and the recipe behind the adapters, which a run holds."""
    if not by_path(args):
        return args.run or Path("runs/demo")
    from pmixed.backend import base_fingerprint, load_base

    marker, run = args.adapters / "ensemble-stage.txt", args.adapters.parent
    config = run / CONFIG
    if not marker.is_file() or not config.is_file():
        raise ValueError(
            f"--adapters {args.adapters} was not exported by `pmixed train --base`: "
            "an audit needs the private records and the recipe behind the adapters "
            "(train them with pmixed train --base PATH --private-jsonl FILE)."
        )
    config = json.loads(config.read_text())
    if config["stage_hashes"].get("ensemble") != marker.read_text():
        raise ValueError(
            f"--adapters {args.adapters} are not the members of {run} (another "
            "training): audit that run with --run."
        )
    base = base_fingerprint(load_base(args.base)[1])
    if config.get("base") is None or base["sha256"] != config["base"]["sha256"]:
        raise ValueError(f"--base {args.base} is not the base {run} was trained on.")
    return run


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit a trained run: resumes every cached stage, then writes audit.json."""
    args.run = _run_of(args)
    if args.mutants:
        return cmd_power(args)
    from campaign.run import config_from_run, run_demo

    executor = make_executor(args.executor, args.ray_address)
    run_demo(config_from_run(args.run), args.run, bars, audit=True, executor=executor)
    result = RunDir(args.run).read_json(AUDIT)
    _print_audit(result)
    print(f"wrote {args.run / AUDIT} (+ {AUDIT_RESTRICTED}, mode 0600)")
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
    from pmixed.executor import Job

    args.audit = True
    _campaign_config(args)  # bad flags fail before anything starts
    executor = make_executor(args.executor, args.ray_address)
    # The power stage depends on no run: it starts once the public model is trained, beside the
    # rest (in the background on the processes and Ray executors; the local one runs it when
    # collected, below). Not before: the public model's weights depend on its thread count.
    # "quick" for both demos: at "test" scale (400 runs per world, 20 search evaluations)
    # dpsgd_noise_div4 and pmixed_beta_x4 go undetected (eps_lb 1.41 <= 2; ratio 0.714)
    started = []

    def start_power() -> None:
        if not args.no_power and not started:
            started.append(executor.submit([Job(power_result, ("quick", 100, 0))]))

    try:
        rc = cmd_evaluate(args, executor, after_public=start_power)
    except BaseException:
        for power in started:
            power.cancel()
        raise
    power = started[0] if started else None  # run_demo started it (unless --no-power)
    if power is not None:  # planted violations and test beds; rewrites the report with them
        print("\naudit power: planted violations with their sound twins, the DP-SGD test beds")
        [result] = power.results(progress=bars("audit: power (planted violations, test beds)", 1))
        rc = max(rc, write_power(args.out, result, show_report=False))
    ledger = args.out / "ledger.jsonl"
    check = accounting.verify(ledger, restricted=True)
    spent = accounting.compose(ledger, 1e-5)
    print(f"ledger {ledger}: {'intact' if check.ok else 'FAILED ' + str(check)}, head {check.head}")
    print(
        f"pmixed account {ledger} --delta 1e-5  ->  epsilon {spent.epsilon:.6f} "
        f"(certified: {'yes' if spent.certified else 'no'})"
    )
    report_rc = _print_report(args.out, RunDir(args.out).read_json(REPORT_FILES[0]))
    return rc if check.ok and report_rc == 0 else 1


def _print_report(run: Path, doc: dict) -> int:
    v = doc["verdict"]
    files = ", ".join(str(run / name) for name in reversed(REPORT_FILES))
    print(f"\nreport: {files} (+ {run / REPORT_ANNEX}, mode 0600)")
    print(f"verdict: {v['level'].upper()} ({v['overall_from']})")
    for r in v["rules"]:
        extra = " [comparison only]" if r["mechanism"] in v["policy"]["comparison_only"] else ""
        print(f"  {r['id']} {r['level']:<7} {r['mechanism'] or 'all':<30} {r['reason']}{extra}")
    return 1 if v["level"] == "fail" else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild the report of a run from its files (no training, no audit)."""
    args.run = _run_of(args)
    RunDir(args.run).require(CONFIG, METRICS)
    from reports.report import write_report

    return _print_report(args.run, write_report(args.run))

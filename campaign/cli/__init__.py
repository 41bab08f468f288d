"""The ``pmixed`` command line.

The parser and the entry point (``python -m campaign.cli`` runs it too); the commands live in the
modules of this package.

``calibrate`` (β and the per-query RDP curve for a deployment), ``verify-ledger`` and ``account``
(check a ledger's hash chain; recompute the privacy it spent with dp-accounting), ``ledger export``,
``keygen``, ``exact-audit`` (the exact neighbour audit on a public toy instance), ``worst-case``
(the configuration's worst case, searched on a public toy):
:mod:`campaign.cli.ledger_commands`. ``train`` / ``evaluate`` / ``demo`` (the campaign: models,
perplexities through real ledgers, and, for ``demo``, the audit and the report), ``audit`` and
``report``: :mod:`campaign.cli.run_commands`. ``generate`` and ``serve`` (private text from a trained
run or a base with adapters): :mod:`campaign.cli.deploy_commands`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import accounting
from campaign.cli.deploy_commands import cmd_generate, cmd_serve
from campaign.cli.ledger_commands import (
    PAPER,
    cmd_account,
    cmd_calibrate,
    cmd_exact_audit,
    cmd_keygen,
    cmd_ledger_export,
    cmd_verify_ledger,
    cmd_worst_case,
)
from campaign.cli.run_commands import (
    TESTBED_RUNS,
    cmd_audit,
    cmd_demo,
    cmd_evaluate,
    cmd_report,
    cmd_train,
)
from pmixed import InfeasibleBudget, mode_names
from pmixed.deployment import InvalidRequest
from pmixed.executor import EXECUTORS
from reports.rundir import GENERATE_LEDGER, SERVE_LEDGER


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-members", type=int, default=PAPER["n_members"])
    p.add_argument("--sampling-rate", type=float, default=PAPER["sampling_rate"])
    p.add_argument("--epsilon", type=float, default=PAPER["epsilon"])
    p.add_argument("--delta", type=float, default=PAPER["delta"])
    p.add_argument("--query-budget", type=int, default=PAPER["query_budget"])
    p.add_argument("--mode", default="certified", choices=mode_names())
    p.add_argument("--relation", default="add_remove", choices=["add_remove", "replace_one"])
    p.add_argument("--lambda-max", type=float, default=None, help="capped mode only")


def _executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="processes",
        help="where the training jobs (members, fine-tune, DP-SGD, the DP-SGD audit's "
        "runs) run: worker processes on this machine's cores, the audit's beside its other "
        "work (default); here, one after another (local); or as Ray tasks (pip install "
        "'pmixed-audit[ray]'); the same files every way",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="--executor ray: join this cluster (auto, ray://host:10001) instead of "
        "starting a local one",
    )


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, default=None, help="a trained run (default runs/demo)")
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        metavar="PATH",
        help="instead of --run: a base model folder (with --adapters)",
    )
    p.add_argument(
        "--adapters",
        type=Path,
        default=None,
        metavar="DIR",
        help="a folder of peft LoRA adapter folders on --base, one per member, in "
        "name order (pmixed train --base writes RUN/adapters)",
    )


def _deployment_args(p: argparse.ArgumentParser, ledger: str) -> None:
    _source_args(p)
    for flag, what in (
        ("sampling-rate", "q"),
        ("epsilon", "epsilon"),
        ("delta", "delta"),
        ("query-budget", "T"),
    ):
        kind = int if flag == "query-budget" else float
        p.add_argument(
            f"--{flag}",
            type=kind,
            default=None,
            help=f"--base/--adapters: the new deployment's {what} (default: the demo's)",
        )
    p.add_argument(
        "--signing-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="Ed25519 private key (pmixed keygen): sign every ledger record",
    )
    p.add_argument(
        "--ledger",
        type=Path,
        default=None,
        help=f"deployment ledger (default RUN/{ledger} or ADAPTERS/{ledger}; reused across calls)",
    )


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
    p.add_argument(
        "--public-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="the deployment's Ed25519 public key (PEM): every record must be signed by it",
    )
    p.set_defaults(func=cmd_verify_ledger)
    p = sub.add_parser("ledger", help="ledger tables (pandas): export")
    ledger_sub = p.add_subparsers(dest="ledger_command", required=True)
    p = ledger_sub.add_parser("export", help="one verified row per record, as CSV")
    p.add_argument("ledger", type=Path)
    p.add_argument("--csv", type=Path, required=True, metavar="FILE")
    p.add_argument(
        "--restricted",
        action="store_true",
        help="add the restricted sibling's columns (subsets, lambdas, seed); the CSV "
        "is then mode 0600",
    )
    p.set_defaults(func=cmd_ledger_export)
    p = sub.add_parser("keygen", help="an Ed25519 key pair that signs a deployment's ledger")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("deployment"),
        help="writes OUT.key (mode 0600) and OUT.pub",
    )
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
    what = "the configuration's worst case: toy models chosen to maximise exact/charged (exit 1: exceeded)"
    p = sub.add_parser("worst-case", help=what)
    _config_args(p)
    p.add_argument(
        "--pair",
        default="add_remove",
        choices=["add_remove", "replace_one"],
        help="the neighbouring pair searched (replace_one: a replace_one deployment, or reference "
        "mode, whose claim is per record)",
    )
    p.add_argument("--starts", type=int, default=150, help="random toys tried (>= 1)")
    p.add_argument("--refine", type=int, default=5, help="best starts refined (1..starts)")
    p.add_argument("--iterations", type=int, default=300, help="Nelder-Mead steps each (>= 1)")
    p.add_argument("--vocab", type=int, default=3, help="the toy's vocabulary (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="the search's seed (>= 0)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_worst_case)
    for name, func, what in [
        ("train", cmd_train, "train tokenizer, public model, ensemble, fine-tune and DP-SGD"),
        ("evaluate", cmd_evaluate, "train if needed, then evaluate through real ledgers"),
        ("demo", cmd_demo, "the whole campaign: train, evaluate, audit, print the tables"),
    ]:
        p = sub.add_parser(name, help=what)
        if name == "demo":
            p.add_argument(
                "--no-power",
                action="store_true",
                help="skip the audit-power stage (planted violations with 100 sound-"
                "twin seeds each, the DP-SGD test beds): about 4 minutes",
            )
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
        p.add_argument(
            "--members",
            type=int,
            default=None,
            help="ensemble members N (one per user partition); default 32, quick 8",
        )
        p.add_argument(
            "--salt",
            default=None,
            help="the public salt of the user partition hash (fixed before training)",
        )
        p.add_argument(
            "--base",
            type=Path,
            default=None,
            metavar="PATH",
            help="your base model folder (save_pretrained of model and tokenizer): "
            "members are LoRA adapters on it; needs --private-jsonl",
        )
        p.add_argument(
            "--lora-targets",
            default=None,
            metavar="A,B",
            help="--base: the modules LoRA adapts (default: peft's for the architecture)",
        )
        _executor_args(p)
        p.set_defaults(func=func)
    p = sub.add_parser("audit", help="audit a trained run: exact pairs, MIAs, controls")
    _source_args(p)
    _executor_args(p)
    p.add_argument(
        "--mutants",
        action="store_true",
        help="audit power instead: planted violations with their sound twins and the "
        "DP-SGD test beds; writes RUN/power.json (the report shows it)",
    )
    p.add_argument(
        "--scale",
        choices=sorted(TESTBED_RUNS),
        default="quick",
        help="--mutants: quick (minutes) or full (10^5 test-bed runs per world)",
    )
    p.add_argument(
        "--repetitions",
        type=int,
        default=100,
        help="--mutants: seeds over which each sound twin's false alarms are counted (at scale test)",
    )
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
    p.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="drop a too-long prompt's oldest tokens instead of refusing it",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="audit deployments only, fixed when the ledger is created; default: OS entropy",
    )
    _deployment_args(p, GENERATE_LEDGER)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("serve", help="serve a trained run over HTTP (POST /v1/completions)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--on-exhausted", choices=["public", "refuse"], default="refuse")
    p.add_argument("--max-batch", type=int, default=32, help="prompts advanced together")
    p.add_argument(
        "--sampled-members-only",
        action="store_true",
        help="compute only sampled members (faster; step latency then depends on "
        "the restricted subset)",
    )
    _deployment_args(p, SERVE_LEDGER)
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

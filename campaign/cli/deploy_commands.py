"""Commands that serve a deployment: ``generate`` (prompts from the command line) and ``serve``
(HTTP), from a trained run or from ``--base PATH --adapters DIR``; every token is charged to the
deployment's ledger before it is released."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from campaign.cli.run_commands import by_path
from pmixed import PMixEDConfig
from pmixed.deployment import InvalidRequest
from reports.rundir import GENERATE_LEDGER, SERVE_LEDGER

#: Exit code of ``pmixed generate`` when the budget ran out and a prompt was refused.
EXIT_REFUSED = 3


def _deployment(args: argparse.Namespace, path: Path, pcfg: PMixEDConfig):
    """The deployment at ``path``: opened when it exists, else created from ``pcfg`` (the run's
    deployment, or the --base/--adapters flags; with ``args.seed`` if the command has one; callers
    refuse a seed for an existing ledger before loading anything)."""
    from pmixed.deployment import Deployment

    key = None
    if args.signing_key is not None:
        from accounting.signing import load_private_key

        key = load_private_key(args.signing_key)
    if path.exists():
        if _deployment_flags(args):
            raise ValueError(
                f"{', '.join(_deployment_flags(args))}: fixed when a deployment is "
                f"created; {path} exists."
            )
        return Deployment.open(path, on_exhausted=args.on_exhausted, signing_key=key)
    return Deployment.create(
        path,
        pcfg.calibrate(),
        seed=getattr(args, "seed", None),
        on_exhausted=args.on_exhausted,
        signing_key=key,
    )


#: Deployment settings a --base/--adapters deployment takes from flags (a run has its own).
DEPLOYMENT_FLAGS = ("sampling_rate", "epsilon", "delta", "query_budget")


def _deployment_flags(args: argparse.Namespace) -> list[str]:
    """The deployment-setting flags given on this command line."""
    return [f"--{f.replace('_', '-')}" for f in DEPLOYMENT_FLAGS if getattr(args, f) is not None]


def _load_lm(args: argparse.Namespace, ledger: str):
    """(deployment config, tokenizer, EnsembleLM, name, default ledger path) of ``--run`` (its
    campaign's deployment) or of ``--base PATH --adapters DIR`` (the flags over the demo's
    settings); every mismatch is an error here, before any ledger exists."""
    from transformers.utils import logging as hf_logging

    from pmixed.models import EnsembleLM

    hf_logging.disable_progress_bar()  # a weight-loading bar per call is noise on a service
    given = _deployment_flags(args)
    if not by_path(args):
        from campaign.run import config_from_run, load_run

        if given:
            raise ValueError(
                f"{', '.join(given)}: a run's deployment settings are its own "
                "(only with --base/--adapters)."
            )
        run = args.run or Path("runs/demo")
        _, tok, model, members = load_run(run)
        pcfg = config_from_run(run).deployment()
        name, folder = run.name, run
    else:
        from campaign.config import FULL
        from pmixed.backend import load_adapters, load_base

        tok, base = load_base(args.base)
        model, members = load_adapters(base, args.adapters)
        flags = {f: getattr(args, f) for f in DEPLOYMENT_FLAGS if getattr(args, f) is not None}
        pcfg = FULL.deployment(**flags, n_members=len(members))
        name, folder = args.base.name, args.adapters
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return pcfg, tok, EnsembleLM(model, members, pad), name, args.ledger or folder / ledger


def cmd_generate(args: argparse.Namespace) -> int:
    """Serve prompts from a trained run through its deployment ledger (created on first use)."""
    from pmixed.deployment import check_prompt, check_sampling
    from pmixed.generator import PrivateGenerator

    pcfg, tok, lm, _, path = _load_lm(args, GENERATE_LEDGER)
    if path.exists() and args.seed is not None:
        raise InvalidRequest(
            "seed", f"is fixed when a deployment is created; {path} exists", args.seed
        )
    prompts = [tok(p)["input_ids"] for p in args.prompt]
    check_sampling(args.temperature, args.top_k, lm.vocab_size)  # before any file is touched
    for p in prompts:
        check_prompt(
            p,
            vocab_size=lm.vocab_size,
            max_positions=lm.max_positions,
            new_tokens=args.max_new_tokens,
            truncate=args.truncate_prompt,
        )
    deployment = _deployment(args, path, pcfg)
    with deployment:
        if deployment.seeded:
            print(
                "audit deployment: its randomness is seeded (reproducible); never serve real "
                "users from it",
                file=sys.stderr,
            )
        outs = PrivateGenerator(lm, deployment).generate(
            prompts,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            truncate=args.truncate_prompt,
        )
        spent = deployment.spent()
    for text, g in zip(args.prompt, outs):
        print(f"{text}{tok.decode(list(g.tokens))}")
        status = "refused: budget exhausted" if g.refused else "ok"
        if g.prompt_truncated:
            status += f"; prompt truncated by {g.prompt_truncated} tokens on the left"
        print(f"  [{g.private_steps} private, {g.public_steps} public-model tokens; {status}]")
    signed = "signed" if deployment.signed else "unsigned"
    print(
        f"ledger {path} ({signed}): epsilon spent {spent.epsilon:.4f} of "
        f"{deployment.filter.budget.epsilon:g} over {spent.steps} tokens"
    )
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
    pcfg, tok, lm, name, path = _load_lm(args, SERVE_LEDGER)
    with _deployment(args, path, pcfg) as deployment:
        gen = PrivateGenerator(lm, deployment, constant_work=not args.sampled_members_only)
        app = create_app(gen, tok, model_name=name, max_batch=args.max_batch)
        print(f"serving {name} on http://{args.host}:{args.port} (ledger {path})", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

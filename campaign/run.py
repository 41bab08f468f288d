"""The campaign behind ``pmixed demo``: data -> tokenizer -> public model -> ensemble ->
fine-tune -> DP-SGD -> evaluation, each stage cached in the run directory under a hash of its configuration.

The run directory's layout is :class:`reports.rundir.RunDir`'s; the evaluation writes three
ledgers: ``ledger.jsonl`` (certified, add_remove: the main deployment), ``ledger-replace_one.jsonl``
and ``ledger-reference.jsonl``, each with its 0600 restricted sibling.

With ``base`` (``pmixed train --base PATH``) the user's model folder replaces ``tokenizer/`` and
``public/``: its tokenizer and weights are the public side, its fingerprint keys the later stages,
and the LoRA targets default to peft's for its architecture.

A stage whose ``stage.json`` carries the same hash is loaded instead of recomputed, so a re-run
resumes. Every artefact is written whole (``accounting.files``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import torch
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from accounting import compose, from_opacus
from audit.canaries import MemberRecipe
from audit.context import AuditPlan
from audit.dpsgd import CanaryPlan, OneRunPlan
from audit.exposure import ExposurePlan
from audit.game import GamePlan
from audit.targets import AuditTarget, Claim
from campaign.audit_stage import run_audit_stage
from campaign.config import CampaignConfig
from pmixed import PMixEDConfig
from pmixed.backend import base_fingerprint, context_length, load_base, save_adapters
from pmixed.data import load_shakespeare, load_user_data, partition_users, split_heldout
from pmixed.deployment import Deployment
from pmixed.evaluate import lm_perplexity, pmixed_perplexity
from pmixed.executor import Job, LocalExecutor, polling
from pmixed.train import (
    LoraSpec,
    TrainSpec,
    blocks,
    build_public_model,
    train_lm,
    train_tokenizer,
)
from pmixed.train_jobs import dpsgd_job, finetune_job, member_job
from reports.report import write_report
from reports.rundir import CONFIG, DPSGD, METRICS, RunDir

__all__ = [
    "LANGUAGE_MODELS",
    "audit_targets",
    "config_from_run",
    "load_run",
    "pmixed_runs",
    "run_demo",
]

Progress = Callable[[str, int], Callable[[int], None]]
#: Bumped when metrics.json changes shape, so a cached evaluation is recomputed.
METRICS_SCHEMA = 2
#: The language models the demo scores and audits beside PMixED: (name, adapter: None for the
#: public base, part in the DP-SGD canary audit).
LANGUAGE_MODELS = (
    ("public", None, None),
    ("finetuned", "finetuned", "control"),
    ("dpsgd", "dpsgd", "dpsgd"),
)


def _stage_key(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _library_versions() -> dict[str, str]:
    return {
        d: version(d)
        for d in (
            "pmixed-audit",
            "torch",
            "transformers",
            "peft",
            "opacus",
            "dp-accounting",
            "numpy",
        )
    }


def _load_adapters(public, folder: Path):
    meta = json.loads((folder / "adapters.json").read_text())
    lora = LoraSpec.from_dict(meta["lora"])
    model = None
    for name in meta["names"]:
        if model is None:
            model = get_peft_model(public, lora.config(public), adapter_name=name)
        else:
            model.add_adapter(name, lora.config(model))
        set_peft_model_state_dict(
            model, load_file(folder / f"{name}.safetensors"), adapter_name=name
        )
    return model.eval()


def _corpus_digest(public, private) -> str:
    h = hashlib.sha256()
    for text in public:
        h.update(text.encode() + b"\x00")
    for r in private:
        h.update(r.user.encode() + b"\x00" + r.text.encode() + b"\x00")
    return h.hexdigest()


def _member_spec(cfg: CampaignConfig) -> TrainSpec:
    """How every ensemble member is trained (the audit retrains one with the same recipe)."""
    return TrainSpec(steps=cfg.member_steps, batch_size=cfg.member_batch, lr=cfg.member_lr)


def _texts(records) -> list[str]:
    return [r.text for r in records]


def run_demo(
    cfg: CampaignConfig,
    out: Path,
    progress: Progress,
    *,
    evaluate: bool = True,
    audit: bool = True,
    executor: object | None = None,
    after_public: Callable[[], None] | None = None,
) -> dict | None:
    """Runs (or resumes) the campaign in ``out``; returns the metrics written to ``metrics.json``.

    ``evaluate=False`` stops after training (``pmixed train``); ``audit=False`` after evaluation;
    otherwise the audit runs and the report (``report.json``/``.md``/``.html``) is written last.
    ``executor`` (:mod:`pmixed.executor`, default local) runs the ensemble stage's training jobs
    and the audit's DP-SGD runs; every progress update lets it check its background jobs.
    ``after_public()`` is called once the public model exists: the demo starts its power stage
    there, so that the public model always trains with this process's full thread count (its
    weights depend on it; the later stages' results do not).
    """
    executor = executor or LocalExecutor()
    progress = polling(progress, executor)
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    if cfg.base is None and (cfg.public_dir is None) != (cfg.private_jsonl is None):
        raise ValueError("--public-dir and --private-jsonl must be given together.")
    if cfg.base is not None and cfg.private_jsonl is None:
        raise ValueError("--base needs --private-jsonl: the records its members are trained on.")
    if cfg.private_jsonl is None:
        corpus = load_shakespeare()
    else:
        corpus = load_user_data(cfg.public_dir, cfg.private_jsonl)
    private = corpus.private[: cfg.max_private_records]
    train_recs, held_recs = split_heldout(private, cfg.heldout_fraction, cfg.salt)
    parts = partition_users(train_recs, cfg.n_members, cfg.salt)
    members = [f"member-{i:02d}" for i in range(cfg.n_members)]
    keys = {
        "data": _stage_key(
            [_corpus_digest(corpus.public, private), cfg.salt, cfg.heldout_fraction, cfg.n_members]
        )
    }

    if cfg.base is None:
        tok, base_dir = _public_stages(cfg, out, corpus, keys, progress)
        t, base_info = cfg.model.block_size, None
        public = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    else:  # the user's base: its fingerprint keys every later stage
        tok, public = load_base(cfg.base)
        base_info = {
            "path": str(Path(cfg.base).resolve()),
            **base_fingerprint(public),
            "context": context_length(public.config, tok),
            "layers": getattr(public.config, "num_hidden_layers", None),
        }
        base_dir, t = Path(cfg.base), min(cfg.model.block_size, base_info["context"])
        keys["tokenizer"] = keys["public"] = _stage_key([base_info["sha256"], len(tok), t])
    if after_public is not None:
        after_public()

    # Ensemble (one adapter per partition), non-private fine-tune, DP-SGD: adapters on one base.
    keys["ensemble"] = _stage_key(
        [
            keys["public"],
            asdict(cfg.lora),
            cfg.member_steps,
            cfg.member_batch,
            cfg.member_lr,
            cfg.finetune_steps,
            cfg.dpsgd_epochs,
            cfg.dpsgd_batch,
            cfg.dpsgd_lr,
            cfg.dpsgd_clip,
            cfg.epsilon,
            cfg.delta,
        ]
    )
    if not run.stage_is_current("ensemble", keys["ensemble"]):
        _train_ensemble(
            cfg,
            out,
            keys["ensemble"],
            base_dir,
            t,
            parts,
            train_recs,
            tok,
            executor,
            progress,
        )
    model = _load_adapters(public, out / "ensemble" / "adapters")
    if cfg.base is not None:
        _export_adapters(model, members, out, keys["ensemble"])
    dp_run = json.loads((run.stage("ensemble") / DPSGD).read_text())
    run.write_json(DPSGD, dp_run)

    config = {
        "demo": cfg.to_dict(),
        "stage_hashes": keys,
        "corpus": corpus.name,
        "base": base_info,
        "block_size": t,
        "users": {
            "train": len({r.user for r in train_recs}),
            "heldout": len({r.user for r in held_recs}),
        },
        "versions": _library_versions(),
    }
    run.write_json(CONFIG, config)
    if not evaluate:
        return None

    # Evaluation through real ledgers and budgets.
    keys["evaluate"] = _stage_key(
        [
            keys["ensemble"],
            cfg.sampling_rate,
            cfg.query_budget,
            cfg.realized_runs,
            cfg.seed,
            METRICS_SCHEMA,
        ]
    )
    if (run / METRICS).exists() and run.read_json(METRICS).get("hash") == keys["evaluate"]:
        metrics = run.read_json(METRICS)
    else:
        metrics = _evaluate(
            cfg, out, model, members, tok, t, held_recs, dp_run, keys["evaluate"], progress
        )
    if audit:
        plan = AuditPlan(
            n_contexts=min(cfg.audit_contexts, cfg.query_budget - 1),  # + the canary context
            seed=cfg.seed,
            configuration_starts=cfg.audit_search_starts,
            canaries=CanaryPlan(
                control_steps=cfg.audit_control_steps,
                one_run=OneRunPlan(
                    m=cfg.audit_canaries,
                    k_pos=cfg.audit_canaries // 20,
                    k_neg=cfg.audit_canaries // 20,
                ),
            ),
            game=GamePlan(queries=min(GamePlan().queries, cfg.query_budget)),
            exposure=ExposurePlan(queries=min(ExposurePlan().queries, cfg.query_budget)),
        )
        recipe = MemberRecipe(cfg.lora, _member_spec(cfg), cfg.seed)
        partitions = [blocks(_texts(p), tok, t) for p in parts]
        dpsgd = dict(
            lora=cfg.lora,
            epsilon=cfg.epsilon,
            delta=cfg.delta,
            batch_size=cfg.dpsgd_batch,
            lr=cfg.dpsgd_lr,
            max_grad_norm=cfg.dpsgd_clip,
            vocab=len(tok),
        )
        run_audit_stage(
            out,
            keys["evaluate"],
            model,
            audit_targets(cfg, members, metrics["privacy"]),
            blocks(_texts(train_recs), tok, t),
            blocks(_texts(held_recs), tok, t),
            plan,
            progress,
            dpsgd,
            tok,
            partitions,
            recipe,
            base=base_dir,
            executor=executor,
        )
        write_report(out)  # the last stage: rebuilt from the files above every time (seconds)
    return metrics


def config_from_run(out: Path) -> CampaignConfig:
    """The config a run directory was made with (from its ``config.json``)."""
    return CampaignConfig.from_dict(RunDir(out).read_json(CONFIG)["demo"])


def load_run(out: Path):
    """(demo config dict, tokenizer, model with every adapter, member names) of a trained run."""
    if not RunDir(out).is_trained:
        raise FileNotFoundError(
            f"{out} is not a trained run: run `pmixed train --out {out}` first."
        )
    config = RunDir(out).read_json(CONFIG)
    cfg = config["demo"]
    if cfg.get("base") is not None:
        tok, public = load_base(cfg["base"])
        if base_fingerprint(public) != {
            k: config["base"][k] for k in ("model_type", "vocab_size", "sha256")
        }:
            raise ValueError(
                f"the base {cfg['base']} has changed since {out} was trained "
                "(its fingerprint differs): retrain or restore it."
            )
    else:
        tok = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
        public = AutoModelForCausalLM.from_pretrained(out / "public").eval()
    model = _load_adapters(public, out / "ensemble" / "adapters")
    return cfg, tok, model, [f"member-{i:02d}" for i in range(cfg["n_members"])]


def pmixed_runs(cfg: CampaignConfig) -> dict[str, tuple[str, PMixEDConfig]]:
    """The three PMixED deployments the demo evaluates and audits: name -> (ledger file, config)."""
    return {
        "pmixed_certified_add_remove": ("ledger.jsonl", cfg.deployment()),
        "pmixed_certified_replace_one": (
            "ledger-replace_one.jsonl",
            cfg.deployment(relation="replace_one"),
        ),
        "pmixed_reference": ("ledger-reference.jsonl", cfg.deployment(mode="reference")),
    }


def audit_targets(cfg: CampaignConfig, members: list[str], privacy: dict) -> list[AuditTarget]:
    """What the demo audits, in order: the three PMixED deployments (the replace-one one also
    through the black-box game: its unit is a user), then the public model, the non-private
    fine-tune (the canary audit's positive control) and DP-SGD, with the claims ``privacy``
    (``metrics.json``) states."""
    targets = [
        AuditTarget(
            name,
            "pmixed",
            tuple(members),
            Claim.from_privacy(privacy[name]),
            calibration=pcfg.calibrate(),
            black_box=pcfg.relation == "replace_one",
        )
        for name, (_, pcfg) in pmixed_runs(cfg).items()
    ]
    for name, adapter, role in LANGUAGE_MODELS:
        targets.append(
            AuditTarget(name, "lm", adapter, Claim.from_privacy(privacy[name]), canaries=role)
        )
    return targets


def _export_adapters(model, members: list[str], out: Path, key: str) -> None:
    """The members as peft folders in ``out/adapters`` (``--base B --adapters DIR``), once per
    ensemble stage. An export from an earlier ensemble is never replaced: deployment ledgers may
    sit beside it, calibrated for those members."""
    folder, marker = out / "adapters", "ensemble-stage.txt"
    if folder.exists():
        if (folder / marker).is_file() and (folder / marker).read_text() == key:
            return
        raise ValueError(
            f"{folder} holds members of an earlier training of this run (and perhaps "
            "their deployment ledgers): move it away to export the new ones."
        )
    save_adapters(model, members, folder, extra={marker: key})


def _public_stages(cfg: CampaignConfig, out: Path, corpus, keys: dict, progress: Progress):
    """(tokenizer, public model folder): the BPE tokenizer and the GPT-2 trained on public text
    only, each a cached stage of ``out``."""
    run = RunDir(out)
    keys["tokenizer"] = _stage_key([keys["data"], cfg.model.vocab_size])
    if not run.stage_is_current("tokenizer", keys["tokenizer"]):
        tmp = run.temp_folder()
        train_tokenizer(corpus.public, cfg.model.vocab_size).save_pretrained(tmp)
        run.commit_stage(tmp, "tokenizer", keys["tokenizer"], _library_versions())
    tok = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    keys["public"] = _stage_key([keys["tokenizer"], asdict(cfg.model), cfg.public_steps, cfg.seed])
    if not run.stage_is_current("public", keys["public"]):
        model = build_public_model(cfg.model, tok, cfg.seed)
        data = blocks(corpus.public, tok, cfg.model.block_size)
        bar = progress("public model", cfg.public_steps)
        train_lm(
            model,
            data,
            TrainSpec(steps=cfg.public_steps),
            torch.Generator().manual_seed(cfg.seed),
            progress=lambda step, _loss: bar(step + 1),
        )
        tmp = run.temp_folder()
        model.save_pretrained(tmp)
        run.commit_stage(tmp, "public", keys["public"], _library_versions())
    return tok, out / "public"


def _train_ensemble(
    cfg: CampaignConfig,
    out: Path,
    key: str,
    base: Path,
    t: int,
    parts,
    train_recs,
    tok,
    executor,
    progress: Progress,
) -> None:
    """Members, the non-private fine-tune and DP-SGD as independent jobs on ``executor``, each
    writing its adapter into the stage folder, then the stage is committed under ``key``. The
    files are the same under any executor: each job seeds itself."""
    tmp = RunDir(out).temp_folder()
    try:
        _ensemble_jobs(cfg, out, key, base, t, parts, train_recs, tok, executor, progress, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed job leaves nothing half-written
        raise


def _ensemble_jobs(cfg, out, key, base, t, parts, train_recs, tok, executor, progress, tmp) -> None:
    lora = cfg.lora
    members = [f"member-{i:02d}" for i in range(cfg.n_members)]
    folder = tmp / "adapters"
    folder.mkdir()
    all_private = blocks(_texts(train_recs), tok, t)
    finetune = TrainSpec(steps=cfg.finetune_steps, batch_size=16, lr=cfg.member_lr)
    dpsgd = dict(
        epsilon=cfg.epsilon,
        delta=cfg.delta,
        epochs=cfg.dpsgd_epochs,
        batch_size=cfg.dpsgd_batch,
        lr=cfg.dpsgd_lr,
        max_grad_norm=cfg.dpsgd_clip,
        seed=cfg.seed + 2,
    )
    # The longest job (DP-SGD) first, so a cluster runs it while the members train beside it.
    jobs = [
        Job(dpsgd_job, (base, "dpsgd", all_private, lora, folder / "dpsgd.safetensors", dpsgd)),
        Job(
            finetune_job,
            (
                base,
                "finetuned",
                all_private,
                lora,
                finetune,
                cfg.seed + 1,
                folder / "finetuned.safetensors",
            ),
        ),
    ]
    jobs += [
        Job(
            member_job,
            (
                base,
                name,
                i,
                blocks(_texts(p), tok, t),
                lora,
                _member_spec(cfg),
                cfg.seed,
                folder / f"{name}.safetensors",
            ),
        )
        for i, (name, p) in enumerate(zip(members, parts))
    ]
    bar = progress(f"ensemble, fine-tune, DP-SGD ({executor.name} executor)", len(jobs))
    dp = executor.map(jobs, progress=bar)[0]
    names = [*members, "finetuned", "dpsgd"]
    (folder / "adapters.json").write_text(json.dumps({"names": names, "lora": asdict(lora)}))
    (tmp / DPSGD).write_text(json.dumps(asdict(dp)))
    RunDir(out).commit_stage(tmp, "ensemble", key, _library_versions())


def _evaluate(cfg, out, model, members, tok, t, held_recs, dp_run, key, progress) -> dict:
    held = blocks(_texts(held_recs), tok, t)
    n = cfg.query_budget  # every model is scored on the same T predictions as PMixED
    ppl = {
        name: lm_perplexity(model, held, adapter, n_predictions=n)
        for name, adapter, _ in LANGUAGE_MODELS
    }
    dp = from_opacus([tuple(h) for h in dp_run["history"]], cfg.delta)
    privacy = {
        "public": {
            "epsilon": 0.0,
            "delta": 0.0,
            "accountant": "none needed: no private data",
            "unit": "n/a",
            "relation": "n/a",
            "certified": True,
            "note": "trained on public text only",
        },
        "finetuned": {
            "epsilon": None,
            "delta": None,
            "accountant": "none",
            "unit": "none",
            "relation": "n/a",
            "certified": False,
            "note": "no privacy: non-private fine-tune",
        },
        "dpsgd": {
            "epsilon": dp.rdp,
            "epsilon_pld": dp.pld,
            "epsilon_opacus": dp.opacus,
            "delta": cfg.delta,
            "accountant": "dp-accounting RDP (Opacus history)",
            "unit": f"one {t}-token training block (record level)",
            "relation": "add_remove",
            "certified": True,
        },
    }
    runs = pmixed_runs(cfg)
    units = {
        "add_remove": "one ensemble member (one partition of users)",
        "replace_one": "one user (its partition's member replaced)",
    }
    work = RunDir(out).temp_folder()
    for i, (name, (fname, pcfg)) in enumerate(runs.items()):
        cal = pcfg.calibrate()
        with Deployment.create(work / fname, cal, seed=cfg.seed + i) as deployment:
            score = pmixed_perplexity(
                model,
                members,
                held,
                deployment,
                n_queries=pcfg.query_budget,
                runs=cfg.realized_runs,
                progress=progress(name, pcfg.query_budget),
            )
        spent = compose(work / fname, pcfg.delta)
        ppl[name] = {
            "exact": score.exact_ppl,
            "realized_mean": score.realized_ppl_mean,
            "realized_sd": score.realized_ppl_sd,
            "queries": score.queries,
        }
        privacy[name] = {
            "epsilon": spent.epsilon,
            "delta": spent.delta,
            "optimal_order": spent.optimal_order,
            "steps": spent.steps,
            "accountant": "dp-accounting RDP (PMixEDAccountant over the ledger)",
            "ledger": fname,
            "unit": units[pcfg.relation],
            "relation": pcfg.relation,
            "certified": spent.certified,
            "status": spent.status,
            "beta": cal.beta,
            "beta_by_size": list(cal.beta_by_size[:6]),
        }
    for f in work.iterdir():
        f.rename(out / f.name)
    work.rmdir()
    note = "perplexities are utility metrics on held-out users' text, outside the guarantee"
    metrics = {"hash": key, "perplexity": ppl, "privacy": privacy, "note": note}
    RunDir(out).write_json(METRICS, metrics)
    return metrics

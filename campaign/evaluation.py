"""The campaign's evaluation stage: perplexities of the language models, and of the three PMixED
deployments answering every prediction through a real ledger and budget.

Each deployment is an independent job (:mod:`pmixed.executor`): it loads the trained run in its
own process, serves its queries through its own seeded ledger and returns its scores, while this
process scores the language models. Most of a deployment's work is NumPy on one core (each
query's λ and released law), so on the ``processes`` executor the three share the cores instead
of queueing on one. The files and numbers are the same under every executor: each deployment
seeds its generator, and the scores do not depend on the torch thread count.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from accounting import compose, from_opacus
from campaign.config import CampaignConfig
from pmixed.deployment import Deployment
from pmixed.evaluate import lm_perplexity, pmixed_perplexity
from pmixed.executor import Job
from pmixed.privacy import Calibration, PMixEDConfig
from pmixed.train import LoraSpec
from reports.rundir import METRICS, RunDir

__all__ = ["LANGUAGE_MODELS", "deployment_job", "evaluate_run", "load_ensemble", "pmixed_runs"]

#: The language models the demo scores and audits beside PMixED: (name, adapter: None for the
#: public base, part in the DP-SGD canary audit).
LANGUAGE_MODELS = (
    ("public", None, None),
    ("finetuned", "finetuned", "control"),
    ("dpsgd", "dpsgd", "dpsgd"),
)
_UNITS = {
    "add_remove": "one ensemble member (one partition of users)",
    "replace_one": "one user (its partition's member replaced)",
}


def load_ensemble(public, folder: Path):
    """``public`` with every adapter of the ensemble stage's ``folder`` (members, fine-tune,
    DP-SGD), in eval mode."""
    meta = json.loads((Path(folder) / "adapters.json").read_text())
    lora = LoraSpec.from_dict(meta["lora"])
    model = None
    for name in meta["names"]:
        if model is None:
            model = get_peft_model(public, lora.config(public), adapter_name=name)
        else:
            model.add_adapter(name, lora.config(model))
        set_peft_model_state_dict(
            model, load_file(Path(folder) / f"{name}.safetensors"), adapter_name=name
        )
    return model.eval()


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


def deployment_job(
    base_dir, adapters, members: list[str], cal: Calibration, seed: int, held, runs: int, path
) -> dict:
    """One deployment's utility: the model loaded from ``base_dir`` and the ensemble folder
    ``adapters``, every prediction on ``held`` one query of a new ledger at ``path`` (calibrated
    by ``cal``, seeded with ``seed``); the :class:`~pmixed.evaluate.PMixEDScore` fields the
    metrics keep."""
    from transformers import AutoModelForCausalLM

    public = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).eval()
    model = load_ensemble(public, adapters)
    with Deployment.create(path, cal, seed=seed) as deployment:
        score = pmixed_perplexity(
            model, members, held, deployment, n_queries=cal.config.query_budget, runs=runs
        )
    return {
        "exact": score.exact_ppl,
        "realized_mean": score.realized_ppl_mean,
        "realized_sd": score.realized_ppl_sd,
        "queries": score.queries,
    }


def _language_privacy(dp_run: dict, cfg: CampaignConfig, t: int) -> dict:
    dp = from_opacus([tuple(h) for h in dp_run["history"]], cfg.delta)
    return {
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


def evaluate_run(
    cfg: CampaignConfig,
    out: Path,
    model,
    members: list[str],
    held,
    t: int,
    dp_run: dict,
    key: str,
    progress: Callable[[str, int], Callable[[int], None]],
    executor,
    base_dir: Path,
) -> dict:
    """Scores every model on the same ``query_budget`` predictions of the held-out blocks
    ``held``, the PMixED deployments as jobs on ``executor`` (their ledgers land in ``out`` only
    once all three are done), and writes ``metrics.json`` (schema keyed by ``key``)."""
    runs = pmixed_runs(cfg)
    cals = {name: pcfg.calibrate() for name, (_, pcfg) in runs.items()}
    work = RunDir(out).temp_folder()
    jobs = [
        Job(
            deployment_job,
            (
                base_dir,
                out / "ensemble" / "adapters",
                members,
                cals[name],
                cfg.seed + i,
                held,
                cfg.realized_runs,
                work / fname,
            ),
        )
        for i, (name, (fname, _)) in enumerate(runs.items())
    ]
    pending = None
    try:
        pending = executor.submit(jobs)
        n = cfg.query_budget  # every model is scored on the same T predictions as PMixED
        ppl = {
            name: lm_perplexity(model, held, adapter, n_predictions=n)
            for name, adapter, _ in LANGUAGE_MODELS
        }
        bar = progress(f"evaluation: {len(jobs)} PMixED deployments ({executor.name})", len(jobs))
        scores = pending.results(progress=bar)
    except BaseException:
        if pending is not None:
            pending.cancel()
        shutil.rmtree(work, ignore_errors=True)  # no ledger of an unfinished evaluation
        raise
    privacy = _language_privacy(dp_run, cfg, t)
    for (name, (fname, pcfg)), score in zip(runs.items(), scores):
        spent, cal = compose(work / fname, pcfg.delta), cals[name]
        ppl[name] = score
        privacy[name] = {
            "epsilon": spent.epsilon,
            "delta": spent.delta,
            "optimal_order": spent.optimal_order,
            "steps": spent.steps,
            "accountant": "dp-accounting RDP (PMixEDAccountant over the ledger)",
            "ledger": fname,
            "unit": _UNITS[pcfg.relation],
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

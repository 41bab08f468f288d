"""Bring your own deployment: a base model folder of one's own (a tiny random Llama here) and a
JSONL of private records; members trained by the campaign from that base, served by path."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace

import pytest

import accounting
from campaign.cli import main
from campaign.run import load_run, run_demo
from pmixed.data import load_shakespeare
from pmixed.train import LoraSpec, train_tokenizer
from tests.pmixed.tiny import save_base
from tests.tiny_demo import TINY, quiet

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    """(base folder, private JSONL, trained BYO run) of a tiny Llama and 600 speeches."""
    root = tmp_path_factory.mktemp("byo")
    corpus = load_shakespeare()
    tok = train_tokenizer([t[:100_000] for t in corpus.public], 320)
    save_base("llama", root / "base", tok, context=96)
    with open(root / "private.jsonl", "w") as f:
        for r in corpus.private[:600]:
            f.write(json.dumps({"user": r.user, "text": r.text}) + "\n")
    cfg = replace(
        TINY,
        base=str(root / "base"),
        private_jsonl=str(root / "private.jsonl"),
        lora=LoraSpec(),
        max_private_records=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        run_demo(cfg, root / "run", quiet, evaluate=False)
    return root / "base", root / "private.jsonl", root / "run"


def test_the_run_trains_members_on_the_users_base(byo):
    run = byo[2]
    config = json.loads((run / "config.json").read_text())
    assert config["base"]["model_type"] == "llama" and config["base"]["context"] == 96
    assert config["block_size"] == TINY.model.block_size  # min(block size, the base's context)
    assert not (run / "tokenizer").exists() and not (run / "public").exists()
    _, _, model, members = load_run(run)
    assert members == [f"member-{i:02d}" for i in range(TINY.n_members)]
    assert sorted(model.peft_config[members[0]].target_modules) == ["q_proj", "v_proj"]
    exported = sorted(p.name for p in (run / "adapters").iterdir())
    assert exported == ["base.json", "ensemble-stage.txt", *members, "members.json"]


def test_generate_from_base_and_adapters_by_path(byo, tmp_path, capsys):
    base, _, run = byo
    ledger = tmp_path / "g.jsonl"
    args = [
        "generate",
        "--base",
        str(base),
        "--adapters",
        str(run / "adapters"),
        "--prompt",
        "To be",
        "--max-new-tokens",
        "4",
        "--ledger",
        str(ledger),
        "--query-budget",
        "8",
    ]
    assert main([*args, "--seed", "1"]) == 0
    assert "4 private, 0 public-model tokens" in capsys.readouterr().out
    contents = accounting.read_ledger(ledger)
    assert contents.n_queries == 4
    assert contents.header["calibration"]["n_members"] == TINY.n_members
    assert contents.header["calibration"]["query_budget"] == 8
    before = ledger.read_bytes()
    assert main([*args, "--epsilon", "3"]) == 2  # the ledger's settings are fixed at creation
    err = capsys.readouterr().err
    assert "--epsilon, --query-budget: fixed when a deployment is created" in err
    assert ledger.read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--base", "{base}"], "--base and --adapters must be given together"),
        (["--base", "{other}", "--adapters", "{adapters}"], "was trained on another base"),
        (["--base", "{base}", "--adapters", "{empty}"], "holds no peft adapter"),
        (["--run", "{run}", "--base", "{base}", "--adapters", "{adapters}"], "not both"),
        (["--run", "{run}", "--epsilon", "2"], "--epsilon: a run's deployment settings"),
        (["--base", "{base}", "--adapters", "{partial}"], "missing ['member-02']"),
    ],
)
def test_a_mismatched_deployment_is_refused_before_any_ledger_exists(
    byo, tmp_path, capsys, extra, message
):
    base, _, run = byo
    tok = train_tokenizer(["another public text entirely, for another base " * 50], 320)
    save_base("llama", tmp_path / "other", tok, context=96)
    (tmp_path / "empty").mkdir()
    shutil.copytree(run / "adapters", tmp_path / "partial")
    shutil.rmtree(tmp_path / "partial" / "member-02")
    paths = dict(
        base=base,
        other=tmp_path / "other",
        adapters=run / "adapters",
        run=run,
        empty=tmp_path / "empty",
        partial=tmp_path / "partial",
    )
    ledger = tmp_path / "never.jsonl"
    argv = [
        "generate",
        *[a.format(**paths) for a in extra],
        "--prompt",
        "To be",
        "--ledger",
        str(ledger),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not ledger.exists()


def test_a_changed_base_is_refused_when_the_run_is_loaded(byo, tmp_path):
    run = byo[2]
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    config = json.loads((moved / "config.json").read_text())
    other = tmp_path / "other"
    save_base("llama", other, train_tokenizer(["something else " * 80], 320), context=96)
    config["demo"]["base"] = str(other)
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has changed since"):
        load_run(moved)


def test_train_flags_for_a_base_are_checked(byo, tmp_path, capsys):
    base, private, _ = byo
    out = tmp_path / "r"
    assert main(["train", "--base", str(base), "--out", str(out)]) == 2
    assert "--base needs --private-jsonl" in capsys.readouterr().err
    assert main(["train", "--lora-targets", "q_proj", "--out", str(out)]) == 2
    assert "--lora-targets needs --base" in capsys.readouterr().err
    bad_targets = [
        "train",
        "--base",
        str(base),
        "--private-jsonl",
        str(private),
        "--lora-targets",
        "nope",
        "--members",
        "2",
        "--quick",
        "--out",
        str(out),
    ]
    assert main(bad_targets) == 2
    assert "--lora-targets nope match no module" in capsys.readouterr().err
    assert not out.exists()  # nothing half-made
    out.mkdir()  # an existing run folder: the failed stage leaves no temporary folder in it
    (out / "notes.txt").write_text("mine")
    assert main(bad_targets) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_audit_and_report_by_base_and_adapters_resolve_the_run_that_trained_them(
    byo, tmp_path, capsys
):
    base, _, run = byo
    # The run is found and checked; this one was only trained, so the report has no metrics yet.
    assert main(["report", "--base", str(base), "--adapters", str(run / "adapters")]) == 2
    assert f"{run / 'metrics.json'} is missing" in capsys.readouterr().err
    shutil.copytree(run / "adapters", tmp_path / "foreign")
    (tmp_path / "foreign" / "ensemble-stage.txt").unlink()
    assert main(["audit", "--base", str(base), "--adapters", str(tmp_path / "foreign")]) == 2
    assert "was not exported by `pmixed train --base`" in capsys.readouterr().err
    save_base("llama", tmp_path / "other", train_tokenizer(["other words " * 80], 320), context=96)
    assert (
        main(["audit", "--base", str(tmp_path / "other"), "--adapters", str(run / "adapters")]) == 2
    )
    assert "is not the base" in capsys.readouterr().err
    # The audit's DP-SGD runs take an executor as training does; its flags are checked first.
    assert main(["audit", "--run", str(run), "--ray-address", "auto"]) == 2
    assert "--ray-address needs --executor ray" in capsys.readouterr().err

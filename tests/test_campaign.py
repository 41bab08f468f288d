"""The campaign behind `pmixed demo`: files, ledgers that verify and recompute, resumable stages."""

from __future__ import annotations

import json
import shutil
import stat
from dataclasses import replace

import pytest

import accounting
from campaign.cli import main
from campaign.run import run_demo
from tests.tiny_demo import TINY
from tests.tiny_demo import quiet as _quiet

#: The demo's six mechanisms: three baselines and three PMixED deployments.
MECHANISMS = {
    "public",
    "finetuned",
    "dpsgd",
    "pmixed_certified_add_remove",
    "pmixed_certified_replace_one",
    "pmixed_reference",
}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def test_run_directory_holds_the_promised_files(run):
    out, metrics = run
    files = (
        "config.json",
        "metrics.json",
        "dpsgd.json",
        "ledger.jsonl",
        "ledger.restricted.jsonl",
        "ledger-replace_one.jsonl",
        "ledger-reference.jsonl",
    )
    for name in files:
        assert (out / name).exists(), name
    assert stat.S_IMODE((out / "ledger.restricted.jsonl").stat().st_mode) == 0o600
    assert set(metrics["perplexity"]) == MECHANISMS
    priv = metrics["privacy"]
    for name in ("dpsgd", "pmixed_certified_add_remove", "pmixed_certified_replace_one"):
        assert priv[name]["epsilon"] <= 8.0 and priv[name]["certified"] is True
        assert priv[name]["delta"] == 1e-5 and priv[name]["accountant"] and priv[name]["unit"]
    assert priv["pmixed_reference"]["certified"] is False
    for info in priv.values():  # one schema for every mechanism
        assert {"epsilon", "delta", "accountant", "unit", "relation", "certified"} <= set(info)
    assert priv["finetuned"]["certified"] is False and priv["public"]["epsilon"] == 0.0
    assert priv["pmixed_certified_replace_one"]["unit"].startswith("one user")
    config = json.loads((out / "config.json").read_text())
    assert config["versions"]["dp-accounting"] and config["stage_hashes"]["ensemble"]


def test_every_ledger_verifies_and_recomputes_the_reported_epsilon(run, capsys):
    out, metrics = run
    for info in metrics["privacy"].values():
        if "ledger" not in info:
            continue
        path = out / info["ledger"]
        assert main(["verify-ledger", str(path), "--restricted"]) == 0
        assert "OK" in capsys.readouterr().out
        assert main(["account", str(path), "--delta", "1e-5", "--json"]) == 0
        spent = json.loads(capsys.readouterr().out)
        assert spent["epsilon"] == pytest.approx(info["epsilon"], rel=1e-12)
        assert spent["steps"] == TINY.query_budget


def test_a_rerun_resumes_from_the_cached_stages(run):
    out, metrics = run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_demo(TINY, out, _quiet)
    assert again == metrics
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for stage in ("tokenizer", "public", "ensemble", "ledger.jsonl"):
        assert before[stage] == after[stage]
    assert accounting.verify(out / "ledger.jsonl").ok


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """A copy of the tiny run that the generate tests may serve from (the shared run stays
    without a deployment ledger)."""
    out = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(tiny_run[0], out)
    return out


def _generate(out, *extra, prompt="To be", tokens="5"):
    return main(
        ["generate", "--run", str(out), "--prompt", prompt, "--max-new-tokens", tokens, *extra]
    )


def test_generate_charges_a_persistent_deployment_ledger(served, capsys):
    out = served
    assert _generate(out, "--seed", "1") == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("To be") and "5 private, 0 public-model tokens" in captured.out
    assert "audit deployment" in captured.err  # a seeded deployment says what it is
    assert _generate(out) == 0  # the same ledger: the budget carries over between calls
    contents = accounting.read_ledger(out / "generate.jsonl")
    assert contents.n_queries == 10 and contents.header["seeded"] is True
    assert main(["generate", "--run", str(out / "nope"), "--prompt", "x"]) == 2
    assert "pmixed train" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "prompt", "message"),
    [
        (["--temperature", "0"], "To be", "--temperature must be in [0.01, 100]. Found 0.0."),
        (["--temperature", "1e-310"], "To be", "--temperature must be in"),
        (["--top-k", "0"], "To be", "--top-k must be an integer in [1, "),
        ([], "", "--prompt must hold at least one token"),
        (["--max-new-tokens", "-1"], "To be", "--max-new-tokens must be an integer in [0, "),
        (["--seed", "3"], "To be", "--seed is fixed when a deployment is created"),
    ],
)
def test_bad_generate_input_names_the_flag_and_spends_nothing(
    served, capsys, extra, prompt, message
):
    out = served
    if not (out / "generate.jsonl").exists():
        assert _generate(out, tokens="1") == 0
    before = {p.name: p.read_bytes() for p in out.glob("generate*.jsonl")}
    capsys.readouterr()
    assert _generate(out, *extra, prompt=prompt) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in out.glob("generate*.jsonl")} == before


def test_an_over_long_prompt_is_refused_or_truncated_on_request(served, capsys, tmp_path):
    ledger = tmp_path / "long.jsonl"
    long = "To be or not to be " * 40  # far beyond the tiny model's 32-token context
    assert _generate(served, "--ledger", str(ledger), prompt=long) == 2
    assert "--prompt must fit the context" in capsys.readouterr().err
    assert not ledger.exists()  # nothing created, nothing charged
    assert _generate(served, "--ledger", str(ledger), "--truncate-prompt", prompt=long) == 0
    assert "prompt truncated by" in capsys.readouterr().out


def test_a_refused_generation_exits_3(served, capsys, tmp_path):
    ledger = tmp_path / "refuse.jsonl"
    args = ("--ledger", str(ledger), "--on-exhausted", "refuse")
    assert _generate(served, *args, tokens="10") == 0  # TINY's query budget is 16
    assert _generate(served, *args, tokens="10") == 3
    assert "refused: budget exhausted" in capsys.readouterr().out
    assert accounting.read_ledger(ledger).n_queries == 16


def test_a_signed_deployment_and_an_overrun_fail_verification(served, capsys, tmp_path):
    from tests.accounting.test_signing import forge_append

    assert main(["keygen", "--out", str(tmp_path / "dep")]) == 0
    ledger = tmp_path / "signed.jsonl"
    args = ("--ledger", str(ledger), "--signing-key", str(tmp_path / "dep.key"))
    assert _generate(served, *args, tokens="16") == 0
    capsys.readouterr()
    pub = str(tmp_path / "dep.pub")
    assert main(["verify-ledger", str(ledger), "--public-key", pub]) == 0
    assert "signed (ed25519 key" in capsys.readouterr().out
    assert _generate(served, "--ledger", str(ledger), tokens="1") == 2  # no key, no append
    assert "signing key" in capsys.readouterr().err
    forge_append(ledger)
    assert main(["verify-ledger", str(ledger), "--public-key", pub]) == 1
    assert "bad signature" in capsys.readouterr().out
    plain = tmp_path / "plain.jsonl"
    assert _generate(served, "--ledger", str(plain), tokens="16") == 0
    forge_append(plain)
    capsys.readouterr()
    assert main(["account", str(plain), "--delta", "1e-5"]) == 1
    assert "OVERRUN" in capsys.readouterr().out
    assert main(["account", str(plain), "--delta", "1e-5", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["overrun"]
    assert main(["verify-ledger", str(plain)]) == 1
    assert "OVERRUN" in capsys.readouterr().out


def test_account_into_a_closed_pipe_exits_quietly(tiny_run):
    import subprocess
    import sys

    ledger = tiny_run[0] / "ledger.jsonl"
    code = (
        "import sys; from campaign.cli import main; "
        f"sys.exit(main(['account', {str(ledger)!r}, '--delta', '1e-5']))"
    )
    proc = subprocess.run(
        f'{sys.executable} -c "{code}" | head -1',
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.startswith("epsilon") and "Traceback" not in proc.stderr
    assert "BrokenPipe" not in proc.stderr


def test_a_failed_run_leaves_no_half_made_folder(tmp_path, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "no-such.jsonl"
    pub = tmp_path / "pub"
    pub.mkdir()
    assert (
        main(
            ["train", "--out", str(out), "--public-dir", str(pub), "--private-jsonl", str(missing)]
        )
        == 2
    )
    assert "--private-jsonl" in capsys.readouterr().err and not out.exists()
    (tmp_path / "p.jsonl").write_text('{"user": "u", "text": "hello there"}\n')
    (pub / "a.txt").write_text("public text " * 50)
    assert (
        main(
            [
                "train",
                "--quick",
                "--out",
                str(out),
                "--public-dir",
                str(pub),
                "--private-jsonl",
                str(tmp_path / "p.jsonl"),
                "--members",
                "4",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--members" in err and not out.exists()
    assert main(["train", "--out", str(out), "--members", "0"]) == 2
    assert "--members must be an integer >= 1" in capsys.readouterr().err and not out.exists()


def test_user_supplied_data_and_a_tampered_stage_is_rebuilt(tmp_path):
    pub = tmp_path / "public"
    pub.mkdir()
    (pub / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 300)
    rows = [
        {"user": f"user{u}", "text": f"User {u} writes about apples and pears, item {i}. " * 3}
        for u in range(24)
        for i in range(6)
    ]
    priv = tmp_path / "private.jsonl"
    priv.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    cfg = replace(TINY, public_dir=str(pub), private_jsonl=str(priv), max_private_records=None)
    metrics = run_demo(cfg, out, _quiet, audit=False)  # the audit is tested on the tiny run
    assert metrics["privacy"]["pmixed_certified_add_remove"]["epsilon"] <= 8.0
    from reports.report import write_report

    report = write_report(out)  # names the user's corpus, not the plays
    assert "plays" not in report["identity"]["public_model"]
    assert str(pub) in report["identity"]["public_model"]
    assert report["identity"]["corpus"] == "user:public+private.jsonl"
    stage = json.loads((out / "public" / "stage.json").read_text())
    assert stage["files"] and stage["versions"]["torch"]
    weights = next((out / "public").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # corrupt the saved public model
    weights.write_bytes(bytes(data))
    before = (out / "tokenizer").stat().st_mtime_ns
    run_demo(cfg, out, _quiet, evaluate=False)
    assert json.loads((out / "public" / "stage.json").read_text())["files"] == stage["files"]
    assert (out / "tokenizer").stat().st_mtime_ns == before  # untouched stages are reused
    with pytest.raises(ValueError, match="together"):
        run_demo(replace(cfg, private_jsonl=None), out, _quiet)


def test_audit_covers_every_mechanism_and_keeps_restricted_values_out(run, capsys):
    out, _ = run
    public_text = (out / "audit.json").read_text()
    result = json.loads(public_text)
    restricted = json.loads((out / "audit.restricted.json").read_text())
    assert stat.S_IMODE((out / "audit.restricted.json").stat().st_mode) == 0o600
    assert set(result["mechanisms"]) == MECHANISMS
    for name in ("pmixed_certified_add_remove", "pmixed_certified_replace_one"):
        m = result["mechanisms"][name]
        pair = m["exact_pair"]
        assert pair["comparable"] and pair["worst_ratio_exact_over_charged"] <= 1.0
        assert 0.0 <= pair["epsilon_pair"] <= m["claim"]["epsilon_ub"] and not m["alarms"]
        assert m["conformance_passed"]
        wc = m["worst_case"]  # (a) query control and (c) the accountant's own worst case
        assert wc["query_control"]["times"] == TINY.query_budget
        assert 0 <= wc["query_control"]["epsilon_pair"] <= m["claim"]["epsilon_ub"]
        assert 0 < wc["optimised_member"]["ratio"] <= 1 and not wc["optimised_member"]["alarm"]
        pz = wc["poisoned_member"]  # (b) the canary partition holds canary records only
        assert pz["contexts"] == pair["contexts"] and not pz["alarm"]
        assert 0 < pz["exact_over_charged"] <= 1 and 0 <= pz["epsilon_pair"] <= 8.0
    assert "query_control_context" in restricted["pmixed_certified_add_remove"]["worst_case"]
    assert result["mechanisms"]["pmixed_reference"]["claim"]["certified"] is False
    game = result["mechanisms"]["pmixed_certified_replace_one"]["game"]
    assert [e["score"] for e in game["empirical"]] == ["count", "llr"]
    assert game["trials_per_world"] == 50 and not game["per_query_alarm"]
    assert 0.0 <= game["risk"]["llr"]["auc"]["value"] <= 1.0 and game["risk"]["llr"]["n0"] == 50
    assert all(0 <= e["epsilon_lb"] <= 8.0 for e in game["empirical"])
    assert 0 <= game["epsilon_pair"] <= 8.0
    m = result["mechanisms"]["pmixed_certified_replace_one"]
    assert m["exact_pair"]["pair"].startswith("canary member vs the member retrained")
    assert result["mechanisms"]["pmixed_certified_add_remove"]["exact_pair"]["pair"] == (
        "canary member dropped"
    )
    expo = m["exposure"]
    assert expo["pmixed"]["trials"] == 30 and expo["references"] == 99
    assert 0 <= expo["pmixed"]["epsilon_lb"] <= 8.0 and "non_private_release" in expo
    methods = [e["method"] for e in m["empirical"]]
    assert methods == ["clopper_pearson", "clopper_pearson", "exposure_rank"]
    controls = {c["id"]: c for c in result["controls"]}
    assert all(controls[c]["passed"] for c in ("C1", "C2", "C3", "C3-exposure"))
    assert result["statement"].startswith("audits give lower")
    # The canary audit ran; on this untrained toy model the positive control is not expected to
    # reach its threshold (the quick and full demos check it), but it is recorded either way.
    assert "C3-lm" in controls and result["controls_passed"] == controls["C3-lm"]["passed"]
    target = result["mechanisms"]["dpsgd"]["empirical"][0]
    assert set(target["attacks"]) == {"reference", "lira"}
    assert target["one_run"]["attack"] in target["attacks"]
    assert target["one_run"]["m"] == TINY.audit_canaries and target["claim"]["epsilon_ub"] <= 8.0
    assert target["one_run"]["epsilon_lb"] <= target["claim"]["epsilon_ub"]
    for name in ("public", "finetuned", "dpsgd"):
        auc = result["mechanisms"][name]["risk"]["loss"]["auc"]
        assert 0.0 <= auc["ci"][0] <= auc["value"] <= auc["ci"][1] <= 1.0
    # Raw per-example scores and the audited member's identity stay in the restricted annex.
    raw = restricted["dpsgd"]["loss"]["in"][:5] + restricted["finetuned"]["reference"]["out"][:5]
    raw += restricted["canaries"]["audit-finetuned"]["lira"][:5]
    assert all(repr(v) not in public_text for v in raw)
    assert "summed_forward" not in public_text and '"member":' not in public_text
    assert "target_p0" not in public_text and restricted["game"]["target_p0"] > 0
    assert restricted["game"]["copies"] >= 1 and len(restricted["exposure"]["secrets"]) == 30
    assert '"secrets"' not in public_text and "canary_member_p_target" not in public_text
    # `pmixed audit --run` reads the cached result back unchanged.
    assert main(["audit", "--run", str(out)]) == 0
    assert "controls: C1 ok, C2 ok, C3 ok, C3-lm" in capsys.readouterr().out
    assert (out / "audit.json").read_text() == public_text

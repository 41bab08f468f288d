"""Bring your own deployment end to end through the command line (slow: `make test-all`): train
members on a base folder of one's own, audit and report the run, then generate and serve from
``--base PATH --adapters DIR``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import accounting

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _pmixed(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "campaign.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=ENV,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_base_and_adapters_train_audit_report_generate_and_serve(tmp_path, kind):
    import httpx

    from pmixed.data import load_shakespeare
    from pmixed.train import train_tokenizer
    from tests.pmixed.tiny import save_base

    corpus = load_shakespeare()
    tok = train_tokenizer([t[:200_000] for t in corpus.public], 1024)
    save_base(kind, tmp_path / "base", tok, context=128)
    with open(tmp_path / "private.jsonl", "w") as f:
        for r in corpus.private[:3000]:
            f.write(json.dumps({"user": r.user, "text": r.text}) + "\n")
    run, base, adapters = tmp_path / "run", tmp_path / "base", tmp_path / "run" / "adapters"
    proc = _pmixed(
        "train",
        "--quick",
        "--base",
        str(base),
        "--private-jsonl",
        str(tmp_path / "private.jsonl"),
        "--members",
        "4",
        "--out",
        str(run),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The deployment's audit: the run that trained --adapters on --base is found and checked.
    proc = _pmixed("audit", "--base", str(base), "--adapters", str(adapters))
    assert proc.returncode == 0, proc.stderr[-2000:]
    audit = json.loads((run / "audit.json").read_text())
    assert audit["controls_passed"]
    assert not [a for a in audit["alarms"] if a["mechanism"] != "pmixed_reference"]
    proc = _pmixed("report", "--base", str(base), "--adapters", str(adapters))
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # a FAIL verdict exits 1; a crash 2
    report = json.loads((run / "report.json").read_text())
    assert f"the base model at {base.resolve()} ({kind}" in report["identity"]["public_model"]
    assert report["identity"]["corpus"] == "user:private.jsonl"
    proc = _pmixed(
        "generate",
        "--base",
        str(base),
        "--adapters",
        str(adapters),
        "--prompt",
        "To be",
        "--max-new-tokens",
        "6",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "6 private, 0 public-model tokens" in proc.stdout
    assert accounting.read_ledger(adapters / "generate.jsonl").n_queries == 6
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "campaign.cli",
            "serve",
            "--base",
            str(base),
            "--adapters",
            str(adapters),
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        r = httpx.post(
            f"{url}/v1/completions", json={"prompt": "Friends", "max_tokens": 3}, timeout=60
        )
        assert r.status_code == 200, r.text
    finally:
        server.terminate()
        server.wait(timeout=30)
    served = accounting.read_ledger(adapters / "serve.jsonl")
    assert served.n_queries == 3 and accounting.verify(adapters / "serve.jsonl").ok

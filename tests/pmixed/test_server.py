"""``pmixed serve``'s HTTP API against a real uvicorn server on a loopback port: concurrent clients
batched into one step loop, every released token charged first, bad input refused for free."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from accounting import read_ledger
from campaign.cli import main
from pmixed import PMixEDConfig
from pmixed.deployment import Deployment
from pmixed.generator import PrivateGenerator
from pmixed.server import create_app, serve_in_thread
from tests.pmixed.tiny import tiny_lm, tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
CFG = PMixEDConfig(
    n_members=3,
    sampling_rate=0.5,
    epsilon=8.0,
    delta=1e-5,
    query_budget=40,
    orders=tuple(range(2, 17)),
)


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def test_concurrent_clients_are_batched_charged_first_and_accounted(tmp_path, tok, capsys):
    lm = tiny_lm(tok)
    deployment = Deployment.create(tmp_path / "serve.jsonl", CFG.calibrate(), on_exhausted="refuse")
    gen = PrivateGenerator(lm, deployment, constant_work=True)
    batches = []
    generate = gen.generate
    gen.generate = lambda prompts, *a, **k: (
        batches.append(len(prompts)) or generate(prompts, *a, **k)
    )
    app = create_app(gen, tok, max_batch=16)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        for bad, field in [
            ({"temperature": 0}, "temperature"),
            ({"top_k": 0}, "top_k"),
            ({"max_tokens": -1}, "max_tokens"),
            ({"prompt": ""}, "prompt"),
            ({"stream": True}, "stream"),
        ]:
            r = client.post("/v1/completions", json={"prompt": "To be", **bad})
            message = r.json()["error"]["message"]
            assert r.status_code == 400 and message.startswith(field) and "\n" not in message
        assert client.get("/v1/budget").json()["queries"] == 0  # nothing charged
        post = lambda i: client.post(  # noqa: E731
            "/v1/completions", json={"prompt": f"Friends {i}", "max_tokens": 2}
        )
        with ThreadPoolExecutor(16) as pool:
            first = list(pool.map(post, range(16)))
        assert [r.status_code for r in first] == [200] * 16
        assert all(r.json()["pmixed"]["private_tokens"] == 2 for r in first)
        assert max(batches) > 1  # concurrent requests shared the step loop
        with ThreadPoolExecutor(16) as pool:
            second = list(pool.map(post, range(16)))  # 8 queries left for 32 tokens
        codes = [r.status_code for r in second]
        assert 429 in codes and set(codes) <= {200, 429}
        budget = client.get("/v1/budget").json()
    released = sum(
        r.json()["pmixed"]["private_tokens"] for r in first + second if r.status_code == 200
    )
    assert released == read_ledger(deployment.ledger.path).n_queries == budget["queries"] == 40
    assert budget["epsilon_remaining"] >= 0 and not budget["overrun"]
    assert main(["verify-ledger", str(deployment.ledger.path), "--restricted"]) == 0
    capsys.readouterr()
    assert main(["account", str(deployment.ledger.path), "--delta", "1e-5", "--json"]) == 0
    account = json.loads(capsys.readouterr().out)
    assert account["epsilon"] == pytest.approx(budget["epsilon_spent"], rel=1e-12)
    deployment.close()

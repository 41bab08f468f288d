"""Load run of ``pmixed serve``'s HTTP API: requests/s and latency percentiles under concurrency.

A uvicorn server on a loopback port serves the benchmark model of ``generate.py`` (``--model``,
``--vocab``, ``--members``, ``--q``; constant work, as ``pmixed serve`` runs it; ledger fsync'ed
per token). ``--clients`` threads each send ``--requests`` completions of ``--max-tokens`` tokens.
The baseline, in the same process on the same server: the same requests sent one at a time. The
ratio of the two throughputs is what batching concurrent requests into one step loop buys.

    .venv/bin/python benchmarks/serve.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from generate import MODELS, build  # benchmarks/generate.py (this folder is on sys.path)

from accounting.files import write_json
from pmixed import PMixEDConfig
from pmixed.deployment import Deployment
from pmixed.generator import PrivateGenerator
from pmixed.server import create_app, serve_in_thread
from pmixed.train import train_tokenizer


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` concurrent clients x ``requests`` completions each: throughput and latency."""

    def client(c: int) -> list[float]:
        out = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for r in range(requests):
                body = {"prompt": f"the quick brown fox {c} {r}", "max_tokens": max_tokens}
                start = time.perf_counter()
                reply = http.post("/v1/completions", json=body)
                out.append(time.perf_counter() - start)
                if reply.status_code != 200:
                    raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:200]}")
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.concatenate(list(pool.map(client, range(clients))))
    wall = time.perf_counter() - start
    n = clients * requests
    return {
        "clients": clients,
        "requests": n,
        "seconds": wall,
        "requests_per_second": n / wall,
        "tokens_per_second": n * max_tokens / wall,
        "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
        "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
    }


def main() -> None:
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--q", type=float, default=0.15)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="per client (default 4)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 200], 300)
    lm = build(args.members, model=args.model, vocab=args.vocab)
    total = 2 * args.clients * args.requests * args.max_tokens
    cfg = PMixEDConfig(
        n_members=args.members, sampling_rate=args.q, epsilon=64.0, delta=1e-5, query_budget=total
    )
    with (
        tempfile.TemporaryDirectory(dir=Path(__file__).parent) as d,
        Deployment.create(Path(d) / "serve.jsonl", cfg.calibrate()) as deployment,
    ):
        gen = PrivateGenerator(lm, deployment, constant_work=True)
        with serve_in_thread(create_app(gen, tok, max_batch=args.clients)) as url:
            together = load(url, args.clients, args.requests, args.max_tokens)
            alone = load(url, 1, args.clients * args.requests, args.max_tokens)
        assert deployment.ledger.contents().n_queries == total
    ratio = together["requests_per_second"] / alone["requests_per_second"]
    print(
        f"pmixed serve, {args.model} model, V={args.vocab}, N={args.members}, q={args.q}, "
        f"{args.max_tokens} tokens per request, {torch.get_num_threads()} torch threads:"
    )
    for name, r in (("concurrent", together), ("one at a time", alone)):
        print(
            f"  {name:<14} {r['clients']:>3} clients  {r['requests']:>4} requests  "
            f"{r['requests_per_second']:6.2f} req/s  {r['tokens_per_second']:7.1f} tok/s  "
            f"p50 {r['p50_ms']:8.0f} ms  p99 {r['p99_ms']:8.0f} ms"
        )
    print(f"  concurrent / one at a time (requests per second) = {ratio:.2f}")
    meta = {
        "python": platform.python_version(),
        "model": args.model,
        "vocab": args.vocab,
        "n_members": args.members,
        "q": args.q,
        "max_tokens": args.max_tokens,
        "torch_threads": torch.get_num_threads(),
        "command": f"python benchmarks/serve.py --model {args.model} --vocab {args.vocab} "
        f"--members {args.members} --q {args.q} --clients {args.clients} "
        f"--requests {args.requests} --max-tokens {args.max_tokens}",
    }
    result = {"meta": meta, "concurrent": together, "one_at_a_time": alone, "ratio": ratio}
    print(f"wrote {write_json(args.out / 'serve.json', result)}")


if __name__ == "__main__":
    main()

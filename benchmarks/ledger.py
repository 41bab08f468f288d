"""Ledger append throughput (per-record fsync, group commit, no fsync) and compose time for 10^5 queries.

All rows run in this process on the same disk; the ratio column compares each append policy with
per-record fsync, the deployment default. Compose includes verifying every line's hash and chain.

    .venv/bin/python benchmarks/ledger.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from accounting import Ledger, compose, verify
from accounting.files import write_json
from pmixed import PMixEDConfig
from pmixed.ledgering import create_ledger, query_event

CONFIG = dict(n_members=80, sampling_rate=0.03, epsilon=8.0, delta=1e-5, query_budget=100_000)


def _ledger(tmp: Path, name: str, fsync: bool) -> tuple[Ledger, object]:
    cal = PMixEDConfig(**CONFIG).calibrate()
    return create_ledger(tmp / f"{name}.jsonl", cal, fsync=fsync), query_event(cal)


def appends(tmp: Path, name: str, n: int, *, fsync: bool, batch: int) -> float:
    """Records per second for ``n`` appends, ``batch`` per transaction."""
    ledger, event = _ledger(tmp, name, fsync)
    start = time.perf_counter()
    for i in range(0, n, batch):
        with ledger.transaction() as tx:
            for _ in range(min(batch, n - i)):
                tx.append(event)
    elapsed = time.perf_counter() - start
    ledger.close()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--queries", type=int, default=100_000, help="ledger size for compose")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(
        dir=args.out.parent if args.out.parent.exists() else None
    ) as d:
        tmp = Path(d)
        base = appends(tmp, "fsync_each", 2000, fsync=True, batch=1)
        for label, n, fsync, batch in [
            ("fsync every record", 2000, True, 1),
            ("group commit of 64, fsync", 20_000, True, 64),
            ("no fsync, one record per write", 20_000, False, 1),
        ]:
            rate = (
                base
                if batch == 1 and fsync
                else appends(tmp, label[:8].replace(" ", "_"), n, fsync=fsync, batch=batch)
            )
            rows.append(
                {"policy": label, "records_per_s": rate, "ratio_vs_fsync_each": rate / base}
            )
        ledger, event = _ledger(tmp, "big", False)
        for i in range(0, args.queries, 1000):
            with ledger.transaction() as tx:
                for _ in range(min(1000, args.queries - i)):
                    tx.append(event)
        ledger.close()
        path = tmp / "big.jsonl"
        size = path.stat().st_size
        t0 = time.perf_counter()
        spent = compose(path, 1e-5)
        t_compose = time.perf_counter() - t0
        t0 = time.perf_counter()
        ok = verify(path).ok
        t_verify = time.perf_counter() - t0
    print(f"{'append policy':<34}{'records/s':>12}{'ratio':>8}")
    for r in rows:
        print(f"{r['policy']:<34}{r['records_per_s']:>12.0f}{r['ratio_vs_fsync_each']:>8.1f}")
    print(
        f"compose {args.queries} queries ({size / 1e6:.1f} MB, verifying every line): "
        f"{t_compose:.2f} s (epsilon {spent.epsilon:.4f})"
    )
    print(f"verify alone {t_verify:.2f} s, ok={ok}")
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": "python benchmarks/ledger.py --out benchmarks/results",
    }
    result = {
        "meta": meta,
        "appends": rows,
        "compose": {
            "queries": args.queries,
            "bytes": size,
            "seconds": t_compose,
            "verify_seconds": t_verify,
            "epsilon": spent.epsilon,
        },
    }
    print(f"wrote {write_json(args.out / 'ledger.json', result)}")


if __name__ == "__main__":
    main()

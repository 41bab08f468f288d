"""Time per query of certified mollification: the certified search, the previous bisection solver
(its test oracle) and the paper code's scalar SciPy bisection.

All run in this process on the same synthetic next-token distributions (Zipf-like public model,
members perturbed in log space), so the ratio columns are what to compare across machines. The
torch thread count is fixed (``--threads``, default 2) and reported.

    .venv/bin/python benchmarks/mechanism.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import bisect

from accounting.files import write_json
from pmixed import PMixEDConfig, mollify_log
from pmixed.divergence import renyi_divergence_log
from pmixed.mollifier_bisection import solve_lambdas_bisection

DEFAULTS = dict(n_members=80, sampling_rate=0.03, epsilon=8.0, delta=1e-5, query_budget=1024)


def distributions(v: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits0 = -1.1 * np.log(rng.permutation(v) + 1.0) + 0.3 * rng.standard_normal(v)
    logits = logits0 + 1.5 * rng.standard_normal((m, v))
    norm = lambda x: x - np.logaddexp.reduce(x, axis=-1, keepdims=True)  # noqa: E731
    return norm(logits), norm(logits0)


def reference_scalar(lp: np.ndarray, lp0: np.ndarray, tau: float, alpha: float = 3.0) -> list:
    """The paper code's per-member loop: SciPy bisect on D^↔_α(p̄_λ, p0) − τ, maxiter 20."""
    out = []
    for row in lp:

        def f(lam, row=row):
            with np.errstate(divide="ignore"):
                lpbar = np.logaddexp(np.log(lam) + row, np.log1p(-lam) + lp0) if lam > 0 else lp0
            d = max(
                renyi_divergence_log(lpbar, lp0, alpha)[0],
                renyi_divergence_log(lp0, lpbar, alpha)[0],
            )
            return d - tau

        if f(1.0) <= 0:
            out.append(1.0)
            continue
        out.append(bisect(f, 0.0, 1.0, maxiter=20, disp=False))
    return out


def timed(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cert = PMixEDConfig(**DEFAULTS).calibrate()
    ref = PMixEDConfig(**DEFAULTS, mode="reference").calibrate()
    rows = []
    for v in (4096, 50257):
        for m in (1, 3, 8):
            lp, lp0 = distributions(v, m, seed=v + m)
            t_cert = timed(
                lambda lp=lp, lp0=lp0: mollify_log(lp, lp0, cert.constraints), args.repeats
            )
            cons, rows0 = cert.constraints(m), np.broadcast_to(lp0, lp.shape)
            t_old = timed(
                lambda lp=lp, r=rows0, c=cons: solve_lambdas_bisection(lp, r, c), args.repeats
            )
            same = np.abs(
                mollify_log(lp, lp0, cert.constraints) - solve_lambdas_bisection(lp, rows0, cons)
            )
            tau = ref.beta_for(m) * 3
            t_ref = timed(
                lambda lp=lp, lp0=lp0, tau=tau: reference_scalar(lp, lp0, tau), args.repeats
            )
            rows.append(
                dict(
                    vocab=v,
                    members=m,
                    certified_s=t_cert,
                    bisection_s=t_old,
                    speedup_vs_bisection=t_old / t_cert,
                    max_lambda_diff=float(same.max()),
                    reference_scipy_s=t_ref,
                    ratio=t_cert / t_ref,
                )
            )
    header = (
        f"{'V':>6} {'m':>2} {'certified (s)':>14} {'bisection (s)':>14} {'speed-up':>9} "
        f"{'max |dλ|':>9} {'reference SciPy (s)':>20} {'ratio':>7}"
    )
    print(f"torch threads: {torch.get_num_threads()}")
    print("certified: 254 constraints (orders 2..128, both directions), certified search")
    print("bisection: the previous solver (test oracle), same constraints, lambda to 1e-12")
    print("reference: one order (3), 20 SciPy halvings per member, as the paper's code")
    print(header)
    for r in rows:
        print(
            f"{r['vocab']:>6} {r['members']:>2} {r['certified_s']:>14.4f} {r['bisection_s']:>14.4f} "
            f"{r['speedup_vs_bisection']:>9.1f} {r['max_lambda_diff']:>9.1e} "
            f"{r['reference_scipy_s']:>20.4f} {r['ratio']:>7.2f}"
        )
    meta = dict(
        python=platform.python_version(),
        machine=platform.machine(),
        repeats=args.repeats,
        torch_threads=torch.get_num_threads(),
    )
    print(f"wrote {write_json(args.out / 'mechanism.json', {'meta': meta, 'rows': rows})}")


if __name__ == "__main__":
    main()

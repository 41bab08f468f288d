"""Controls that run with every audit and check the auditing machinery itself (AUDIT.md §8).

* C1 :func:`identical_worlds`: both worlds are the same mechanism; every rigorous bound must be
  about 0 (it is > 0 with probability at most η).
* C2 :func:`randomized_response`: k-ary randomised response with a known ε behind the same
  interfaces: the exact PLD pair gives ε, the empirical bound approaches it from below.
* C3 :func:`non_private`: a mechanism that releases membership outright; the bound must reach near
  the perfect-attack cap, or the attack and bound cannot see leaks.
* :func:`alarms`: any rigorous lower bound above its upper bound, recorded, never silently.

All draws come from the given generator; a control's result records its seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy import stats

from audit.bounds import BonferroniAll, Bound, Fixed, Split, cp_epsilon, empirical_epsilon
from audit.exact import pair_epsilon

__all__ = ["alarms", "identical_worlds", "non_private", "randomized_response"]


def identical_worlds(
    n: int,
    *,
    delta: float,
    seed: int,
    eta: float = 0.05,
    strategy: Fixed | Split | BonferroniAll | None = None,
) -> dict:
    """C1: n scores per world from the same law; the bound should be 0 (≤ 0.05 passes)."""
    rng = np.random.default_rng(seed)
    s_in, s_out = rng.normal(size=n), rng.normal(size=n)
    bound = empirical_epsilon(
        s_in, s_out, delta=delta, eta=eta, strategy=strategy or BonferroniAll()
    )
    return {
        "id": "C1",
        "name": "identical worlds",
        "expected": "epsilon_lb about 0",
        "epsilon_lb": bound.epsilon,
        "passed": bound.epsilon <= 0.05,
        "seed": seed,
        "bound": bound.to_json(),
    }


def randomized_response(
    epsilon: float,
    n: int,
    *,
    delta: float,
    seed: int,
    k: int = 2,
    eta: float = 0.05,
    repeats: int = 20,
) -> dict:
    """C2: k-ary RR that reports the true bit w.p. e^ε/(e^ε+k−1); n trials per world, ``repeats`` times.

    The exact pair (dp-accounting, optimistic rounding) must give ε to 1e-3 (at δ > 0 it may sit
    slightly below ε). The Clopper–Pearson bound of the fixed rule "guess what RR said" may exceed ε
    in at most a fraction η of repeats; the control fails when the number of exceedances would have
    probability below 1e-3 under Binomial(repeats, η).
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be finite and > 0. Found {epsilon}.")
    if k < 2:
        raise ValueError(f"k must be >= 2. Found {k}.")
    log_true = epsilon - math.log(math.exp(epsilon) + k - 1)
    log_other = -math.log(math.exp(epsilon) + k - 1)
    law_in = np.full(k, log_other)
    law_in[0] = log_true
    law_out = np.full(k, log_other)
    law_out[1] = log_true
    exact = pair_epsilon(law_in[None, :], law_out[None, :], delta)
    rng = np.random.default_rng(seed)
    lbs = []
    for _ in range(repeats):
        k_fn = int((rng.random(n) >= math.exp(log_true)).sum())  # D said "out"
        k_fp = int((rng.random(n) < math.exp(log_other)).sum())  # D' said "in"
        lbs.append(cp_epsilon(k_fp, n, k_fn, n, delta=delta, eta=eta))
    exceed = sum(lb > epsilon for lb in lbs)
    allowed = int(stats.binom.isf(1e-3, repeats, eta))
    return {
        "id": "C2",
        "name": f"{k}-ary randomized response",
        "epsilon": epsilon,
        "epsilon_pair": exact,
        "epsilon_lb_median": float(np.median(lbs)),
        "exceedances": exceed,
        "allowed_exceedances": allowed,
        "repeats": repeats,
        "n": n,
        "seed": seed,
        "passed": abs(exact - epsilon) <= 1e-3 * max(1.0, epsilon) and exceed <= allowed,
    }


def non_private(n: int, *, delta: float, seed: int, eta: float = 0.05) -> dict:
    """C3: the release reveals membership; the CP bound must be near its cap ln(n/3.7)."""
    rng = np.random.default_rng(seed)
    s_in, s_out = 1.0 + rng.random(n), -rng.random(n)
    bound = empirical_epsilon(s_in, s_out, delta=delta, eta=eta, strategy=Fixed(0.5))
    cap = cp_epsilon(0, n, 0, n, delta=delta, eta=eta)
    return {
        "id": "C3",
        "name": "non-private release",
        "epsilon_lb": bound.epsilon,
        "cap": cap,
        "passed": bound.epsilon >= 0.99 * cap,
        "seed": seed,
    }


def alarms(lower: Mapping[str, Bound | float], upper: float, *, tolerance: float = 1e-9) -> list:
    """Every rigorous lower bound above the claimed upper bound (same δ, relation, unit)."""
    out = []
    for name, b in lower.items():
        eps = b.epsilon if isinstance(b, Bound) else float(b)
        if eps > upper * (1 + tolerance):
            out.append(
                {
                    "bound": name,
                    "epsilon_lb": eps,
                    "epsilon_ub": upper,
                    "message": f"{name}: lower bound {eps:.4g} exceeds the claim {upper:.4g}",
                }
            )
    return out

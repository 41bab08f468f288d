"""The three built-in modes (PMIXED_MATH.md §4–§7), each one registration of :mod:`pmixed.modes`.

* ``certified`` (default): β fixed; constraints D_γ ≤ βγ in both directions at every integer γ up to
  2α_max (or the coarse grid), so two mollified members are within 4βk at order k.
* ``capped``: β fixed and λ ≤ λ_max; constraints up to α_max, pair bound βk − log(1 − λ_max).
* ``reference``: the paper code's accounting, UNCERTIFIED: one order α, β_n by subset size from 20
  halvings, constraints at α only, λ from 20 halvings of [0, 1]; kept to compare and to exhibit its
  defects.
"""

from __future__ import annotations

import math

import numpy as np

from pmixed._checks import is_int
from pmixed.amplification import (
    base_rdp_capped,
    base_rdp_certified,
    base_rdp_reference,
    poisson_subsampled_rdp,
    rdp_to_epsilon,
)
from pmixed.modes import register_mode
from pmixed.mollifier import Constraints
from pmixed.privacy import (
    UNCERTIFIED,
    Calibration,
    FixedBetaMode,
    InfeasibleBudget,
    PMixEDConfig,
    coarse_grid,
    compose,
    rule_grid_all,
    rule_lambda_max,
    rule_poisson_sampler,
    rule_tight_needs_acceptance,
)

__all__ = [
    "R2_ALPHA",
    "R2_MEMBER",
    "R2_PUBLIC",
    "R2_SETTINGS",
    "CappedMode",
    "CertifiedMode",
    "ReferenceMode",
]

#: PMIXED_MATH.md R2, the reference mode's public counterexample: one member, three tokens, order
#: 6, q = 0.1; the exact D_6 is about 3.9x the paper code's per-query claim (0.05). The member's
#: and the public model's probabilities (as printed: each sums to 1 to 4 digits), and the settings.
R2_MEMBER = (0.9005, 0.0979, 0.0016)
R2_PUBLIC = (0.1213, 0.8682, 0.0105)
R2_ALPHA = 6
R2_SETTINGS = dict(
    n_members=1,
    sampling_rate=0.1,
    epsilon=6.7617,
    delta=1e-5,
    query_budget=100,
    orders=tuple(range(2, 9)),
)


class CertifiedMode(FixedBetaMode):
    name = "certified"

    def validate(self, config: PMixEDConfig) -> list[str]:
        return [
            *rule_lambda_max(config, required=False),
            *rule_tight_needs_acceptance(config),
            *rule_poisson_sampler(config),
        ]

    def base_rdp(self, config: PMixEDConfig, beta: float, ks: np.ndarray) -> np.ndarray:
        return base_rdp_certified(beta, ks)

    def constraint_set(self, config: PMixEDConfig, beta: float) -> Constraints:
        a_max = max(config.orders)
        if config.constraint_grid == "coarse":
            grid = coarse_grid(2 * a_max)
            gammas = (2.0, *map(float, grid[1:]))
            radii = (2.0 * beta, *(beta * g for g in grid[:-1]))
        else:
            gammas = tuple(float(g) for g in range(2, 2 * a_max + 1))
            radii = tuple(beta * g for g in gammas)
        n = len(gammas)
        return Constraints(gammas * 2, radii * 2, (True,) * n + (False,) * n, 1.0, 100)

    def pair_bound(self, config: PMixEDConfig, beta: float, k: np.ndarray) -> np.ndarray:
        return 4.0 * beta * k


class CappedMode(FixedBetaMode):
    name = "capped"
    floor = "the amplification floor and the lambda_max term"

    def validate(self, config: PMixEDConfig) -> list[str]:
        return [
            *rule_lambda_max(config, required=True),
            *rule_tight_needs_acceptance(config),
            *rule_grid_all(config),
            *rule_poisson_sampler(config),
        ]

    def base_rdp(self, config: PMixEDConfig, beta: float, ks: np.ndarray) -> np.ndarray:
        return base_rdp_capped(beta, float(config.lambda_max), ks)

    def constraint_set(self, config: PMixEDConfig, beta: float) -> Constraints:
        ks = tuple(float(k) for k in range(2, max(config.orders) + 1))
        radii = tuple(beta * k for k in ks)
        n = len(ks)
        return Constraints(
            ks * 2, radii * 2, (True,) * n + (False,) * n, float(config.lambda_max), 100
        )

    def pair_bound(self, config: PMixEDConfig, beta: float, k: np.ndarray) -> np.ndarray:
        return beta * k - math.log1p(-float(config.lambda_max))


class ReferenceMode:
    """The paper code's accounting at one order α = ``reference_alpha``: UNCERTIFIED."""

    name = "reference"
    certified = False
    fixed_beta = False

    def validate(self, config: PMixEDConfig) -> list[str]:
        p = rule_lambda_max(config, required=False) + rule_grid_all(config)
        if not is_int(config.reference_alpha) or config.reference_alpha not in config.orders:
            p.append(
                f"reference_alpha must be one of the orders. Found {config.reference_alpha!r}."
            )
        if config.relation != "add_remove":
            p.append("relation='replace_one' is not available in reference mode.")
        if config.amplification != "general":
            p.append("reference mode always uses the paper code's tight amplification.")
        return p

    def calibrate(self, config: PMixEDConfig) -> Calibration:
        alpha = config.reference_alpha
        eps_rdp = (
            config.epsilon
            - math.log((alpha - 1) / alpha)
            + (math.log(config.delta) + math.log(alpha)) / (alpha - 1)
        )
        if eps_rdp <= 0:
            raise InfeasibleBudget(
                f"reference mode: the RDP budget at alpha={alpha} is {eps_rdp:.4g}."
            )
        r_q = eps_rdp / config.query_budget
        betas = tuple(_reference_beta(config, n, r_q) for n in range(1, config.n_members + 1))
        orders = np.asarray(config.orders)
        claim = np.where(orders <= alpha, r_q, np.inf)
        eps, order = rdp_to_epsilon(
            config.orders, compose(claim, config.query_budget), config.delta
        )
        return Calibration(
            config=config,
            beta=None,
            beta_by_size=betas,
            orders=config.orders,
            per_query_rdp_values=tuple(map(float, claim)),
            per_query_rdp_add_remove_values=tuple(map(float, claim)),
            planned_epsilon=eps,
            planned_order=order,
            status=UNCERTIFIED,
        )

    def constraints(self, calibration: Calibration, n_sampled: int) -> Constraints:
        alpha = float(calibration.config.reference_alpha)
        tau = calibration.beta_for(n_sampled) * alpha
        return Constraints((alpha, alpha), (tau, tau), (True, False), 1.0, 20, start="zero")

    def status(self, config: PMixEDConfig) -> str:
        return UNCERTIFIED

    def event_fields(self, config: PMixEDConfig) -> dict:
        return {
            "amplification": "tight",
            "constraint_grid": "single",
            "reference_alpha": config.reference_alpha,
        }


def _reference_beta(cfg: PMixEDConfig, n: int, r_q: float) -> float:
    """β_n: 20 halvings of [0, 5] on ZW_tight(α; q, ε_ref(·; β, n)) − r_q; the lower end."""
    alpha = cfg.reference_alpha
    ks = np.arange(alpha + 1, dtype=np.float64)
    ks[:2] = 2.0

    def f(beta: float) -> float:
        base = base_rdp_reference(beta, n, ks)
        sub = poisson_subsampled_rdp(base, cfg.sampling_rate, np.array([alpha]), tight=True)[0]
        return sub - r_q

    lo, hi = 0.0, 5.0
    f_lo, f_hi = f(lo), f(hi)
    if f_lo * f_hi > 0:
        raise ArithmeticError(f"reference beta for n={n}: f(0) and f(5) have the same sign.")
    for _ in range(20):
        mid = lo + (hi - lo) / 2.0
        f_mid = f(mid)
        if f_mid * f_lo > 0:
            lo, f_lo = mid, f_mid
        else:
            hi = mid
    return lo


register_mode(CertifiedMode())
register_mode(CappedMode())
register_mode(ReferenceMode())

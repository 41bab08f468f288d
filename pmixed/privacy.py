"""PMixED configuration and calibration: β from (ε, δ, T, q), and the per-query RDP curve charged.

Pure math on public inputs: nothing here sees a model or private data. Calibration runs once, before
deployment (PMIXED_MATH.md §5–§7):

    E(β) = compute_epsilon(K, T · c_β, δ)   # nondecreasing in β
    β    = the largest value with E(β) ≤ ε, by bisection that keeps the feasible end

The per-query curve c_β is the Zhu–Wang Poisson amplification (general bound by default) of the mode's
base bound. ``relation="replace_one"`` calibrates against R_RO(α) ≤ (2α/(2α−1))·R_AR(2α−1) + R_AR(2α)
(Mironov's weak triangle inequality applied to the composed release through E∖{j}); orders above
α_max/2 then cost +∞.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pmixed._checks import check_integer_orders, finite, is_int, is_real
from pmixed.amplification import (
    base_rdp_capped,
    base_rdp_certified,
    base_rdp_reference,
    poisson_subsampled_rdp,
    rdp_budget,
    rdp_to_epsilon,
)
from pmixed.mollifier import Constraints

__all__ = ["Calibration", "InfeasibleBudget", "PMixEDConfig", "coarse_grid"]

MODES = ("certified", "capped", "reference")
RELATIONS = ("add_remove", "replace_one")
DEFAULT_ORDERS = tuple(range(2, 65))
UNCERTIFIED = "UNCERTIFIED"


class InfeasibleBudget(ValueError):
    """No β > 0 meets the requested (ε, δ) over the query budget."""


@dataclass(frozen=True, kw_only=True)
class PMixEDConfig:
    """Public deployment parameters, validated at construction (every problem reported at once).

    Args:
        n_members: N, the number of ensemble members (disjoint partitions), an integer ≥ 1.
        sampling_rate: q, the Poisson inclusion probability of each member, in (0, 1].
        epsilon: target ε of the whole deployment, finite and > 0.
        delta: target δ, in (0, 1).
        query_budget: T, the number of private next-token queries, an integer ≥ 1.
        mode: ``"certified"`` (default), ``"capped"`` or ``"reference"`` (the paper code's
            accounting: UNCERTIFIED, kept for comparison and to exhibit its defects).
        relation: ``"add_remove"`` (one member: the AR certificate) or ``"replace_one"`` (one user,
            N fixed: the user-level claim).
        orders: integer accounting orders ≥ 2, strictly increasing; default 2..64.
        lambda_max: required in capped mode, in (0, 1); must be None otherwise.
        amplification: ``"general"`` (Zhu–Wang Thm 6, default) or ``"tight"`` (conditional; needs
            ``accept_unproven_amplification=True`` outside reference mode).
        constraint_grid: certified mode: ``"all"`` integer orders 2..2α_max (default) or
            ``"coarse"`` (2, 3, 4, 6, 8, 12, …; equally sound, smaller λ, fewer orders).
        reference_alpha: the single order of reference mode, an integer in ``orders``.
        reference_sampler: reference mode: ``"poisson"`` or ``"with_replacement"`` (the paper
            code's Binomial count then draws with replacement; same released-token law).
    """

    n_members: int
    sampling_rate: float
    epsilon: float
    delta: float
    query_budget: int
    mode: str = "certified"
    relation: str = "add_remove"
    orders: tuple[int, ...] = DEFAULT_ORDERS
    lambda_max: float | None = None
    amplification: str = "general"
    accept_unproven_amplification: bool = False
    constraint_grid: str = "all"
    reference_alpha: int = 3
    reference_sampler: str = "poisson"

    def __post_init__(self) -> None:
        problems = _validate(self)
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "orders", check_integer_orders(self.orders))

    @property
    def certified(self) -> bool:
        return self.mode != "reference"

    def calibrate(self) -> Calibration:
        """β and the per-query RDP curve for this configuration (see module docstring).

        Raises:
            InfeasibleBudget: every B(k) ≤ 0, or even β → 0 spends more than ε (the amplification
                floor; in capped mode also the λ_max term).
        """
        budget = rdp_budget(self.epsilon, self.delta, np.asarray(self.orders))
        if (budget <= 0).all():
            raise InfeasibleBudget(
                f"epsilon={self.epsilon}, delta={self.delta}: the RDP budget B(k) is <= 0 at every "
                f"order in {self.orders[0]}..{self.orders[-1]}; no mechanism fits."
            )
        if self.mode == "reference":
            return _calibrate_reference(self)
        return _calibrate_fixed(self)

    def calibration_for_beta(self, beta: float) -> Calibration:
        """A calibration at a given β (certified or capped): audits and tests at arbitrary radii."""
        if self.mode == "reference":
            raise ValueError("calibration_for_beta is for mode 'certified' or 'capped'.")
        if not finite(beta) or beta < 0:
            raise ValueError(f"beta must be finite and >= 0. Found {beta}.")
        return _make_fixed(self, float(beta))


@dataclass(frozen=True)
class Calibration:
    """What the mechanism and the ledger need, computed once from public inputs.

    Attributes:
        config: the configuration it came from.
        beta: the fixed β (certified, capped); None in reference mode.
        beta_by_size: reference mode: β_n for n = 1..N (index n−1); empty otherwise.
        orders: the accounting orders.
        per_query_rdp: the cost charged per query at ``orders`` under ``config.relation``
            (+∞ where the enforced constraints give no bound).
        per_query_rdp_add_remove: the AR (member-level) curve at the same orders.
        planned_epsilon, planned_order: ε and optimal order of ``T · per_query_rdp`` at δ.
        status: "certified", "conditional" (tight amplification) or "UNCERTIFIED".
    """

    config: PMixEDConfig
    beta: float | None
    beta_by_size: tuple[float, ...]
    orders: tuple[int, ...]
    per_query_rdp_values: tuple[float, ...]
    per_query_rdp_add_remove_values: tuple[float, ...]
    planned_epsilon: float
    planned_order: int
    status: str
    _constraints: Constraints | None = field(default=None, repr=False)

    @property
    def per_query_rdp(self) -> np.ndarray:
        return np.asarray(self.per_query_rdp_values, np.float64)

    @property
    def per_query_rdp_add_remove(self) -> np.ndarray:
        return np.asarray(self.per_query_rdp_add_remove_values, np.float64)

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def delta(self) -> float:
        return self.config.delta

    @property
    def certified(self) -> bool:
        return self.status != UNCERTIFIED

    def beta_for(self, n_sampled: int) -> float:
        """β used when ``n_sampled`` members are in the subset (constant outside reference mode)."""
        if self.beta is not None:
            return self.beta
        if not 1 <= n_sampled <= len(self.beta_by_size):
            raise ValueError(
                f"n_sampled must be in [1, {len(self.beta_by_size)}]. Found {n_sampled}."
            )
        return self.beta_by_size[n_sampled - 1]

    def constraints(self, n_sampled: int) -> Constraints:
        """The mollifier's constraint set for a subset of ``n_sampled`` members."""
        if self._constraints is not None:
            return self._constraints
        alpha = float(self.config.reference_alpha)
        tau = self.beta_for(n_sampled) * alpha
        return Constraints((alpha, alpha), (tau, tau), (True, False), 1.0, 20, start="zero")

    def pair_bound(self, k: np.ndarray) -> np.ndarray:
        """B(k): the mode's bound on D_k between two mollified members (certified 4βk, capped βk + L)."""
        k = np.asarray(k, np.float64)
        if self.beta is None:
            raise ValueError("pair_bound is defined for mode 'certified' or 'capped' only.")
        if self.config.mode == "capped":
            return self.beta * k - math.log1p(-float(self.config.lambda_max))
        return 4.0 * self.beta * k

    def add_remove_curve(self, orders: object, *, tight: bool) -> np.ndarray:
        """ε_sub at integer ``orders`` for the AR pair, with the tight or the general Zhu–Wang form."""
        if self.beta is None:
            raise ValueError("add_remove_curve is defined for mode 'certified' or 'capped' only.")
        orders = np.asarray(orders, np.int64)
        if orders.max() > max(self.orders):
            raise ValueError(f"orders must be <= {max(self.orders)}. Found {orders.max()}.")
        cfg = self.config
        amp = "tight" if tight else "general"
        probe = PMixEDConfig(**{**_fields(cfg), "amplification": amp,
                                "accept_unproven_amplification": True})  # fmt: skip
        return _curve_add_remove(probe, self.beta)[orders]

    def total_rdp(self, n_queries: int | None = None) -> np.ndarray:
        """T · per_query_rdp, the exact sum rounded once per order (as ``math.fsum``)."""
        t = self.config.query_budget if n_queries is None else n_queries
        return _compose(self.per_query_rdp, t)


def coarse_grid(top: int) -> tuple[int, ...]:
    """2, 3, 4, 6, 8, 12, 16, … (alternating ×3/2 and ×4/3) up to the first point ≥ ``top``."""
    grid = [2, 3]
    while grid[-1] < top:
        grid.append(grid[-2] * 2)
    return tuple(grid)


# ------------------------------------------------------------------------------------ internals


def _compose(curve: np.ndarray, n_queries: int) -> np.ndarray:
    """n_queries copies of a per-query curve, summed exactly and rounded once per order (+inf
    stays).

    ``math.fsum([c] * n)`` is the correctly rounded exact sum n·c; for an integer n < 2**53 (exact
    in float64) the float product ``c * n`` is that same correctly rounded value, without the
    list of n floats (8 GB at n = 10**9)."""
    if not 0 <= n_queries < 2**53:
        raise ValueError(f"n_queries must be in [0, 2**53). Found {n_queries}.")
    return np.array([float(c) * n_queries if math.isfinite(c) else float(c) for c in curve])


def _fields(cfg: PMixEDConfig) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def _validate(c: PMixEDConfig) -> list[str]:
    p: list[str] = []
    if not is_int(c.n_members) or c.n_members < 1:
        p.append(f"n_members must be an integer >= 1. Found {c.n_members!r}.")
    if not finite(c.sampling_rate) or not 0 < c.sampling_rate <= 1:
        p.append(f"sampling_rate must be in (0, 1]. Found {c.sampling_rate!r}.")
    if not finite(c.epsilon) or c.epsilon <= 0:
        p.append(f"epsilon must be finite and > 0. Found {c.epsilon!r}.")
    if not is_real(c.delta) or not 0 < c.delta < 1:
        p.append(f"delta must be in (0, 1). Found {c.delta!r}.")
    if not is_int(c.query_budget) or c.query_budget < 1:
        p.append(f"query_budget must be an integer >= 1. Found {c.query_budget!r}.")
    if c.mode not in MODES:
        p.append(f"mode must be one of {MODES}. Found {c.mode!r}.")
    if c.relation not in RELATIONS:
        p.append(f"relation must be one of {RELATIONS}. Found {c.relation!r}.")
    try:
        orders = check_integer_orders(c.orders)
    except ValueError as err:
        p.append(str(err))
        orders = DEFAULT_ORDERS
    if c.mode == "capped":
        if c.lambda_max is None or not finite(c.lambda_max) or not 0 < c.lambda_max < 1:
            p.append(f"lambda_max must be in (0, 1) in capped mode. Found {c.lambda_max!r}.")
    elif c.lambda_max is not None:
        p.append(f"lambda_max applies to mode 'capped' only. Found {c.lambda_max!r}.")
    if c.amplification not in ("general", "tight"):
        p.append(f"amplification must be 'general' or 'tight'. Found {c.amplification!r}.")
    elif (
        c.amplification == "tight"
        and c.mode != "reference"
        and c.accept_unproven_amplification is not True
    ):
        p.append(
            "amplification='tight' needs accept_unproven_amplification=True: its condition "
            "is unproven for PMixED (PMIXED_MATH.md §8)."
        )
    if c.constraint_grid not in ("all", "coarse"):
        p.append(f"constraint_grid must be 'all' or 'coarse'. Found {c.constraint_grid!r}.")
    elif c.constraint_grid == "coarse" and c.mode != "certified":
        p.append("constraint_grid='coarse' applies to mode 'certified' only.")
    if c.mode == "reference":
        if not is_int(c.reference_alpha) or c.reference_alpha not in orders:
            p.append(f"reference_alpha must be one of the orders. Found {c.reference_alpha!r}.")
        if c.relation != "add_remove":
            p.append("relation='replace_one' is not available in reference mode.")
        if c.amplification != "general":
            p.append("reference mode always uses the paper code's tight amplification.")
    if c.reference_sampler not in ("poisson", "with_replacement"):
        p.append(
            f"reference_sampler must be 'poisson' or 'with_replacement'. "
            f"Found {c.reference_sampler!r}."
        )
    elif c.reference_sampler == "with_replacement" and c.mode != "reference":
        p.append("reference_sampler='with_replacement' applies to mode 'reference' only.")
    return p


def _constraints_fixed(cfg: PMixEDConfig, beta: float) -> Constraints:
    a_max = max(cfg.orders)
    if cfg.mode == "capped":
        ks = tuple(float(k) for k in range(2, a_max + 1))
        radii = tuple(beta * k for k in ks)
        return Constraints(ks * 2, radii * 2, (True,) * len(ks) + (False,) * len(ks),
                           float(cfg.lambda_max), 100)  # fmt: skip
    if cfg.constraint_grid == "coarse":
        grid = coarse_grid(2 * a_max)
        gammas = (2.0, *map(float, grid[1:]))
        radii = (2.0 * beta, *(beta * g for g in grid[:-1]))
    else:
        gammas = tuple(float(g) for g in range(2, 2 * a_max + 1))
        radii = tuple(beta * g for g in gammas)
    n = len(gammas)
    return Constraints(gammas * 2, radii * 2, (True,) * n + (False,) * n, 1.0, 100)


def _curve_add_remove(cfg: PMixEDConfig, beta: float) -> np.ndarray:
    """The AR per-query curve at integer orders 0..α_max (entries 0, 1 unused)."""
    ks = np.arange(max(cfg.orders) + 1, dtype=np.float64)
    ks[:2] = 2.0
    if cfg.mode == "capped":
        base = base_rdp_capped(beta, float(cfg.lambda_max), ks)
    else:
        base = base_rdp_certified(beta, ks)
    tight = cfg.amplification == "tight"
    all_orders = np.arange(2, max(cfg.orders) + 1)
    curve = np.full(max(cfg.orders) + 1, np.inf)
    curve[2:] = poisson_subsampled_rdp(base, cfg.sampling_rate, all_orders, tight=tight)
    return curve


def _curves(cfg: PMixEDConfig, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(charged curve under cfg.relation, AR curve), both at cfg.orders."""
    ar = _curve_add_remove(cfg, beta)
    orders = np.asarray(cfg.orders)
    ar_at = ar[orders]
    if cfg.relation == "add_remove":
        return ar_at, ar_at
    ro = np.full(orders.shape, np.inf)
    ok = 2 * orders <= max(cfg.orders)
    a = orders[ok]
    ro[ok] = (2 * a / (2 * a - 1)) * ar[2 * a - 1] + ar[2 * a]
    return ro, ar_at


def _epsilon_of(cfg: PMixEDConfig, beta: float) -> float:
    charged, _ = _curves(cfg, beta)
    return rdp_to_epsilon(cfg.orders, cfg.query_budget * charged, cfg.delta)[0]


def _make_fixed(cfg: PMixEDConfig, beta: float) -> Calibration:
    charged, ar = _curves(cfg, beta)
    eps, order = rdp_to_epsilon(cfg.orders, _compose(charged, cfg.query_budget), cfg.delta)
    status = "conditional" if cfg.amplification == "tight" else "certified"
    return Calibration(
        config=cfg,
        beta=beta,
        beta_by_size=(),
        orders=cfg.orders,
        per_query_rdp_values=tuple(map(float, charged)),
        per_query_rdp_add_remove_values=tuple(map(float, ar)),
        planned_epsilon=eps,
        planned_order=order,
        status=status,
        _constraints=_constraints_fixed(cfg, beta),
    )


def _infeasible(cfg: PMixEDConfig, beta: float) -> InfeasibleBudget:
    why = "the Poisson amplification floor" if cfg.mode == "certified" else (
        "the amplification floor and the lambda_max term")  # fmt: skip
    return InfeasibleBudget(
        f"mode={cfg.mode!r}: even beta={beta:.3g} spends epsilon={_epsilon_of(cfg, beta):.4g} > "
        f"{cfg.epsilon} over query_budget={cfg.query_budget} at sampling_rate="
        f"{cfg.sampling_rate} ({why}); lower sampling_rate or query_budget, or raise epsilon."
    )


def _calibrate_fixed(cfg: PMixEDConfig) -> Calibration:
    if _epsilon_of(cfg, 1e-12) > cfg.epsilon:
        raise _infeasible(cfg, 1e-12)
    lo, hi = 0.0, 1.0
    while _epsilon_of(cfg, hi) <= cfg.epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 2.0**20:
            raise InfeasibleBudget("beta calibration did not bracket below 2**20.")
    for _ in range(200):
        if hi - lo <= 1e-12 * hi:
            break
        mid = lo + (hi - lo) / 2.0
        if _epsilon_of(cfg, mid) <= cfg.epsilon:
            lo = mid
        else:
            hi = mid
    else:
        raise ArithmeticError("beta calibration did not converge in 200 bisection steps.")
    # Re-check on the returned side, with fsum over the T queries (PMIXED_MATH.md §5).
    for _ in range(64):
        cal = _make_fixed(cfg, lo)
        b = rdp_budget(cfg.epsilon, cfg.delta, np.array([cal.planned_order]))[0]
        k = cfg.orders.index(cal.planned_order)
        if b <= 0:  # ε ≤ target only through the (0, δ) route of a vanishing charge: no budget
            raise _infeasible(cfg, hi)  # the filter can hold, so the floor is hit above lo
        if cal.planned_epsilon <= cfg.epsilon and cal.total_rdp()[k] <= b:
            return cal
        lo = math.nextafter(lo, 0.0) if lo < 1e-300 else lo * (1 - 1e-12)
    raise ArithmeticError("beta calibration could not re-check the returned beta.")


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


def _calibrate_reference(cfg: PMixEDConfig) -> Calibration:
    alpha = cfg.reference_alpha
    eps_rdp = (
        cfg.epsilon - math.log((alpha - 1) / alpha) + (math.log(cfg.delta) + math.log(alpha))
        / (alpha - 1)
    )  # fmt: skip
    if eps_rdp <= 0:
        raise InfeasibleBudget(f"reference mode: the RDP budget at alpha={alpha} is {eps_rdp:.4g}.")
    r_q = eps_rdp / cfg.query_budget
    betas = tuple(_reference_beta(cfg, n, r_q) for n in range(1, cfg.n_members + 1))
    orders = np.asarray(cfg.orders)
    claim = np.where(orders <= alpha, r_q, np.inf)
    eps, order = rdp_to_epsilon(cfg.orders, _compose(claim, cfg.query_budget), cfg.delta)
    return Calibration(
        config=cfg,
        beta=None,
        beta_by_size=betas,
        orders=cfg.orders,
        per_query_rdp_values=tuple(map(float, claim)),
        per_query_rdp_add_remove_values=tuple(map(float, claim)),
        planned_epsilon=eps,
        planned_order=order,
        status=UNCERTIFIED,
    )

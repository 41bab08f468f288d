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
from pmixed.amplification import poisson_subsampled_rdp, rdp_budget, rdp_to_epsilon
from pmixed.modes import get_mode
from pmixed.mollifier import Constraints

__all__ = [
    "Calibration",
    "FixedBetaMode",
    "InfeasibleBudget",
    "PMixEDConfig",
    "coarse_grid",
    "compose",
]

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
        mode: a registered mode (:mod:`pmixed.modes`): ``"certified"`` (default), ``"capped"`` or
            ``"reference"`` (the paper code's accounting: UNCERTIFIED, kept for comparison and to
            exhibit its defects).
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
        return get_mode(self.mode).certified

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
        return get_mode(self.mode).calibrate(self)

    def calibration_for_beta(self, beta: float) -> Calibration:
        """A calibration at a given β (fixed-β modes): audits and tests at arbitrary radii."""
        mode = get_mode(self.mode)
        if not isinstance(mode, FixedBetaMode):
            raise ValueError(f"calibration_for_beta is for fixed-beta modes. Found {self.mode!r}.")
        if not finite(beta) or beta < 0:
            raise ValueError(f"beta must be finite and >= 0. Found {beta}.")
        return make_fixed(self, mode, float(beta))


@dataclass(frozen=True)
class Calibration:
    """What the mechanism and the ledger need, computed once from public inputs.

    Attributes:
        config: the configuration it came from.
        beta: the fixed β (fixed-β modes: certified, capped); None otherwise.
        beta_by_size: β_n for n = 1..N (index n−1) when β depends on the subset size (reference
            mode); empty otherwise.
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
        """β used when ``n_sampled`` members are in the subset (constant in fixed-β modes)."""
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
        return get_mode(self.mode).constraints(self, n_sampled)

    def _fixed_mode(self, what: str) -> FixedBetaMode:
        mode = get_mode(self.mode)
        if not isinstance(mode, FixedBetaMode) or self.beta is None:
            raise ValueError(f"{what} is defined for fixed-beta modes only. Found {self.mode!r}.")
        return mode

    def pair_bound(self, k: np.ndarray) -> np.ndarray:
        """B(k): the mode's bound on D_k between two mollified members (certified 4βk, capped βk + L)."""
        mode = self._fixed_mode("pair_bound")
        return mode.pair_bound(self.config, self.beta, np.asarray(k, np.float64))

    def add_remove_curve(self, orders: object, *, tight: bool) -> np.ndarray:
        """ε_sub at integer ``orders`` for the AR pair, with the tight or the general Zhu–Wang form."""
        mode = self._fixed_mode("add_remove_curve")
        orders = np.asarray(orders, np.int64)
        if orders.max() > max(self.orders):
            raise ValueError(f"orders must be <= {max(self.orders)}. Found {orders.max()}.")
        cfg = self.config
        amp = "tight" if tight else "general"
        probe = PMixEDConfig(
            **{**_fields(cfg), "amplification": amp, "accept_unproven_amplification": True}
        )
        return _curve_add_remove(probe, mode, self.beta)[orders]

    def total_rdp(self, n_queries: int | None = None) -> np.ndarray:
        """T · per_query_rdp, the exact sum rounded once per order (as ``math.fsum``)."""
        t = self.config.query_budget if n_queries is None else n_queries
        return compose(self.per_query_rdp, t)


def coarse_grid(top: int) -> tuple[int, ...]:
    """2, 3, 4, 6, 8, 12, 16, … (alternating ×3/2 and ×4/3) up to the first point ≥ ``top``."""
    grid = [2, 3]
    while grid[-1] < top:
        grid.append(grid[-2] * 2)
    return tuple(grid)


def compose(curve: np.ndarray, n_queries: int) -> np.ndarray:
    """n_queries copies of a per-query curve, summed exactly and rounded once per order (+inf
    stays).

    ``math.fsum([c] * n)`` is the correctly rounded exact sum n·c; for an integer n < 2**53 (exact
    in float64) the float product ``c * n`` is that same correctly rounded value, without the
    list of n floats (8 GB at n = 10**9)."""
    if not 0 <= n_queries < 2**53:
        raise ValueError(f"n_queries must be in [0, 2**53). Found {n_queries}.")
    return np.array([float(c) * n_queries if math.isfinite(c) else float(c) for c in curve])


class FixedBetaMode:
    """A mode with one β for every subset size, calibrated as the largest β with E(β) ≤ ε.

    A subclass sets ``name`` and supplies :meth:`base_rdp` (the RDP of one mollified member
    against the public model, before amplification), :meth:`constraint_set` and
    :meth:`pair_bound`; it may add rules in :meth:`validate` (the helpers ``rule_*`` below)."""

    name: str
    certified = True
    fixed_beta = True
    #: How the calibration's infeasibility error names what set the floor.
    floor = "the Poisson amplification floor"

    def validate(self, config: PMixEDConfig) -> list[str]:
        """The default rules: no λ cap, tight amplification only if accepted, the full grid,
        Poisson sampling."""
        return [
            *rule_lambda_max(config, required=False),
            *rule_tight_needs_acceptance(config),
            *rule_grid_all(config),
            *rule_poisson_sampler(config),
        ]

    def calibrate(self, config: PMixEDConfig) -> Calibration:
        return calibrate_fixed(config, self)

    def constraints(self, calibration: Calibration, n_sampled: int) -> Constraints:
        return self.constraint_set(calibration.config, calibration.beta)

    def status(self, config: PMixEDConfig) -> str:
        return "conditional" if config.amplification == "tight" else "certified"

    def event_fields(self, config: PMixEDConfig) -> dict:
        return {
            "amplification": config.amplification,
            "constraint_grid": config.constraint_grid,
            "reference_alpha": None,
        }

    def base_rdp(self, config: PMixEDConfig, beta: float, ks: np.ndarray) -> np.ndarray:
        """ε_base(k) at the orders ``ks`` (floats) for this β."""
        raise NotImplementedError

    def constraint_set(self, config: PMixEDConfig, beta: float) -> Constraints:
        raise NotImplementedError

    def pair_bound(self, config: PMixEDConfig, beta: float, k: np.ndarray) -> np.ndarray:
        """B(k): the bound on D_k between two mollified members."""
        raise NotImplementedError


# ------------------------------------------------------------------------------ validation rules


def rule_lambda_max(c: PMixEDConfig, *, required: bool) -> list[str]:
    if required:
        if c.lambda_max is None or not finite(c.lambda_max) or not 0 < c.lambda_max < 1:
            return [f"lambda_max must be in (0, 1) in {c.mode} mode. Found {c.lambda_max!r}."]
    elif c.lambda_max is not None:
        return [f"lambda_max applies to mode 'capped' only. Found {c.lambda_max!r}."]
    return []


def rule_tight_needs_acceptance(c: PMixEDConfig) -> list[str]:
    if c.amplification == "tight" and c.accept_unproven_amplification is not True:
        return [
            "amplification='tight' needs accept_unproven_amplification=True: its condition "
            "is unproven for PMixED (PMIXED_MATH.md §8)."
        ]
    return []


def rule_grid_all(c: PMixEDConfig) -> list[str]:
    if c.constraint_grid == "coarse":
        return ["constraint_grid='coarse' applies to mode 'certified' only."]
    return []


def rule_poisson_sampler(c: PMixEDConfig) -> list[str]:
    if c.reference_sampler == "with_replacement":
        return ["reference_sampler='with_replacement' applies to mode 'reference' only."]
    return []


# ------------------------------------------------------------------------------------ internals


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
    if c.relation not in RELATIONS:
        p.append(f"relation must be one of {RELATIONS}. Found {c.relation!r}.")
    shaky = False  # the mode's rules read these fields: they run once these are well-formed
    try:
        check_integer_orders(c.orders)
    except ValueError as err:
        shaky = True
        p.append(str(err))
    choices = (
        ("amplification", ("general", "tight")),
        ("constraint_grid", ("all", "coarse")),
        ("reference_sampler", ("poisson", "with_replacement")),
    )
    for name, allowed in choices:
        value = getattr(c, name)
        if not isinstance(value, str) or value not in allowed:
            shaky = True
            p.append(f"{name} must be one of {allowed}. Found {value!r}.")
    try:
        mode = get_mode(c.mode)
    except ValueError as err:
        return [*p, str(err)]
    return p if shaky else [*p, *mode.validate(c)]


def _curve_add_remove(cfg: PMixEDConfig, mode: FixedBetaMode, beta: float) -> np.ndarray:
    """The AR per-query curve at integer orders 0..α_max (entries 0, 1 unused)."""
    ks = np.arange(max(cfg.orders) + 1, dtype=np.float64)
    ks[:2] = 2.0
    base = mode.base_rdp(cfg, beta, ks)
    tight = cfg.amplification == "tight"
    all_orders = np.arange(2, max(cfg.orders) + 1)
    curve = np.full(max(cfg.orders) + 1, np.inf)
    curve[2:] = poisson_subsampled_rdp(base, cfg.sampling_rate, all_orders, tight=tight)
    return curve


def _curves(cfg: PMixEDConfig, mode: FixedBetaMode, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(charged curve under cfg.relation, AR curve), both at cfg.orders."""
    ar = _curve_add_remove(cfg, mode, beta)
    orders = np.asarray(cfg.orders)
    ar_at = ar[orders]
    if cfg.relation == "add_remove":
        return ar_at, ar_at
    ro = np.full(orders.shape, np.inf)
    ok = 2 * orders <= max(cfg.orders)
    a = orders[ok]
    ro[ok] = (2 * a / (2 * a - 1)) * ar[2 * a - 1] + ar[2 * a]
    return ro, ar_at


def _epsilon_of(cfg: PMixEDConfig, mode: FixedBetaMode, beta: float) -> float:
    charged, _ = _curves(cfg, mode, beta)
    return rdp_to_epsilon(cfg.orders, cfg.query_budget * charged, cfg.delta)[0]


def make_fixed(cfg: PMixEDConfig, mode: FixedBetaMode, beta: float) -> Calibration:
    """The calibration of a fixed-β mode at ``beta``."""
    charged, ar = _curves(cfg, mode, beta)
    eps, order = rdp_to_epsilon(cfg.orders, compose(charged, cfg.query_budget), cfg.delta)
    return Calibration(
        config=cfg,
        beta=beta,
        beta_by_size=(),
        orders=cfg.orders,
        per_query_rdp_values=tuple(map(float, charged)),
        per_query_rdp_add_remove_values=tuple(map(float, ar)),
        planned_epsilon=eps,
        planned_order=order,
        status=mode.status(cfg),
        _constraints=mode.constraint_set(cfg, beta),
    )


def _infeasible(cfg: PMixEDConfig, mode: FixedBetaMode, beta: float) -> InfeasibleBudget:
    eps = _epsilon_of(cfg, mode, beta)
    return InfeasibleBudget(
        f"mode={cfg.mode!r}: even beta={beta:.3g} spends epsilon={eps:.4g} > "
        f"{cfg.epsilon} over query_budget={cfg.query_budget} at sampling_rate="
        f"{cfg.sampling_rate} ({mode.floor}); lower sampling_rate or query_budget, or raise epsilon."
    )


def calibrate_fixed(cfg: PMixEDConfig, mode: FixedBetaMode) -> Calibration:
    """The largest β with E(β) ≤ ε, by bisection that keeps the feasible end (module docstring)."""
    if _epsilon_of(cfg, mode, 1e-12) > cfg.epsilon:
        raise _infeasible(cfg, mode, 1e-12)
    lo, hi = 0.0, 1.0
    while _epsilon_of(cfg, mode, hi) <= cfg.epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 2.0**20:
            raise InfeasibleBudget("beta calibration did not bracket below 2**20.")
    for _ in range(200):
        if hi - lo <= 1e-12 * hi:
            break
        mid = lo + (hi - lo) / 2.0
        if _epsilon_of(cfg, mode, mid) <= cfg.epsilon:
            lo = mid
        else:
            hi = mid
    else:
        raise ArithmeticError("beta calibration did not converge in 200 bisection steps.")
    # Re-check on the returned side, with fsum over the T queries (PMIXED_MATH.md §5).
    for _ in range(64):
        cal = make_fixed(cfg, mode, lo)
        b = rdp_budget(cfg.epsilon, cfg.delta, np.array([cal.planned_order]))[0]
        k = cfg.orders.index(cal.planned_order)
        if b <= 0:  # ε ≤ target only through the (0, δ) route of a vanishing charge: no budget
            raise _infeasible(cfg, mode, hi)  # the filter can hold, so the floor is hit above lo
        if cal.planned_epsilon <= cfg.epsilon and cal.total_rdp()[k] <= b:
            return cal
        lo = math.nextafter(lo, 0.0) if lo < 1e-300 else lo * (1 - 1e-12)
    raise ArithmeticError("beta calibration could not re-check the returned beta.")

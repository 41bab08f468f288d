"""The RD mollifier: the largest λ such that p̄ = λ·p + (1−λ)·p0 meets a mode's Rényi constraints.

A mode (PMIXED_MATH.md §4–§7) gives constraints c = (order γ, direction, radius r) and a cap
λ_cap ≤ 1; λ is feasible iff λ ≤ λ_cap and, at p̄_λ, D_γ(p̄_λ‖p0) ≤ r (forward) or D_γ(p0‖p̄_λ) ≤ r
(reverse) for every c.

Both h₊(λ) = exp((γ−1)·D_γ(p̄_λ‖p0)) and h₋(λ) are convex in λ with minimum 1 at λ = 0 (joint
convexity of t ↦ t^γ under the perspective), so each constraint's feasible set is an interval
[0, λ*_c] and the answer is min_c λ*_c. The solver uses two consequences of that monotonicity:

* **Feasible start.** On [0, λ_cap], h(λ) ≤ 1 − λ/λ_cap + (λ/λ_cap)·h(λ_cap), so
  λ_cf = λ_cap · min_c expm1((γ−1)·r) / expm1((γ−1)·D_c(λ_cap)) is feasible.
* **Exact pruning.** A constraint that holds at the infeasible end ``hi`` of the bracket holds on all
  of [0, hi], so it can never decide a later midpoint. After each infeasible midpoint only the
  constraints violated there stay active. This is the same bisection as checking every constraint
  at every step, at a fraction of the cost once the binding order is found.

Certified and capped modes close the bracket [feasible lo, infeasible hi] with a safeguarded Illinois
regula falsi to a width of 1e-12 and return ``lo``; reference mode keeps the paper code's 20 fixed
halvings of [0, 1]. Either way the returned λ is the feasible end, never a midpoint, and feasibility
is evaluated on the float64 log-space divergence with no tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pmixed._checks import as_log_distribution
from pmixed.divergence import renyi_divergence_pairs

if TYPE_CHECKING:
    from pmixed.privacy import Calibration

__all__ = ["Constraints", "mix_log", "mollify", "mollify_log", "solve_lambdas"]


@dataclass(frozen=True)
class Constraints:
    """A mode's constraint set: ``forward[c]`` says whether c bounds D_γ(p̄‖p0) or D_γ(p0‖p̄)."""

    orders: tuple[float, ...]
    radii: tuple[float, ...]
    forward: tuple[bool, ...]
    lambda_cap: float
    n_iter: int
    start: str = "feasible"  # "feasible": λ_cf; "zero": the reference code's [0, 1] bracket

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.asarray(self.orders, np.float64),
            np.asarray(self.radii, np.float64),
            np.asarray(self.forward, bool),
        )


def mix_log(logp: np.ndarray, logp0: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """log p̄ = log(λ·p + (1−λ)·p0), exactly log p0 at λ = 0 and exactly log p at λ = 1.

    Shapes: ``logp [..., V]``, ``logp0`` broadcastable, ``lam [...]``.
    """
    lam = np.asarray(lam, np.float64)[..., None]
    with np.errstate(divide="ignore"):
        a = np.log(lam) + logp
        b = np.log1p(-lam) + logp0
    out = np.logaddexp(a, b)
    out = np.where(lam == 0.0, logp0, out)
    return np.where(lam == 1.0, logp, out)


def mollify(p_members: object, p_public: object, calibration: Calibration) -> np.ndarray:
    """One λ per member row for the calibration's mode.

    Args:
        p_members: probabilities ``[..., M, V]``; the M rows are the sampled members (M is the
            realised subset size, which reference mode uses to pick β_M).
        p_public: probabilities ``[..., V]`` of the public model, broadcast over members.
        calibration: from :meth:`pmixed.PMixEDConfig.calibrate`.

    Returns:
        float64 ``[..., M]``: each λ on the feasible side of every constraint, maximal to 1e-12 in
        certified and capped modes (2^-20 of [0, 1] in reference mode, as the paper code).
    """
    lp = as_log_distribution(p_members, "p_members")
    lp0 = as_log_distribution(p_public, "p_public")
    return mollify_log(lp, lp0, calibration)


def mollify_log(logp_members: np.ndarray, logp_public: np.ndarray, calibration: Calibration):
    """:func:`mollify` on normalised log-probabilities (``-inf`` = exact zero); unchecked."""
    lp = np.asarray(logp_members, np.float64)
    if lp.ndim < 2:
        raise ValueError(f"p_members must have shape [..., M, V]. Found shape {lp.shape}.")
    lp0 = np.broadcast_to(np.asarray(logp_public, np.float64)[..., None, :], lp.shape)
    n_sampled = lp.shape[-2]
    constraints = calibration.constraints(n_sampled)
    flat = solve_lambdas(lp.reshape(-1, lp.shape[-1]), lp0.reshape(-1, lp.shape[-1]), constraints)
    return flat.reshape(lp.shape[:-1])


def solve_lambdas(lp: np.ndarray, lp0: np.ndarray, cons: Constraints) -> np.ndarray:
    """Vectorised bisection over rows ``lp [R, V]`` against their own centres ``lp0 [R, V]``."""
    orders, radii, fwd = cons.arrays()
    n_rows = lp.shape[0]
    cap = float(cons.lambda_cap)
    lam_out = np.full(n_rows, cap)
    if n_rows == 0 or orders.size == 0:
        return lam_out
    # supp p ⊄ supp p0: every forward divergence is +inf for λ > 0, so λ* = 0.
    off_support = np.any((lp > -np.inf) & (lp0 == -np.inf), axis=-1) & fwd.any()
    lam_out[off_support] = 0.0
    rows = np.flatnonzero(~off_support)
    if rows.size == 0:
        return lam_out
    state = _Search(lp[rows], lp0[rows], orders, radii, fwd, cap)
    g_cap = state.g_probe_first(np.full(rows.size, cap))
    todo = g_cap > 0
    state.g_cap = g_cap
    if not todo.any():
        return lam_out
    state = state.subset(todo)
    rows = rows[todo]
    if cons.start == "feasible":
        lam_out[rows] = _regula_falsi(state, cap, cons.n_iter)
        return lam_out
    lo, hi = np.zeros(rows.size), np.full(rows.size, cap)
    for _ in range(cons.n_iter):
        mid = lo + (hi - lo) / 2.0
        ok = state.g(mid, np.arange(rows.size)) <= 0
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    lam_out[rows] = lo
    return lam_out


#: Width at which the certified/capped bracket [feasible lo, infeasible hi] is closed.
TOLERANCE = 1e-12


def _regula_falsi(state: _Search, cap: float, max_iter: int) -> np.ndarray:
    """Illinois regula falsi on g(λ) = max_c (γ−1)·(D_c(λ) − r_c), bracketed and safeguarded.

    Keeps g(lo) ≤ 0 < g(hi) and returns ``lo`` once hi − lo ≤ TOLERANCE: the feasible end, maximal
    to 1e-12. Steps that leave the bracket or meet an infinite g fall back to the midpoint; after
    30 steps every step is a midpoint, and not closing within ``max_iter`` (100) raises.
    """
    n = state.lp.shape[0]
    lo = state.feasible_start()
    g_lo = state.g(lo, np.arange(n), shrink=False)
    lo = np.where(g_lo > 0, 0.0, lo)  # the closed form can lose to rounding: restart at 0
    g_lo = np.where(g_lo > 0, state.g(lo, np.arange(n), shrink=False), g_lo)
    hi, g_hi = np.full(n, cap), state.g_cap
    last = np.zeros(n, np.int8)
    for it in range(max_iter):
        r = np.flatnonzero(hi - lo > TOLERANCE)
        if r.size == 0:
            return lo
        w = hi[r] - lo[r]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            x = hi[r] - g_hi[r] * w / (g_hi[r] - g_lo[r])
        mid = ~np.isfinite(x) | (x <= lo[r]) | (x >= hi[r]) | (it >= 30)
        x = np.where(mid, lo[r] + w / 2.0, x)
        x = np.clip(x, lo[r] + TOLERANCE / 2, hi[r] - TOLERANCE / 2)
        g = state.g(x, r)
        feas = g <= 0
        lo[r[feas]], g_lo[r[feas]] = x[feas], g[feas]
        hi[r[~feas]], g_hi[r[~feas]] = x[~feas], g[~feas]
        g_hi[r[feas & (last[r] == -1)]] /= 2.0  # Illinois: the same end moved twice
        g_lo[r[~feas & (last[r] == 1)]] /= 2.0
        last[r] = np.where(feas, -1, 1)
    raise ArithmeticError(f"mollifier: lambda did not converge in {max_iter} steps.")


class _Search:
    """Per-row constraint bookkeeping for the λ search.

    ``active[r, c]`` is False only for constraints proven to hold on [0, hi_r] (they held at some
    infeasible point, or their radius is ≥ D_∞ at the cap). ``probe[r]``, the constraint with the
    smallest closed-form start, is tried alone at the cap, where most rows already fail it.
    """

    def __init__(self, lp, lp0, orders, radii, fwd, cap):
        self.lp, self.lp0, self.orders, self.radii, self.fwd = lp, lp0, orders, radii, fwd
        self.cap = cap
        d_inf = _d_inf(mix_log(lp, lp0, np.full(lp.shape[0], cap)), lp0)  # [R, 2]
        d = np.where(fwd[None, :], d_inf[:, :1], d_inf[:, 1:])  # D_γ ≤ D_∞ at every γ
        self.d_cap_upper = d
        self.active = d > radii[None, :]
        self.probe = np.argmin(np.where(self.active, self._ratios(), np.inf), axis=1)

    def subset(self, keep: np.ndarray) -> _Search:
        out = object.__new__(_Search)
        out.__dict__.update(self.__dict__)
        for name in ("lp", "lp0", "d_cap_upper", "active", "probe", "g_cap"):
            setattr(out, name, getattr(self, name)[keep])
        return out

    def _ratios(self) -> np.ndarray:
        am1 = self.orders - 1.0
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            ratio = np.expm1(am1 * self.radii) / np.expm1(am1 * self.d_cap_upper)
        ratio = np.where(self.active, ratio, np.inf)
        return np.where(np.isnan(ratio), 0.0, ratio)

    def feasible_start(self) -> np.ndarray:
        """λ_cf = cap · min_c expm1((γ−1)r)/expm1((γ−1)D_c(cap)), with D_c(cap) ≤ D_∞(cap)."""
        return self.cap * np.clip(np.min(self._ratios(), axis=1), 0.0, 1.0)

    def g(self, lam: np.ndarray, r: np.ndarray, *, shrink: bool = True) -> np.ndarray:
        """max over active c of (γ−1)·(D_c − r_c) at ``lam`` for rows ``r``; ≤ 0 iff feasible.

        Pairs settled by D_∞ contribute their (non-positive) upper bound. Infeasible rows keep only
        their violated constraints active (the others hold on [0, lam]).
        """
        act = self.active[r]
        d = _divergences(self.lp[r], self.lp0[r], lam, self.orders, self.radii, self.fwd, act)
        phi = np.where(act, _excess(d, self.orders, self.radii), -np.inf)
        g = phi.max(axis=1)
        at_zero = lam == 0.0  # p̄ = p0 exactly: D = 0
        g[at_zero] = np.where(act[at_zero], -(self.orders - 1.0) * self.radii, -np.inf).max(axis=1)
        if shrink:
            bad = g > 0
            self.active[r[bad]] = phi[bad] > 0
        return g

    def g_probe_first(self, lam: np.ndarray, r: np.ndarray | None = None) -> np.ndarray:
        """g at ``lam`` for rows ``r`` (default all), or a positive lower bound where the probe fails.

        The probe is one constraint per row, the one with the smallest closed-form start. A
        violated probe proves infeasibility; only rows where it holds pay for every active
        constraint.
        """
        r = np.arange(lam.shape[0]) if r is None else r
        out = np.full(r.size, -np.inf)
        probe = self.probe[r]
        idx = np.flatnonzero(self.active[r, probe])
        single = np.zeros((idx.size, self.orders.size), bool)
        single[np.arange(idx.size), probe[idx]] = True
        rows = r[idx]
        d = _divergences(self.lp[rows], self.lp0[rows], lam[idx], self.orders, self.radii,
                         self.fwd, single, prune=False)  # fmt: skip
        out[idx] = _excess(d, self.orders, self.radii)[np.arange(idx.size), probe[idx]]
        full = np.flatnonzero(~(out > 0))
        if full.size:
            out[full] = self.g(lam[full], r[full])
        return out


def _excess(d: np.ndarray, orders: np.ndarray, radii: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.nan_to_num((orders - 1.0) * (d - radii), nan=np.inf)


def _d_inf(lpbar: np.ndarray, lp0: np.ndarray) -> np.ndarray:
    """[R, 2]: D_∞(p̄‖p0) and D_∞(p0‖p̄) per row."""
    both = renyi_divergence_pairs(
        np.concatenate([lpbar, lp0]),
        np.concatenate([lp0, lpbar]),
        np.full(2 * lp0.shape[0], np.inf),
    )
    return np.stack([both[: lp0.shape[0]], both[lp0.shape[0] :]], axis=1)


def _divergences(lp, lp0, lam, orders, radii, fwd, active, *, prune=True) -> np.ndarray:
    """D at the (row, constraint) pairs in ``active``; other entries are left at 0.

    With ``prune``, a pair whose radius is at least its direction's D_∞ gets D_∞ instead: an upper
    bound that already settles it (D_γ ≤ D_∞, van Erven & Harremoës 2014, Thm 3); then
    :func:`_staircase` settles more pairs from a few exact evaluations at high orders.
    """
    out = np.zeros(active.shape)
    rows = np.flatnonzero(active.any(axis=1))
    if rows.size == 0:
        return out
    lpbar = np.empty_like(lp)
    lpbar[rows] = mix_log(lp[rows], lp0[rows], lam[rows])
    need = active
    if prune:
        d_inf = np.zeros((lp.shape[0], 2))
        d_inf[rows] = _d_inf(lpbar[rows], lp0[rows])
        upper = np.where(fwd[None, :], d_inf[:, :1], d_inf[:, 1:])
        out[active] = upper[active]
        need = active & (upper > radii[None, :])
        if need.sum() * lp.shape[-1] >= STAIRCASE_MIN_WORK:
            need = _staircase(lpbar, lp0, orders, radii, fwd, need, out)
    pr, pc = np.nonzero(need)
    if pr.size:
        f = fwd[pc][:, None]
        a = np.where(f, lpbar[pr], lp0[pr])
        b = np.where(f, lp0[pr], lpbar[pr])
        out[pr, pc] = renyi_divergence_pairs(a, b, orders[pc])
    return out


#: Below this many (pair × vocabulary) entries one batched evaluation beats the staircase's rounds.
STAIRCASE_MIN_WORK = 200_000


def _staircase(lpbar, lp0, orders, radii, fwd, need, out, rounds: int = 3) -> np.ndarray:
    """Settles constraints from the highest-order one still needed, per row and direction.

    D_γ is nondecreasing in γ (van Erven & Harremoës 2014, Thm 3), so an exact D at order γ' is
    an upper bound of D at every γ ≤ γ' in the same direction: every such constraint whose radius
    is at least that value holds, and gets it as its (upper-bound) entry in ``out``. Each round
    evaluates one pair per row and direction; after ``rounds`` the pairs still needed are returned
    for one batched evaluation. Constraints radii βγ grow with γ while D_γ grows slowly, so a
    few rounds usually settle almost all of them.
    """
    need = need.copy()
    for _ in range(rounds):
        if not need.any():
            break
        pr, pc = [], []
        for direction in (True, False):
            cols = np.flatnonzero(fwd == direction)
            if cols.size == 0:
                continue
            sub = need[:, cols]
            r = np.flatnonzero(sub.any(axis=1))
            top = np.argmax(np.where(sub[r], orders[cols][None, :], -np.inf), axis=1)
            pr.append(r)
            pc.append(cols[top])
        pr, pc = np.concatenate(pr), np.concatenate(pc)
        f = fwd[pc][:, None]
        d = renyi_divergence_pairs(np.where(f, lpbar[pr], lp0[pr]), np.where(f, lp0[pr], lpbar[pr]),
                                   orders[pc])  # fmt: skip
        out[pr, pc] = d
        need[pr, pc] = False
        covered = (
            need[pr]
            & (fwd[None, :] == fwd[pc][:, None])
            & (orders[None, :] <= orders[pc][:, None])
            & (radii[None, :] >= d[:, None])
        )
        i, c = np.nonzero(covered)
        out[pr[i], c] = d[i]
        need[pr[i], c] = False
    return need

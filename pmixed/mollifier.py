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

The bisection keeps feasible(lo) and not feasible(hi) and returns ``lo``: the feasible end, never the
midpoint. Feasibility is evaluated on the float64 log-space divergence with no tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pmixed._checks import as_log_distribution
from pmixed.divergence import renyi_divergence_log

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
        float64 ``[..., M]``: each λ on the feasible side of every constraint, maximal to within the
        solver resolution (2^-n_iter of the bracket: ~1e-15 in certified and capped modes).
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
    off_support = np.any((lp > -np.inf) & (lp0 == -np.inf), axis=-1)
    if fwd.any():
        lam_out[off_support] = 0.0
    rows = np.flatnonzero(~off_support) if fwd.any() else np.arange(n_rows)

    d_cap = _divergences(lp[rows], lp0[rows], np.full(rows.size, cap), orders, fwd, None)
    violated = d_cap > radii  # [r, C]; only these can bind anywhere in [0, cap]
    todo = violated.any(axis=1)
    rows, violated, d_cap = rows[todo], violated[todo], d_cap[todo]
    if rows.size == 0:
        return lam_out

    lo = _feasible_start(d_cap, violated, orders, radii, cap) if cons.start == "feasible" else None
    if lo is None:
        lo = np.zeros(rows.size)
    else:  # re-check the closed form exactly; rounding may push it past the boundary
        bad = (lo > 0) & ~_feasible(lp[rows], lp0[rows], lo, orders, radii, fwd, violated)[0]
        lo[bad] = 0.0
    hi = np.full(rows.size, cap)
    active = violated.copy()
    for _ in range(cons.n_iter):
        mid = lo + (hi - lo) / 2.0
        ok, viol = _feasible(lp[rows], lp0[rows], mid, orders, radii, fwd, active)
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
        active[~ok] = viol[~ok]
    lam_out[rows] = lo
    return lam_out


def _feasible_start(d_cap, violated, orders, radii, cap) -> np.ndarray:
    am1 = orders - 1.0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ratio = np.expm1(am1 * radii) / np.expm1(am1 * d_cap)  # +inf divergence -> 0
    ratio = np.where(violated, ratio, np.inf)
    ratio = np.where(np.isnan(ratio), 0.0, ratio)
    return cap * np.clip(np.min(ratio, axis=1), 0.0, 1.0)


def _feasible(lp, lp0, lam, orders, radii, fwd, active):
    """(feasible [r], violated [r, C]) at λ for the active constraints only."""
    d = _divergences(lp, lp0, lam, orders, fwd, active)
    viol = (d > radii) & active
    ok = ~viol.any(axis=1) | (lam == 0.0)  # λ = 0 releases p0 exactly: D = 0 by definition
    return ok, viol


def _divergences(lp, lp0, lam, orders, fwd, active) -> np.ndarray:
    """D at every (row, constraint); columns outside ``active`` (when given) are left at 0."""
    out = np.zeros((lp.shape[0], orders.size))
    cols = np.arange(orders.size) if active is None else np.flatnonzero(active.any(axis=0))
    rows = np.arange(lp.shape[0]) if active is None else np.flatnonzero(active.any(axis=1))
    if cols.size == 0 or rows.size == 0:
        return out
    lpbar = mix_log(lp[rows], lp0[rows], lam[rows])
    for direction in (True, False):
        c = cols[fwd[cols] == direction]
        if c.size == 0:
            continue
        uniq, inv = np.unique(orders[c], return_inverse=True)
        if direction:
            d = renyi_divergence_log(lpbar, lp0[rows], uniq)
        else:
            d = renyi_divergence_log(lp0[rows], lpbar, uniq)
        out[np.ix_(rows, c)] = d[:, inv]
    return out

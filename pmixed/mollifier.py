"""The RD mollifier: the largest λ such that p̄ = λ·p + (1−λ)·p0 meets a mode's Rényi constraints.

A mode (PMIXED_MATH.md §4–§7) gives constraints c = (order γ, direction, radius r) and a cap
λ_cap ≤ 1; λ is feasible iff λ ≤ λ_cap and, at p̄_λ, D_γ(p̄_λ‖p0) ≤ r (forward) or D_γ(p0‖p̄)
≤ r (reverse) for every c. Each constraint's feasible set is an interval [0, λ*_c] (h(λ) =
exp((γ−1)·D) is convex with minimum 1 at λ = 0), and the answer is min_c λ*_c.

**One function bounds every constraint.** With s = log(p̄_λ/p0) and the cumulant function
F(θ) = log Σ_v p0(v)·e^{θ·s(v)}, forward D_γ = F(γ)/(γ−1) and reverse D_γ = F(1−γ)/(γ−1), so c
holds iff F(θ_c) ≤ B_c = (γ−1)·r with θ_c = γ or 1−γ. F is convex, F(0) = F(1) = 0 and
min s ≤ F′ ≤ max s (F′ is a tilted mean of s). A few exact values of F therefore bound it at every
order: the chord between two evaluated points, and slope max s (min s) beyond the last (first).

**Search** (certified and capped modes), per row and independent of the other rows:

1. *Guess* the binding constraint and its λ on a summary of the row: the vocabulary's 16 largest
   log ratios t = log(p/p0) kept exact, the others pooled into 64 equal-width bins of t (p0 mass
   and p0-weighted mean of p/p0 − 1 per bin), which is exact in the first moment. Damped Newton
   steps on that summary, for every 4th order of each direction at once and then for the 7
   orders around the best, give those constraints' λ; the smallest names the target. The summary
   only steers the search.
2. Bracketed Newton on the target's F_λ(θ*) = B·(1 − 2ρ) from the guess (secant or midpoint when
   a Newton step leaves the bracket), closed when the bracket is 1e-12 wide or a feasible
   iterate's Newton step is below 1e-13.
3. *Certify* the result: evaluate F where the bound does not settle a constraint (the order with
   the largest bound excess on each side, two per round) until every constraint is settled or one
   is violated; a violated one becomes the next target, searched between 0 and the result.

The returned λ is certified with a relative margin: F(θ_c) ≤ B_c − max(ρ·B_c, 1e-14) for every c
(ρ = 1e-11), so rounding in F cannot turn it into an overshoot, and it is within about ρ·λ of the
exact maximum (the previous bisection solver, :mod:`pmixed.mollifier_bisection`, is the test
oracle). Work is torch float64, so the same code runs on CUDA. Reference mode keeps the paper
code's 20 halvings of [0, 1] on its two constraints (:mod:`pmixed.mollifier_reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pmixed._checks import as_log_distribution
from pmixed.mollifier_reference import reference_lambdas

__all__ = [
    "Constraints",
    "mix_log",
    "mollify",
    "mollify_log",
    "solve_lambdas",
    "solve_lambdas_sizes",
]

#: Relative margin below every constraint bound at the returned λ, and its absolute floor.
MARGIN, MARGIN_FLOOR = 1e-11, 1e-14
#: A target bracket this wide is closed; a feasible iterate whose Newton step is shorter stops.
TOLERANCE, NEWTON_STOP = 1e-12, 1e-13
TINY = 1e-300
#: Up to this many (constraint × vocabulary) entries a certificate evaluates every constraint.
DENSE_WORK = 2**16
#: The guess's row summary: this many largest log ratios kept exact, the rest in this many bins.
SUMMARY_TOP, SUMMARY_BINS, SUMMARY_STEPS = 16, 64, 4
#: The guess first tries every GUESS_STRIDE-th order of a direction, then the orders around the best.
GUESS_STRIDE = 4
#: The guess is raised by this factor so that Newton usually starts just above the answer.
GUESS_BIAS = 1.0 + 1e-3


@dataclass(frozen=True)
class Constraints:
    """A mode's constraint set: ``forward[c]`` says whether c bounds D_γ(p̄‖p0) or D_γ(p0‖p̄)."""

    orders: tuple[float, ...]
    radii: tuple[float, ...]
    forward: tuple[bool, ...]
    lambda_cap: float
    n_iter: int
    start: str = "feasible"  # "feasible": the certified search; "zero": the paper code's halvings

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.asarray(self.orders, np.float64),
            np.asarray(self.radii, np.float64),
            np.asarray(self.forward, bool),
        )


#: What the mollifier takes: a constraint set, or a function of the subset size giving one.
ConstraintSource = Constraints | Callable[[int], Constraints]


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


def mollify(p_members: object, p_public: object, constraints: ConstraintSource) -> np.ndarray:
    """One λ per member row under a mode's constraint set.

    Args:
        p_members: probabilities ``[..., M, V]``; the M rows are the sampled members (M is the
            realised subset size, which reference mode uses to pick β_M).
        p_public: probabilities ``[..., V]`` of the public model, broadcast over members.
        constraints: a :class:`Constraints`, or a function of the subset size M giving one
            (a calibration's ``constraints`` method).

    Returns:
        float64 ``[..., M]``: each λ certified feasible for every constraint with a relative margin
        of 1e-11 and maximal to about 1e-11 in certified and capped modes (2^-20 of [0, 1] in
        reference mode, as the paper code).
    """
    lp = as_log_distribution(p_members, "p_members")
    lp0 = as_log_distribution(p_public, "p_public")
    return mollify_log(lp, lp0, constraints)


def mollify_log(logp_members: np.ndarray, logp_public: np.ndarray, constraints: ConstraintSource):
    """:func:`mollify` on normalised log-probabilities (``-inf`` = exact zero); unchecked."""
    lp = np.asarray(logp_members, np.float64)
    if lp.ndim < 2:
        raise ValueError(f"p_members must have shape [..., M, V]. Found shape {lp.shape}.")
    lp0 = np.broadcast_to(np.asarray(logp_public, np.float64)[..., None, :], lp.shape)
    cons = constraints if isinstance(constraints, Constraints) else constraints(lp.shape[-2])
    flat = solve_lambdas(lp.reshape(-1, lp.shape[-1]), lp0.reshape(-1, lp.shape[-1]), cons)
    return flat.reshape(lp.shape[:-1])


def solve_lambdas(lp: object, lp0: object, cons: Constraints, *, device: str = "cpu") -> np.ndarray:
    """λ for rows ``lp [R, V]`` against their own centres ``lp0 [R, V]`` (float64 log space).

    ``device="cuda"`` runs the certified search on a GPU; the answer is a NumPy array.
    """
    lp, lp0 = np.asarray(lp, np.float64), np.asarray(lp0, np.float64)
    orders, radii, fwd = cons.arrays()
    lam = np.full(lp.shape[0], float(cons.lambda_cap))
    if lp.shape[0] == 0 or orders.size == 0:
        return lam
    off = _outside_support(lp, lp0, fwd)
    lam[off] = 0.0
    rows = np.flatnonzero(~off)
    if rows.size == 0:
        return lam
    if cons.start == "zero":
        lam[rows] = reference_lambdas(
            lp[rows], lp0[rows], orders, radii[None], fwd, cons.n_iter, cons.lambda_cap
        )[0]
        return lam
    as_t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    summary = tuple(map(as_t, _summary(lp[rows], lp0[rows])))
    search = _Search(
        as_t(lp[rows]), as_t(lp0[rows]), *map(as_t, (orders, radii, fwd)), cons, summary
    )
    with torch.inference_mode():
        lam[rows] = search.run().cpu().numpy()
    return lam


def _outside_support(lp: np.ndarray, lp0: np.ndarray, fwd: np.ndarray) -> np.ndarray:
    """Rows with supp p ⊄ supp p0: every forward divergence is +inf for λ > 0, so λ* = 0."""
    return np.any((lp > -np.inf) & (lp0 == -np.inf), axis=-1) & fwd.any()


def solve_lambdas_sizes(lp: object, lp0: object, sets: list[Constraints]) -> np.ndarray:
    """:func:`solve_lambdas` of rows ``lp, lp0 [R, V]`` for every constraint set: ``[S, R]``.

    Reference mode's sets differ only in their radii: they are solved together
    (:func:`pmixed.mollifier_reference.reference_lambdas`); other sets one after another.
    """
    lp, lp0 = np.asarray(lp, np.float64), np.asarray(lp0, np.float64)
    shared = {(c.orders, c.forward, c.lambda_cap, c.n_iter, c.start) for c in sets}
    if len(shared) != 1 or sets[0].start != "zero" or lp.shape[0] == 0:
        return np.stack([solve_lambdas(lp, lp0, c) for c in sets])
    cons = sets[0]
    orders, _, fwd = cons.arrays()
    lam = np.full((len(sets), lp.shape[0]), float(cons.lambda_cap))
    off = _outside_support(lp, lp0, fwd)
    lam[:, off] = 0.0
    rows = np.flatnonzero(~off)
    if rows.size:
        radii = np.stack([c.arrays()[1] for c in sets])
        lam[:, rows] = reference_lambdas(
            lp[rows], lp0[rows], orders, radii, fwd, cons.n_iter, cons.lambda_cap
        )
    return lam


def _summary(lp: np.ndarray, lp0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: log p0-mass and mean of u = p/p0 − 1 over the guess's pools (module docstring).

    NumPy on purpose: ``bincount`` sums in a fixed order, so a row's summary, and with it the
    search path and the returned λ, never depends on the device or on the other rows.
    """
    n, v = lp.shape
    with np.errstate(invalid="ignore"):
        t = np.where(lp0 > -np.inf, lp - lp0, 0.0)
    t = np.maximum(t, -750.0)  # p = 0 (t = −inf) pools with the finite t where e^t underflows
    p0 = np.exp(lp0)
    k, width = min(SUMMARY_TOP, v), SUMMARY_BINS + min(SUMMARY_TOP, v)
    top = np.argpartition(-t, k - 1, axis=-1)[:, :k]
    t_lo = t.min(axis=-1, keepdims=True)
    t_hi = np.take_along_axis(t, top, axis=-1).min(axis=-1, keepdims=True)
    scale = (SUMMARY_BINS - 1) / np.maximum(t_hi - t_lo, 1e-300)
    pool = np.clip((t - t_lo) * scale, 0, SUMMARY_BINS - 1).astype(np.int64)
    np.put_along_axis(pool, top, SUMMARY_BINS + np.arange(k), axis=-1)
    flat = (pool + width * np.arange(n)[:, None]).ravel()
    mass = np.bincount(flat, p0.ravel(), n * width).reshape(n, width)
    excess = np.where(lp0 > -np.inf, np.exp(lp) - p0, 0.0)  # p0·(p/p0 − 1) on supp p0
    mean = np.bincount(flat, excess.ravel(), n * width).reshape(n, width)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(mass), np.where(mass > 0, mean / mass, 0.0)


class _Search:
    """The certified search of the module docstring, vectorised over rows that each run alone."""

    def __init__(self, lp, lp0, orders, radii, fwd, cons: Constraints, summary):
        self.lp0 = lp0
        # t = log(p/p0) on supp p0; entries off supp p0 are inert (s = 0 and weight p0 = 0).
        self.t = torch.where(lp0 > -torch.inf, lp - lp0, torch.zeros_like(lp))
        self.huge = self.t > 700.0
        self.any_huge = bool(self.huge.any())
        self.um1 = torch.expm1(torch.clamp(self.t, max=700.0))  # p/p0 − 1
        self.chi2 = (torch.exp(lp0) * self.um1**2).sum(dim=-1)  # χ²(p‖p0)
        self.theta = torch.where(fwd, orders, 1.0 - orders)  # [C]
        bound = (orders - 1.0) * radii
        self.limit = bound - torch.clamp(MARGIN * bound, min=MARGIN_FLOOR)  # feasible iff F ≤ limit
        self.aim = bound - 2.0 * torch.clamp(MARGIN * bound, min=MARGIN_FLOOR)  # Newton's target
        self.cap = float(cons.lambda_cap)
        self.n_iter = cons.n_iter
        self.summary = summary  # (log mass, mean) per pool: :func:`_summary`
        # Constraint indices per direction (θ > 1: forward, θ < 0: reverse), sorted by θ and
        # padded with −1; each constraint's direction and rank there.
        sides = [torch.nonzero(side).flatten() for side in (self.theta > 0, self.theta < 0)]
        sides = [i[torch.argsort(self.theta[i].abs())] for i in sides]
        width = max(len(i) for i in sides)
        self.by_side = torch.full((2, width), -1, dtype=torch.long, device=lp.device)
        self.side_of = torch.zeros_like(self.theta, dtype=torch.long)
        self.rank_of = torch.zeros_like(self.theta, dtype=torch.long)
        for k, idx in enumerate(sides):
            self.by_side[k, : len(idx)] = idx
            self.side_of[idx], self.rank_of[idx] = k, torch.arange(len(idx), device=lp.device)

    def run(self) -> torch.Tensor:
        """Newton on the guessed target from the guess, then certify; retarget until certified."""
        n = self.t.shape[0]
        rows = torch.arange(n, device=self.t.device)
        guess, c = self.guess()
        first = torch.clamp(guess * GUESS_BIAS, min=1e-6, max=self.cap)
        g, d = self.log_gap(first, rows, c)
        over = g > 0
        zero, cap, unknown = (torch.full_like(first, x) for x in (0.0, self.cap, torch.nan))
        lam = self.newton(
            rows,
            c,
            torch.where(over, zero, first),
            torch.where(over, first, cap),
            at_lo=(torch.where(over, unknown, g), torch.where(over, unknown, d)),
            at_hi=(torch.where(over, g, unknown), torch.where(over, d, unknown)),
        )
        todo = rows
        for _ in range(self.n_iter):
            ok_t, c_t = self.certify(lam[todo], todo)
            todo, c_t = todo[~ok_t], c_t[~ok_t]
            if todo.numel() == 0:
                return lam
            lam[todo] = self.newton(todo, c_t, zero[todo], lam[todo])
        raise ArithmeticError(f"mollifier: no certified lambda after {self.n_iter} targets.")

    def guess(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The binding constraint and its λ (capped at 1) on the row summary, per row: damped
        Newton steps in log λ from F's quadratic expansion at λ = 0, first on every 4th order of
        each direction, then on the 7 orders around the best of those."""
        n, dev = self.t.shape[0], self.t.device
        per = torch.sqrt(2.0 * self.aim / (self.theta * (self.theta - 1.0)))  # [C]
        coarse = self.by_side[:, ::GUESS_STRIDE].flatten()
        coarse = coarse[coarse >= 0][None, :].expand(n, -1)
        lam0 = per[coarse] / torch.sqrt(self.chi2)[:, None]
        lam = self._summary_newton(coarse, lam0, SUMMARY_STEPS)
        best = coarse.gather(1, lam.argmin(dim=-1, keepdim=True))[:, 0]  # [R]
        side, at = self.side_of[best], self.rank_of[best]
        window = torch.arange(-GUESS_STRIDE + 1, GUESS_STRIDE, device=dev)[None, :] + at[:, None]
        fine = self.by_side[side[:, None], window.clamp(0, self.by_side.shape[1] - 1)]
        fine = torch.where(fine >= 0, fine, best[:, None])  # past a side's end: the best again
        lam = self._summary_newton(fine, lam.min(dim=-1, keepdim=True).values.expand_as(fine), 2)
        pick = lam.argmin(dim=-1, keepdim=True)
        return lam.gather(1, pick)[:, 0], fine.gather(1, pick)[:, 0]

    def _summary_newton(self, cons: torch.Tensor, lam: torch.Tensor, steps: int) -> torch.Tensor:
        """λ of constraints ``cons [R, K]`` on the row summary after ``steps`` damped Newton steps
        in log λ from ``lam [R, K]`` (each step at most a factor e² either way; λ ≤ 1)."""
        log_mass, mean = (x[:, None, :] for x in self.summary)  # [R, 1, P]
        theta, log_aim = self.theta[cons], torch.log(self.aim[cons])  # [R, K]
        lam = torch.clamp(lam, max=1.0)
        for _ in range(steps):
            ratio = torch.addcmul(torch.ones_like(mean), lam[..., None], mean)  # [R, K, P]
            terms = torch.addcmul(log_mass, theta[..., None], torch.log(ratio))
            f = torch.clamp(torch.logsumexp(terms, dim=-1), min=TINY)
            weights = torch.exp(terms - f[..., None])
            slope = (weights * mean / ratio).sum(dim=-1) * theta * lam / f
            step = torch.clamp(-(torch.log(f) - log_aim) / slope, -2.0, 2.0)
            lam = torch.clamp(lam * torch.exp(torch.nan_to_num(step, nan=0.0)), max=1.0)
        return lam

    # -- F and its λ-derivative -------------------------------------------------------------

    def log_ratio(self, lam: torch.Tensor, rows: torch.Tensor, *, slope: bool = True):
        """s = log(p̄_λ/p0) = log(1 + λ·(e^t − 1)) and ds/dλ = (e^t − 1)/e^s for ``rows`` at ``lam``.

        Where t > 700 (e^t would overflow) s = log λ + t and ds/dλ = 1/λ, exact in float64.
        """
        lam = lam[:, None]
        um1 = self.um1[rows]
        step = lam * um1
        ratio = step.add_(1.0)
        s, ds = torch.log(ratio), (um1 / ratio if slope else None)
        if self.any_huge:
            huge = self.huge[rows] & (lam > 0)
            s = torch.where(huge, torch.log(lam) + self.t[rows], s)
            ds = torch.where(huge, 1.0 / lam, ds) if slope else None
        return s, ds

    def cumulant(self, s: torch.Tensor, rows: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """F(θ) for ``theta [R, k]`` at log ratios ``s [R, V]``: ``[R, k]``."""
        terms = self.lp0[rows][:, None, :] + theta[:, :, None] * s[:, None, :]
        return torch.logsumexp(terms, dim=-1)

    def log_gap(self, lam, rows, c) -> tuple[torch.Tensor, torch.Tensor]:
        """log F_λ(θ_c) − log aim_c and its derivative in log λ (F ≈ κ·λ^a: nearly linear)."""
        s, ds = self.log_ratio(lam, rows)
        theta = self.theta[c]
        terms = torch.addcmul(self.lp0[rows], theta[:, None], s)
        top = terms.max(dim=-1, keepdim=True).values
        e = terms.sub_(torch.where(torch.isfinite(top), top, torch.zeros_like(top))).exp_()
        total = e.sum(dim=-1)
        f = torch.clamp(torch.log(total) + top[:, 0], min=TINY)  # F ≥ 0 outside [0, 1]
        weighted = e.mul_(ds)
        if bool((lam == 1.0).any()):  # where p = 0 at λ = 1: e = 0 and ds = −inf
            weighted = torch.where(weighted.isnan(), torch.zeros_like(e), weighted)
        slope = lam * theta * weighted.sum(dim=-1) / total / f
        return torch.log(f) - torch.log(self.aim[c]), slope

    # -- the two steps ----------------------------------------------------------------------

    def newton(self, rows, c, lo, hi, at_lo=None, at_hi=None) -> torch.Tensor:
        """Largest λ in [lo, hi] with F_λ(θ_c) ≤ aim_c, to 1e-12 (``lo`` is feasible; ``hi`` is
        returned when it is feasible too): bracketed Newton on log F against log λ. ``at_lo`` and
        ``at_hi`` are :meth:`log_gap` values already known at the ends (NaN where not).

        Each step tries Newton from the last point, then from the other end of the bracket (from
        λ = 0, the quadratic guess), then the Illinois secant, then the midpoint: the first that
        lands inside the bracket; when neither the bracket nor |g| halved in two steps, the midpoint.
        """
        lo, hi = lo.clone(), hi.clone()
        nan = torch.full_like(lo, torch.nan)
        g_hi, d_hi = (x.clone() for x in (at_hi or (nan, nan)))
        need = torch.nonzero(g_hi.isnan()).flatten()
        if need.numel():
            g_hi[need], d_hi[need] = self.log_gap(hi[need], rows[need], c[need])
        zero_guess = torch.sqrt(
            self.aim[c] / (self.theta[c] * (self.theta[c] - 1.0) / 2.0 * self.chi2[rows])
        )
        g_lo, d_lo = (x.clone() for x in (at_lo or (nan, nan)))
        g_lo = torch.where(lo > 0, g_lo, -torch.inf)
        d_lo = torch.where(lo > 0, d_lo, 1.0)
        need = torch.nonzero(g_lo.isnan()).flatten()
        if need.numel():
            g_lo[need], d_lo[need] = self.log_gap(lo[need], rows[need], c[need])
        done = g_hi <= 0  # the whole bracket is feasible for this constraint
        lo[done] = hi[done]
        last_hi = g_hi.abs() <= g_lo.abs()  # the end to step from first (then: moved last)
        never = torch.full_like(hi, torch.inf)
        widths = [never, hi - lo]  # bracket widths two and one steps ago
        gaps = [never, g_hi.abs()]  # |g| at the last evaluated points, likewise
        for _ in range(self.n_iter):
            if bool(done.all()):
                return lo
            inside = lambda y: torch.isfinite(y) & (y > lo) & (y < hi)  # noqa: E731
            from_hi = hi * torch.exp(-g_hi / d_hi)
            from_lo = torch.where(lo > 0, lo * torch.exp(-g_lo / d_lo), zero_guess)
            first = torch.where(last_hi, from_hi, from_lo)
            second = torch.where(last_hi, from_lo, from_hi)
            m_lo, m_hi = torch.log(lo), torch.log(hi)
            secant = torch.exp(m_hi - g_hi * (m_hi - m_lo) / (g_hi - g_lo))
            y = torch.where(inside(secant), secant, (lo + hi) / 2)
            y = torch.where(inside(second), second, y)
            y = torch.where(inside(first), first, y)
            # Neither the bracket nor |g| halved in two steps: bisect.
            slow = ((hi - lo) > 0.5 * widths[0]) & (gaps[1] > 0.5 * gaps[0])
            y = torch.where(slow, (lo + hi) / 2, y)
            widths = [widths[1], hi - lo]
            act = torch.nonzero(~done).flatten()
            g_y, d_y = self.log_gap(y[act], rows[act], c[act])
            feas = g_y <= 0
            a_lo, a_hi = act[feas], act[~feas]
            g_hi[a_lo[~last_hi[a_lo]]] /= 2.0  # Illinois: the same end moved twice
            g_lo[a_hi[last_hi[a_hi]]] /= 2.0
            lo[a_lo], g_lo[a_lo], d_lo[a_lo] = y[a_lo], g_y[feas], d_y[feas]
            hi[a_hi], g_hi[a_hi], d_hi[a_hi] = y[a_hi], g_y[~feas], d_y[~feas]
            last_hi[act] = ~feas
            gaps = [gaps[1], gaps[1].clone()]
            gaps[1][act] = g_y.abs()
            near = feas & (g_y > -1.0) & (torch.abs(g_y / d_y) * y[act] < NEWTON_STOP)
            done[act] = near | (hi[act] - lo[act] <= TOLERANCE)
        raise ArithmeticError(f"mollifier: lambda did not converge in {self.n_iter} steps.")

    def certify(self, lam: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: whether every constraint holds at ``lam`` with the margin, and a constraint
        to aim at next: the most violated one (by bound/limit), else the tightest.

        Known points of F start at θ = 0 and 1 (F = 0); each round evaluates, on each side, the
        constraint whose bound exceeds its limit most, until none does or one is violated.
        """
        n = rows.numel()
        s = self.log_ratio(lam, rows, slope=False)[0]
        if self.theta.numel() * s.shape[-1] <= DENSE_WORK:  # small V: every constraint at once
            ratio = self.cumulant(s, rows, self.theta.expand(n, -1)) / self.limit
            return ~(ratio > 1.0).any(dim=-1), ratio.argmax(dim=-1)
        s_min, s_max = s.min(dim=-1).values, s.max(dim=-1).values
        zero = torch.zeros(n, 2, dtype=torch.float64, device=s.device)
        known_t, known_f = zero + torch.tensor([0.0, 1.0], device=s.device), zero
        ok = torch.zeros(n, dtype=torch.bool, device=s.device)
        aim = torch.zeros(n, dtype=torch.long, device=s.device)
        open_ = torch.arange(n, device=s.device)  # rows still undecided
        theta, limit = self.theta[None, :], self.limit[None, :]
        while open_.numel():
            kt, kf = known_t[open_], known_f[open_]
            upper, exact = _upper(kt, kf, theta, s_min[open_], s_max[open_])
            over = upper > limit
            violated = (exact & over).any(dim=-1)
            unsettled = ~exact & over
            ratio = torch.where(exact | ~over, upper / limit, -torch.inf)
            aim[open_] = ratio.argmax(dim=-1)
            more = ~violated & unsettled.any(dim=-1)
            ok[open_[~violated & ~more]] = True
            if not bool(more.any()):
                break
            open_, kt, kf, unsettled = open_[more], kt[more], kf[more], unsettled[more]
            excess = torch.where(unsettled, upper[more] - limit, -torch.inf)
            sides = [
                side for side in (self.theta > 0, self.theta < 0) if bool((unsettled & side).any())
            ]
            pick = torch.stack(
                [torch.where(side, excess, -torch.inf).argmax(-1) for side in sides], 1
            )
            new_t = self.theta[pick]  # [R, k]; a row with nothing unsettled on a side re-picks
            new_f = self.cumulant(s[open_], rows[open_], new_t)
            known_t = torch.full(
                (n, kt.shape[1] + len(sides)), torch.nan, dtype=torch.float64, device=s.device
            ).index_copy(0, open_, torch.cat([kt, new_t], 1))
            known_f = torch.zeros_like(known_t).index_copy(0, open_, torch.cat([kf, new_f], 1))
        return ok, aim


def _upper(kt, kf, theta, s_min, s_max) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bounds on F at ``theta [1, C]`` from known points ``kt, kf [R, K]``, and which are exact.

    Between two known points: the chord (F is convex); beyond the last: slope max s; before the
    first: slope min s. Known θ include 0 and 1, so every constraint has a neighbour.
    """
    t = kt[:, None, :]  # [R, 1, K]: the few known points innermost (a strided argmax over
    th = theta[:, :, None]  # [1, C, 1]  a middle axis was 6x slower on CPU)
    (l_max, li), (r_min, ri) = (  # [R, C]: the first of equal maxima / minima, as argmax
        torch.where(t <= th, t, -torch.inf).max(dim=-1),
        torch.where(t >= th, t, torch.inf).min(dim=-1),
    )
    t_l, f_l = kt.gather(1, li), kf.gather(1, li)
    t_r, f_r = kt.gather(1, ri), kf.gather(1, ri)
    has_l, has_r = torch.isfinite(l_max), torch.isfinite(r_min)
    th = theta.expand_as(t_l)
    chord = f_l + (th - t_l) / (t_r - t_l) * (f_r - f_l)
    exact = has_l & (t_l == th)
    upper = torch.where(exact, f_l, chord)
    upper = torch.where(has_l & ~has_r, f_l + (th - t_l) * s_max[:, None], upper)
    upper = torch.where(has_r & ~has_l, f_r + (t_r - th) * -s_min[:, None], upper)
    exact = exact | (has_r & (t_r == th))
    upper = torch.where(has_r & (t_r == th), f_r, upper)
    return upper, exact

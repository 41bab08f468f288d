"""One PMixED query on distributions, and the exact law of the released token.

``step`` is the mechanism of PMIXED_MATH.md §2: one Bernoulli(q) draw per member (a Poisson subset,
without replacement), mollify the sampled members towards the public distribution, average, and
release ONE token. Every random draw goes through the caller's ``numpy.random.Generator``.

``exact_released_law`` is §10's closed form. For a fixed β, λ_i depends only on (p_i, p0, β), and given
|S| = m the subset is uniform, so

    P_E(y) = (1−q)^N · p0(y) + (1 − (1−q)^N) · (1/N) · Σ_i p̄_i(y).

Reference mode mixes over the subset size because its β depends on it.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from pmixed._checks import as_log_distribution, logsumexp
from pmixed.mollifier import mix_log, mollify_log, solve_lambdas, solve_lambdas_sizes
from pmixed.privacy import Calibration

__all__ = [
    "SAMPLER",
    "SAMPLER_TV_PER_QUERY",
    "NeighbourDivergence",
    "StepResult",
    "draw_index",
    "exact_released_law",
    "exact_released_log_law",
    "lambdas_by_size",
    "neighbour_divergence",
    "release_log",
    "release_log_many",
    "released_log_law",
    "sample_subset",
    "sample_token",
    "step",
]


@dataclass(frozen=True)
class StepResult:
    """One query's outcome. Only ``token`` and ``cost`` are public; the rest is RESTRICTED.

    Attributes:
        token: the released token id.
        subset: sorted indices of the sampled members (restricted, like its size).
        lambdas: λ_i of each sampled member, aligned with ``subset`` (restricted).
        distribution: the law the token was drawn from, p̄_S or p0 when S = ∅ (restricted).
        cost: the per-query RDP charged at ``calibration.orders`` (public, data-independent).
    """

    token: int
    subset: np.ndarray
    lambdas: np.ndarray
    distribution: np.ndarray
    cost: np.ndarray


def _check_generator(generator: object) -> np.random.Generator:
    if not isinstance(generator, np.random.Generator):
        raise TypeError(
            "generator must be a numpy.random.Generator (seeded from OS entropy in deployment: "
            f"numpy.random.default_rng()). Found {type(generator).__name__}."
        )
    return generator


def sample_subset(
    n_members: int, sampling_rate: float, generator: np.random.Generator, *, sampler="poisson"
) -> np.ndarray:
    """Member indices for one query.

    ``"poisson"``: one independent Bernoulli(q) per member; sorted, no duplicates. ``"with_replacement"``
    (reference mode only): the paper code's m ~ Bin(N, q) followed by m uniform draws WITH replacement,
    so indices may repeat; the released-token law is the same (PMIXED_MATH.md §2).
    """
    g = _check_generator(generator)
    if sampler == "poisson":
        return np.flatnonzero(g.random(n_members) < sampling_rate)
    if sampler == "with_replacement":
        m = int(g.binomial(n_members, sampling_rate))
        return np.sort(g.integers(0, n_members, size=m))
    raise ValueError(f"sampler must be 'poisson' or 'with_replacement'. Found {sampler!r}.")


#: Sampler identity and its per-query total-variation bound, recorded in every ledger header.
#: Tokens whose weight exp(log p − max) underflows (below 2**-1074 of the largest) can never be
#: drawn; for V ≤ 2**32 their total mass is below 2**-1042 of the law, so the released law is
#: within that total variation of the exact float64 law (PMIXED_MATH.md §11, "Token draw").
SAMPLER = "exact inverse CDF on float64 weights (dyadic integers, lazily refined uniform)"
SAMPLER_TV_PER_QUERY = 2.0**-1042
_WORD = 2**64


def sample_token(logp: np.ndarray, generator: np.random.Generator) -> int:
    """One token drawn with probability exactly w_y / Σ w, w = exp(log p − max log p) in float64.

    A ``-inf`` entry (w = 0) is never chosen; every w > 0, however small next to the running sum,
    is released with exactly its probability (a float64 cumulative sum and a 53-bit uniform would
    make a token below half an ulp of its prefix sum unreleasable, an infinite Rényi divergence on
    that event). See :func:`draw_index`.
    """
    g = _check_generator(generator)
    lp = np.asarray(logp, np.float64)
    w = np.exp(lp - np.max(lp))
    return draw_index(w, lambda: int(g.integers(0, _WORD, dtype=np.uint64)))


def draw_index(weights: np.ndarray, next_word) -> int:
    """Index y with probability exactly weights[y] / Σ weights (finite float64 weights ≥ 0, max 1).

    The uniform X ∈ [0, 1) is read lazily as 64-bit words from ``next_word()``; y is the index
    with S_{y−1} ≤ X·S < S_y for the exact prefix sums S_i. Fast path: the float64 cumulative sum
    with a rigorous bound on its rounding (n·2^-52 of the total) decides whenever no prefix sum lies
    within that bound of X·S's interval, which is all but about n·2^-50 of draws. Otherwise the
    sums are formed exactly as integers (every float64 weight is k·2^-1074) and X is refined by
    further words until its interval lies inside one token's. The law is therefore exact for the
    given float64 weights.
    """
    w = np.asarray(weights, np.float64)
    c = np.cumsum(w)
    total, n = float(c[-1]), len(w)
    err = 2.0 * n * 2.0**-53 * total + 4 * math.ulp(total)
    x = next_word()
    lo = x / _WORD * total - err
    hi = (x + 1) / _WORD * total + err
    i0 = int(np.searchsorted(c, lo - err, side="right"))
    if i0 == int(np.searchsorted(c, hi + err, side="right")) and i0 < n:
        return i0
    return _draw_exact(w, x, next_word)


def _draw_exact(w: np.ndarray, x: int, next_word) -> int:
    """The slow exact path of :func:`draw_index`, continuing from the first word ``x``."""
    scale = 2**1074
    cum = list(
        itertools.accumulate(n * (scale // d) for n, d in (float(v).as_integer_ratio() for v in w))
    )
    total, a, bits = cum[-1], x, 64
    while True:  # X ∈ [a, a+1) / 2**bits; stop once X·S lies inside one token's interval
        y = bisect.bisect_right(cum, a * total, key=lambda v, b=bits: v << b)
        if y < len(cum) and (a + 1) * total <= cum[y] << bits:
            return y
        a, bits = (a << 64) | next_word(), bits + 64


def release_log(
    logp_sampled: np.ndarray,
    logp_public: np.ndarray,
    calibration: Calibration,
    generator: np.random.Generator,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Mollify the sampled rows ``[m, V]``, average, draw one token: (token, λ [m], log p̄_S [V])."""
    return release_log_many([(logp_sampled, logp_public)], calibration, [generator])[0]


def release_log_many(
    queries: list[tuple[np.ndarray, np.ndarray]],
    calibration: Calibration,
    generators: list[np.random.Generator],
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """:func:`release_log` for several queries ``(logp_sampled [m_i, V], logp_public [V])``, each
    drawing from its own generator; the rows of all queries that share a constraint set are
    mollified in one call. A row's λ does not depend on the rows solved with it (bit for bit), so
    each query's token is the one :func:`release_log` would draw alone."""
    lp0s = [np.asarray(lp0, np.float64) for _, lp0 in queries]
    lams: list[np.ndarray] = [np.zeros(0)] * len(queries)
    groups: dict[object, list[int]] = {}
    for i, (lp, _) in enumerate(queries):
        if lp.shape[0]:
            groups.setdefault(calibration.constraints(lp.shape[0]), []).append(i)
    for cons, members in groups.items():
        rows = np.concatenate([queries[i][0] for i in members])
        centres = np.concatenate([np.broadcast_to(lp0s[i], queries[i][0].shape) for i in members])
        ends = np.cumsum([len(queries[i][0]) for i in members])[:-1]
        for i, lam in zip(members, np.split(solve_lambdas(rows, centres, cons), ends)):
            lams[i] = lam
    out = []
    for (lp, _), lp0, lam, g in zip(queries, lp0s, lams, generators, strict=True):
        if lp.shape[0] == 0:
            out.append((sample_token(lp0, g), lam, lp0))
            continue
        lpbar = mix_log(lp, lp0[None, :], lam)
        lmix = logsumexp(lpbar, axis=0) - math.log(lpbar.shape[0])
        out.append((sample_token(lmix, g), lam, lmix))
    return out


def step(
    p_members: object,
    p_public: object,
    calibration: Calibration,
    generator: np.random.Generator,
) -> StepResult:
    """One PMixED query over an ensemble given as full distributions.

    Args:
        p_members: probabilities ``[N, V]``, one row per member (N = ``config.n_members``).
        p_public: probabilities ``[V]`` of the public model.
        calibration: the deployment's calibration.
        generator: the explicit random generator (subsample and token draw).
    """
    g = _check_generator(generator)
    lp = as_log_distribution(p_members, "p_members")
    lp0 = as_log_distribution(p_public, "p_public")
    n = calibration.config.n_members
    if lp.ndim != 2 or lp.shape[0] != n or lp0.shape != lp.shape[1:]:
        raise ValueError(
            f"p_members must have shape [n_members={n}, V] and p_public [V]. "
            f"Found {lp.shape} and {lp0.shape}."
        )
    sampler = calibration.config.reference_sampler
    subset = sample_subset(n, calibration.config.sampling_rate, g, sampler=sampler)
    token, lam, lmix = release_log(lp[subset], lp0, calibration, g)
    return StepResult(token, subset, lam, np.exp(lmix), calibration.per_query_rdp.copy())


def lambdas_by_size(
    logp_members: np.ndarray,
    logp_public: np.ndarray,
    calibration: Calibration,
    n_sizes: int | None = None,
) -> np.ndarray:
    """λ of every member row ``[R, V]`` for subset sizes 1..``n_sizes`` (default R): ``[n_sizes, R]``
    (row m−1: size m) in reference mode, ``[1, R]`` (one row for all sizes) when β is fixed.

    Each λ depends only on its own row, p0 and the size's constraints, so a neighbouring ensemble
    reuses these (:func:`released_log_law`)."""
    lp = np.asarray(logp_members, np.float64)
    lp0 = np.asarray(logp_public, np.float64)
    n = lp.shape[0] if n_sizes is None else n_sizes
    if calibration.beta is not None:
        return mollify_log(lp, lp0, calibration.constraints)[None, :]
    lp0_rows = np.broadcast_to(lp0, lp.shape)
    return solve_lambdas_sizes(lp, lp0_rows, [calibration.constraints(m) for m in range(1, n + 1)])


def released_log_law(
    logp_members: np.ndarray, logp_public: np.ndarray, lambdas: np.ndarray, sampling_rate: float
) -> np.ndarray:
    """log P_E(y) from the members' λ by subset size (:func:`lambdas_by_size`; a single row when β
    is fixed, otherwise at least N rows, of which the first N are used)."""
    lp = np.asarray(logp_members, np.float64)
    lp0 = np.asarray(logp_public, np.float64)
    n, q = lp.shape[0], sampling_rate
    if n == 0:
        return lp0.copy()
    log_none = n * math.log1p(-q) if q < 1 else -np.inf
    if lambdas.shape[0] == 1:
        lpbar = mix_log(lp, lp0[None, :], lambdas[0])
        with np.errstate(divide="ignore"):
            log_some = math.log(-math.expm1(log_none)) if q < 1 else 0.0
        private = log_some + logsumexp(lpbar, axis=0) - math.log(n)
        return np.logaddexp(log_none + lp0, private)
    terms = [log_none + lp0] if q < 1 else []
    for m in range(1, n + 1):
        log_pmf = float(binom.logpmf(m, n, q))
        if not math.isfinite(log_pmf):
            continue
        lpbar = mix_log(lp, lp0[None, :], lambdas[m - 1])
        terms.append(log_pmf + logsumexp(lpbar, axis=0) - math.log(n))
    return logsumexp(np.stack(terms), axis=0)


def exact_released_log_law(
    logp_members: np.ndarray, logp_public: np.ndarray, calibration: Calibration
) -> np.ndarray:
    """log P_E(y) for the ensemble given by the rows of ``logp_members`` ``[N, V]`` (any N ≥ 0)."""
    lp = np.asarray(logp_members, np.float64)
    if lp.shape[0] == 0:
        return np.asarray(logp_public, np.float64).copy()
    lam = lambdas_by_size(lp, logp_public, calibration)
    return released_log_law(lp, logp_public, lam, calibration.config.sampling_rate)


def exact_released_law(p_members: object, p_public: object, calibration: Calibration):
    """P_E(y) of one query: probabilities ``[V]`` (see the module docstring)."""
    lp = as_log_distribution(p_members, "p_members")
    lp0 = as_log_distribution(p_public, "p_public")
    return np.exp(exact_released_log_law(lp, lp0, calibration))


@dataclass(frozen=True)
class NeighbourDivergence:
    """Exact per-query Rényi divergences between the laws of two neighbouring ensembles.

    ``forward[k] = D_k(P_E ‖ P_E')`` and ``backward[k] = D_k(P_E' ‖ P_E)`` where E is the given
    ensemble and E' drops (AR) or replaces (RO) one member.
    """

    relation: str
    orders: np.ndarray
    forward: np.ndarray
    backward: np.ndarray

    @property
    def worst(self) -> np.ndarray:
        return np.maximum(self.forward, self.backward)


def neighbour_divergence(
    p_members: object,
    p_public: object,
    calibration: Calibration,
    *,
    member: int,
    replacement: object | None = None,
    orders: object | None = None,
) -> NeighbourDivergence:
    """Exact D_k between P_E and the law with ``member`` dropped (AR) or replaced (RO)."""
    from pmixed.divergence import renyi_divergence_log

    lp = as_log_distribution(p_members, "p_members")
    lp0 = as_log_distribution(p_public, "p_public")
    if not 0 <= member < lp.shape[0]:
        raise ValueError(f"member must be in [0, {lp.shape[0] - 1}]. Found {member}.")
    ks = np.asarray(calibration.orders if orders is None else orders, np.float64)
    if replacement is None:
        other, relation = np.delete(lp, member, axis=0), "add_remove"
    else:
        other = lp.copy()
        other[member] = as_log_distribution(replacement, "replacement")
        relation = "replace_one"
    law = exact_released_log_law(lp, lp0, calibration)
    law_other = exact_released_log_law(other, lp0, calibration)
    fwd = renyi_divergence_log(law, law_other, ks)
    bwd = renyi_divergence_log(law_other, law, ks)
    return NeighbourDivergence(relation, ks, fwd, bwd)

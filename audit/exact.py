"""Distribution-level audit of PMixED for one neighbouring pair and fixed contexts (AUDIT.md §7).

For each audited context t the exact per-query laws of the two worlds, P_t (the ensemble) and P'_t
(one member dropped: ``add_remove``; or replaced, e.g. by the member retrained without its
canaries: ``replace_one``), come from :func:`pmixed.mechanism.released_log_law`, the closed form
behind ``exact_released_log_law``; each member's λ is computed once and shared by both worlds (it
depends only on that member, p0 and the subset size). Then:

* **Rényi check**: D_α(P_t‖P'_t) and D_α(P'_t‖P_t) at the accountant's orders, per query and summed
  over the queries (exact by additivity for fixed contexts), against the charged per-query cost and
  its T-fold sum. An exceedance beyond ``RDP_TOLERANCE`` is an alarm (a counterexample).
* **PLD lower bound**: per query, dp-accounting's PLD of the pair with *optimistic* rounding
  (``pessimistic_estimate=False``), composed over the queries: ε_pair(δ) is a lower bound on the
  mechanism's ε(δ) for this relation, with no sampling error.
* :func:`conformance`: a χ² test of the real sampler (:func:`pmixed.mechanism.step`) against the
  exact law of one context, and of the subset sizes against Binomial(N, q).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld
from scipy import stats

from pmixed.divergence import renyi_divergence_log
from pmixed.mechanism import exact_released_log_law, lambdas_by_size, released_log_law, step
from pmixed.privacy import Calibration

__all__ = [
    "ExactPair",
    "conformance",
    "exact_pair_audit",
    "pair_epsilon",
    "pair_laws",
    "repeated_pair_epsilon",
]

#: Relative slack on the per-query comparison: the exact D is float64 log-space arithmetic.
RDP_TOLERANCE = 1e-9
#: PLD grid; optimistic rounding keeps the composed ε a lower bound.
DISCRETIZATION = 1e-4


@dataclass(frozen=True)
class ExactPair:
    """The exact evidence for one pair (public: divergences of output laws, no model internals)."""

    relation: str
    orders: tuple[int, ...]
    n_queries: int
    per_query: np.ndarray  # [T, K] max of both directions
    summed: np.ndarray  # [K] Σ_t of the per-query maxima (an upper envelope of both orders' sums)
    summed_forward: np.ndarray  # [K] Σ_t D(P_t‖P'_t)
    summed_backward: np.ndarray  # [K] Σ_t D(P'_t‖P_t)
    charged_per_query: np.ndarray | None  # [K], None when the claim's relation differs
    epsilon_pair: float
    delta: float
    status: str  # the claim's status: certified / conditional / UNCERTIFIED

    @property
    def comparable(self) -> bool:
        return self.charged_per_query is not None

    @property
    def worst_ratio(self) -> float:
        """max over queries and orders of exact / charged (≤ 1 when the claim holds for the pair)."""
        if self.charged_per_query is None:
            return float("nan")
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.per_query / self.charged_per_query[None, :]
        r = np.where(self.per_query == 0, 0.0, r)
        return float(np.max(r))

    @property
    def alarm(self) -> bool:
        """True when an exact per-query divergence exceeds the charged cost."""
        if self.charged_per_query is None:
            return False
        limit = self.charged_per_query * (1 + RDP_TOLERANCE)
        return bool((self.per_query > limit[None, :]).any())

    def to_json(self) -> dict:
        charged = None if self.charged_per_query is None else self.charged_per_query.tolist()
        return {
            "relation": self.relation,
            "orders": list(self.orders),
            "n_queries": self.n_queries,
            "per_query_max": self.per_query.max(axis=0).tolist(),
            "summed_forward": self.summed_forward.tolist(),
            "summed_backward": self.summed_backward.tolist(),
            "charged_per_query": charged,
            "charged_total": None
            if charged is None
            else (self.charged_per_query * self.n_queries).tolist(),
            "worst_ratio": None if charged is None else self.worst_ratio,
            "epsilon_pair": self.epsilon_pair,
            "delta": self.delta,
            "pld": {"rounding": "optimistic", "discretization": DISCRETIZATION},
            "claim_status": self.status,
            "alarm": self.alarm,
        }


def _laws(lp: np.ndarray, lp0: np.ndarray, cal: Calibration, member: int, replacement):
    """(log P [T, V], log P' [T, V]) over the contexts; the two worlds share every member's λ."""
    q = cal.config.sampling_rate
    n = lp.shape[1]
    law, other = [], []
    for t in range(lp.shape[0]):
        lam = lambdas_by_size(lp[t], lp0[t], cal)  # [sizes, N]
        law.append(released_log_law(lp[t], lp0[t], lam, q))
        if replacement is None:  # N − 1 members: the same λ per row, sizes 1..N−1
            keep = np.delete(np.arange(n), member)
            sizes = lam if lam.shape[0] == 1 else lam[: max(1, n - 1)]
            other.append(released_log_law(lp[t][keep], lp0[t], sizes[:, keep], q))
        else:
            rows = lp[t].copy()
            rows[member] = replacement[t]
            lam_other = lam.copy()
            lam_other[:, member] = lambdas_by_size(
                rows[member : member + 1],
                lp0[t],
                cal,
                n_sizes=lam.shape[0] if lam.shape[0] > 1 else None,
            )[:, 0]
            other.append(released_log_law(rows, lp0[t], lam_other, q))
    return np.stack(law), np.stack(other)


def _pair_pld(a: np.ndarray, b: np.ndarray):
    upper = {int(y): float(v) for y, v in enumerate(a) if v > -np.inf}
    lower = {int(y): float(v) for y, v in enumerate(b) if v > -np.inf}
    return pld.from_two_probability_mass_functions(
        lower,
        upper,
        pessimistic_estimate=False,
        value_discretization_interval=DISCRETIZATION,
        symmetric=False,
    )


def pair_epsilon(log_law: np.ndarray, log_other: np.ndarray, delta: float) -> float:
    """ε(δ) of the composed pairs (log_law[t], log_other[t]) by optimistic PLDs: a lower bound."""
    total = None
    for a, b in zip(log_law, log_other):
        one = _pair_pld(a, b)
        total = one if total is None else total.compose(one)
    return float(max(0.0, total.get_epsilon_for_delta(delta)))


def repeated_pair_epsilon(
    log_law: np.ndarray, log_other: np.ndarray, times: int, delta: float
) -> float:
    """ε(δ) of ONE context's pair asked ``times`` times (query control: the adversary repeats its
    best prompt), by dp-accounting's PLD self-composition with optimistic rounding."""
    return float(
        max(0.0, _pair_pld(log_law, log_other).self_compose(times).get_epsilon_for_delta(delta))
    )


def pair_laws(
    logp_members: object,
    logp_public: object,
    calibration: Calibration,
    *,
    member: int,
    replacement: object | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(log P [T, V], log P' [T, V]) of the pair :func:`exact_pair_audit` audits."""
    lp = np.asarray(logp_members, np.float64)
    rep = None if replacement is None else np.asarray(replacement, np.float64)
    return _laws(lp, np.asarray(logp_public, np.float64), calibration, member, rep)


def exact_pair_audit(
    logp_members: object,
    logp_public: object,
    calibration: Calibration,
    *,
    member: int,
    replacement: object | None = None,
    delta: float | None = None,
) -> ExactPair:
    """The exact audit of one pair over fixed contexts.

    Args:
        logp_members: ``[T, N, V]`` normalised log-probabilities of every member at each context.
        logp_public: ``[T, V]`` the public model at each context.
        calibration: the deployment's calibration (the claim).
        member: the member that differs between the worlds.
        replacement: ``[T, V]`` the other world's version of ``member`` (``replace_one``); None
            drops the member (``add_remove``).
        delta: for ε_pair; default the calibration's δ.
    """
    lp = np.asarray(logp_members, np.float64)
    lp0 = np.asarray(logp_public, np.float64)
    if lp.ndim != 3 or lp0.shape != (lp.shape[0], lp.shape[2]):
        raise ValueError(
            f"logp_members [T, N, V] and logp_public [T, V] disagree: {lp.shape}, {lp0.shape}."
        )
    if not 0 <= member < lp.shape[1]:
        raise ValueError(f"member must be in [0, {lp.shape[1] - 1}]. Found {member}.")
    rep = None if replacement is None else np.asarray(replacement, np.float64)
    if rep is not None and rep.shape != lp0.shape:
        raise ValueError(f"replacement must have shape {lp0.shape}. Found {rep.shape}.")
    relation = "add_remove" if rep is None else "replace_one"
    law, other = _laws(lp, lp0, calibration, member, rep)
    orders = np.asarray(calibration.orders, np.float64)
    fwd = renyi_divergence_log(law, other, orders)  # [T, K]
    bwd = renyi_divergence_log(other, law, orders)
    if relation == "add_remove":
        charged = calibration.per_query_rdp_add_remove
    elif calibration.config.relation == "replace_one":
        charged = calibration.per_query_rdp
    else:
        charged = None  # an AR claim says nothing directly about a replaced member
    d = calibration.delta if delta is None else delta
    return ExactPair(
        relation,
        tuple(int(k) for k in calibration.orders),
        lp.shape[0],
        np.maximum(fwd, bwd),
        np.maximum(fwd, bwd).sum(axis=0),
        fwd.sum(axis=0),
        bwd.sum(axis=0),
        charged,
        pair_epsilon(law, other, d),
        d,
        calibration.status,
    )


def conformance(
    logp_members: object,
    logp_public: object,
    calibration: Calibration,
    *,
    n_samples: int,
    rng: np.random.Generator,
) -> dict:
    """χ² of ``n_samples`` draws of the real sampler against the exact law of one context.

    Bins: every token with expected count ≥ 5, the rest pooled. Also tests the subset sizes
    against Binomial(N, q) (pooled the same way) and that no member is drawn twice.
    """
    lp = np.asarray(logp_members, np.float64)
    lp0 = np.asarray(logp_public, np.float64)
    law = np.exp(exact_released_log_law(lp, lp0, calibration))
    tokens = np.empty(n_samples, np.int64)
    sizes = np.empty(n_samples, np.int64)
    duplicates = 0
    for i in range(n_samples):
        res = step(np.exp(lp), np.exp(lp0), calibration, rng)
        tokens[i], sizes[i] = res.token, len(res.subset)
        duplicates += len(set(map(int, res.subset))) != len(res.subset)
    n, q = lp.shape[0], calibration.config.sampling_rate
    token_p = _chi2(np.bincount(tokens, minlength=law.size), law)
    size_p = _chi2(np.bincount(sizes, minlength=n + 1), stats.binom.pmf(np.arange(n + 1), n, q))
    return {
        "n_samples": n_samples,
        "token_p_value": token_p,
        "subset_size_p_value": size_p,
        "duplicate_members": int(duplicates),
    }


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    if keep.sum() < 2:
        return 1.0
    return float(stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)

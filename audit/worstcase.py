"""PMixED's worst case, exactly (AUDIT.md §15): the accountant's tightness apart from training.

With the public model and the other members fixed at a context, the adversary may make member j
any distribution (a poisoned partition). :func:`worst_member` searches for the member that
maximises the exact per-query divergence over the charged cost, max over orders and both
directions, for the ``add_remove`` pair (E with member j against E without it). The objective is
a black box (λ is a root-find), so the search is random then local, over the families known to be
worst (PMIXED_MATH.md §7): mass moved to 1-3 tokens chosen by p0 rank (the rarest and the most
likely) with a continuous weight, and p0 with one rare token scaled by r ∈ [10, 10^4]. The winner
is re-evaluated with the exact law; its ratio is a lower bound on the accountant's per-query
looseness at that context (> 1: the claim is exceeded, an alarm).

:func:`configuration_worst_case` frees the context too: the public distribution, the other members
and member j are all chosen by the optimiser on a small public toy vocabulary, at the deployment's
N, q, T and mode. The guarantee is claimed for every dataset and every prompt, so a ratio above 1
there is a violation of the accounting at this configuration whatever models are deployed, and a
ratio below 1 measures how loose the charge is against the strongest per-query adversary found.
It searches the AR pair by default, and with ``relation="replace_one"`` the RO pair (member j
against a replacement, N fixed: :func:`ro_laws`) against an RO charge.

A *mechanism* here is what mixes (``mechanism``: a Calibration whose λ rule is used, and
optionally ``unmollified``: member j's λ forced to 1); the *claim* is the per-query curve the
ledger charges. They differ only for planted violations (:mod:`audit.mutants`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmixed.divergence import renyi_divergence_log
from pmixed.mechanism import lambdas_by_size, released_log_law
from pmixed.privacy import Calibration

__all__ = [
    "WorstCase",
    "ar_divergence",
    "ar_laws",
    "ar_ratio",
    "configuration_worst_case",
    "pmixed_worst_case",
    "ro_laws",
    "worst_member",
]


@dataclass(frozen=True)
class WorstCase:
    """The best member found: its exact/charged ratio, the order attaining it, and how found."""

    ratio: float
    order: int
    family: str
    evaluations: int
    member: np.ndarray  # log-probabilities [V] (restricted when p0 is a real model's)

    def to_json(self) -> dict:
        return {
            "ratio": self.ratio,
            "order": self.order,
            "family": self.family,
            "evaluations": self.evaluations,
        }


def ar_laws(
    others: np.ndarray,
    member: np.ndarray,
    lp0: np.ndarray,
    mechanism: Calibration,
    *,
    unmollified: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(log P, log P') ``[V]`` of E = others + member and of E' = others (the AR pair)."""
    lp = np.vstack([others, member[None]])
    n, j = lp.shape[0], lp.shape[0] - 1
    lam = lambdas_by_size(lp, lp0, mechanism)
    if unmollified:
        lam = lam.copy()
        lam[:, j] = 1.0
    q = mechanism.config.sampling_rate
    law = released_log_law(lp, lp0, lam, q)
    sizes = lam if lam.shape[0] == 1 else lam[: max(1, n - 1)]
    other = released_log_law(others, lp0, sizes[:, :j], q) if j else lp0.copy()
    return law, other


def ar_divergence(
    others: np.ndarray,
    member: np.ndarray,
    lp0: np.ndarray,
    mechanism: Calibration,
    *,
    unmollified: bool = False,
) -> np.ndarray:
    """Exact max(D(P‖P'), D(P'‖P)) at the mechanism's orders for E = others + member vs others."""
    law, other = ar_laws(others, member, lp0, mechanism, unmollified=unmollified)
    orders = np.asarray(mechanism.orders, np.float64)
    return np.maximum(
        renyi_divergence_log(law, other, orders), renyi_divergence_log(other, law, orders)
    )


def ar_ratio(
    others: np.ndarray,
    member: np.ndarray,
    lp0: np.ndarray,
    mechanism: Calibration,
    charged: np.ndarray,
    *,
    unmollified: bool = False,
) -> tuple[float, int]:
    """(max over orders of exact D / charged, that order) for E = others + member vs others."""
    d = ar_divergence(others, member, lp0, mechanism, unmollified=unmollified)
    return _worst_order(d, charged, mechanism.orders)


def _worst_order(d: np.ndarray, charged: np.ndarray, orders) -> tuple[float, int]:
    """(max over orders of d / charged, that order); orders charging nothing or +inf are skipped."""
    ok = np.isfinite(charged) & (charged > 0)
    r = np.where(ok, d / np.where(ok, charged, 1.0), 0.0)
    k = int(np.argmax(r))
    return float(r[k]), int(orders[k])


def ro_laws(
    others: np.ndarray, member: np.ndarray, replacement: np.ndarray, lp0: np.ndarray, mechanism
) -> tuple[np.ndarray, np.ndarray]:
    """(log P, log P') ``[V]`` of E = others + member and E' = others + replacement (the RO
    pair: N fixed). A row's λ depends on its own row only, so all N + 1 rows are solved at once."""
    n = len(others) + 1
    lp = np.vstack([others, member[None], replacement[None]])
    lam = lambdas_by_size(lp, lp0, mechanism, n_sizes=n)
    q = mechanism.config.sampling_rate
    swapped = np.r_[0 : n - 1, n]
    return (
        released_log_law(lp[:n], lp0, lam[:, :n], q),
        released_log_law(lp[swapped], lp0, lam[:, swapped], q),
    )


def _candidate(p0: np.ndarray, rng: np.random.Generator, pool: np.ndarray, rare: np.ndarray):
    if rng.random() < 0.5:
        k = int(rng.integers(1, min(3, len(pool)) + 1))
        tokens = rng.choice(pool, size=k, replace=False)
        w = 10 ** rng.uniform(-4, 0)
        p = (1 - w) * p0
        p[tokens] += w * rng.dirichlet(np.ones(k))
        return p / p.sum(), "sparse"
    y = int(rng.choice(rare))
    r = 10 ** rng.uniform(1, 4) * (1 if rng.random() < 0.7 else -1)
    p = p0.copy()
    p[y] = p0[y] * abs(r) if r > 0 else p0[y] / abs(r)
    return p / p.sum(), "rare-token scaled"


def worst_member(
    logp_others: np.ndarray,
    logp_public: np.ndarray,
    mechanism: Calibration,
    charged: np.ndarray,
    *,
    rng: np.random.Generator,
    evaluations: int = 200,
    unmollified: bool = False,
) -> WorstCase:
    """Random search over the two families, then a local refinement of the winner's weight."""
    lp0 = np.asarray(logp_public, np.float64)
    others = np.asarray(logp_others, np.float64)
    p0 = np.exp(lp0)
    order = np.argsort(p0)
    pool = np.unique(np.concatenate([order[:12], order[-3:]]))
    rare = order[: min(12, len(order))]
    best = (-1.0, 0, "", p0)
    for _ in range(evaluations):
        p, family = _candidate(p0, rng, pool, rare)
        with np.errstate(divide="ignore"):
            ratio, k = ar_ratio(others, np.log(p), lp0, mechanism, charged, unmollified=unmollified)
        if ratio > best[0]:
            best = (ratio, k, family, p)
    ratio, k, family, p = best
    for scale in (0.5, 0.8, 1.25, 2.0):  # local: move the winner towards / away from p0
        q = np.clip(p0 + scale * (p - p0), 0, None)
        q /= q.sum()
        with np.errstate(divide="ignore"):
            r, kk = ar_ratio(others, np.log(q), lp0, mechanism, charged, unmollified=unmollified)
        if r > ratio:
            ratio, k, p = r, kk, q
    with np.errstate(divide="ignore"):
        member = np.log(p)
    return WorstCase(ratio, k, family, evaluations + 4, member)


def pmixed_worst_case(
    lp0: np.ndarray,
    world: np.ndarray,
    cal: Calibration,
    *,
    member: int,
    replacement: np.ndarray | None,
    pair,
    rng: np.random.Generator,
    contexts: int = 2,
    evaluations: int = 120,
) -> tuple[dict, dict]:
    """(public, restricted) worst cases of one deployment at its audited contexts.

    (a) **query control**: the context whose pair is worst at the planned order, composed with
    itself T times (the adversary repeats its best prompt), next to the composition over the
    distinct contexts; (c) **the accountant's own worst case**: at the ``contexts`` worst
    contexts, the real public model and the real other members fixed, the member distribution that
    maximises exact/charged (``add_remove``: the AR curve), with the per-order ratio curve and
    the ε_pair of that member's pair asked T times.
    """
    from audit.exact import pair_laws, repeated_pair_epsilon

    k = list(cal.orders).index(cal.planned_order)
    order = np.argsort(-pair.per_query[:, k])
    law, other = pair_laws(world, lp0, cal, member=member, replacement=replacement)
    t = cal.config.query_budget
    worst = int(order[0])
    eps_repeat = repeated_pair_epsilon(law[worst], other[worst], t, pair.delta)
    charged = np.asarray(cal.per_query_rdp_add_remove)
    found = []
    for c in order[:contexts]:
        others = np.delete(world[c], member, axis=0)
        found.append(
            (int(c), worst_member(others, lp0[c], cal, charged, rng=rng, evaluations=evaluations))
        )
    c_best, best = max(found, key=lambda f: f[1].ratio)
    others = np.delete(world[c_best], member, axis=0)
    curve = _ratio_curve(others, best.member, lp0[c_best], cal, charged)
    # The adversary's best member at its best context, asked T times: (c)'s ε_pair.
    eps_best = repeated_pair_epsilon(*ar_laws(others, best.member, lp0[c_best], cal), t, pair.delta)
    public = {
        "query_control": {
            "times": t,
            "epsilon_pair": eps_repeat,
            "epsilon_pair_distinct_contexts": pair.epsilon_pair,
            "ratio_to_claim": None,
        },
        "optimised_member": {
            **best.to_json(),
            "contexts_searched": len(found),
            "relation": "add_remove (the member against its absence)",
            "per_order_ratio": curve,
            "epsilon_pair": eps_best,
            "epsilon_pair_times": t,
            "ratio_to_claim": None,
            "alarm": best.ratio > 1.0,
        },
    }
    restricted = {"query_control_context": worst, "optimised_context": c_best}
    return public, restricted


def _ratio_curve(others, member, lp0, cal, charged) -> list[float | None]:
    """exact / charged at every order (None where nothing is charged): the looseness curve."""
    return _curve(ar_divergence(others, member, lp0, cal), charged)


def _curve(d: np.ndarray, charged: np.ndarray) -> list[float | None]:
    return [float(x / c) if np.isfinite(c) and c > 0 else None for x, c in zip(d, charged)]


def configuration_worst_case(
    cal: Calibration,
    *,
    rng: np.random.Generator,
    starts: int = 150,
    refine: int = 5,
    iterations: int = 300,
    vocab: int = 3,
    relation: str = "add_remove",
) -> dict:
    """(d) The worst case of the configuration: p0, the N - 1 other members (one distribution,
    repeated) and member j chosen on a ``vocab``-token toy to maximise exact/charged (max over
    orders and both directions), by ``starts`` random softmax parameters then Nelder-Mead from the
    ``refine`` best. Public: the toy is synthetic. The winner is reported with its per-order
    ratio curve.

    ``relation``: ``"add_remove"`` (E against E without member j, charged the AR curve) or
    ``"replace_one"`` (member j against a replacement, also chosen, N fixed; charged the
    deployment's curve). RO is searched only where the claim covers it: an RO deployment, or
    reference mode, whose claim is the paper's, per record: with fixed partitions a record changes
    one member, and the paper's per-size loss bounds a replaced member (4βk, PMIXED_MATH.md §7).
    An AR-certified charge says nothing about RO (§3), so that pair is refused.
    """
    from scipy.optimize import minimize

    if relation not in ("add_remove", "replace_one"):
        raise ValueError(f"relation must be 'add_remove' or 'replace_one'. Found {relation!r}.")
    ro = relation == "replace_one"
    if ro and cal.certified and cal.config.relation != "replace_one":
        raise ValueError(
            "relation='replace_one' needs a replace_one deployment (or reference mode): an "
            "add_remove charge does not cover replacing a member."
        )
    n = cal.config.n_members
    charged = np.asarray(cal.per_query_rdp if ro else cal.per_query_rdp_add_remove)
    rows = 4 if ro else 3  # p0, others, member[, replacement]

    def toy(x: np.ndarray):
        z = np.clip(x.reshape(rows, vocab - 1), -30, 30)
        z = np.concatenate([z, np.zeros((rows, 1))], axis=1)
        lp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
        return lp[0], np.tile(lp[1], (n - 1, 1)), *lp[2:]

    def exact(lp0, others, member, *replacement) -> np.ndarray:
        if not ro:
            return ar_divergence(others, member, lp0, cal)
        law, other = ro_laws(others, member, replacement[0], lp0, cal)
        orders = np.asarray(cal.orders, np.float64)
        return np.maximum(
            renyi_divergence_log(law, other, orders), renyi_divergence_log(other, law, orders)
        )

    evaluations = 0

    def loss(x: np.ndarray) -> float:
        nonlocal evaluations
        evaluations += 1
        ratio, _ = _worst_order(exact(*toy(x)), charged, cal.orders)
        if not np.isfinite(ratio):
            raise RuntimeError(f"a toy with full support gave exact/charged {ratio}.")
        return -ratio

    xs = rng.normal(0.0, 3.0, size=(starts, rows * (vocab - 1)))
    ranked = sorted(range(starts), key=lambda i: loss(xs[i]))
    best = xs[ranked[0]]
    for i in ranked[:refine]:
        res = minimize(loss, xs[i], method="Nelder-Mead", options={"maxiter": iterations})
        if res.fun < loss(best):
            best = res.x
    dists = toy(best)
    d = exact(*dists)
    ratio, order = _worst_order(d, charged, cal.orders)
    lp0, others, member = dists[:3]
    toy_json = {  # synthetic, public ("member" alone names the restricted audited member)
        "p0": np.exp(lp0).tolist(),
        "others": np.exp(others[0]).tolist() if n > 1 else None,
        "candidate": np.exp(member).tolist(),
    }
    if ro:
        toy_json["replacement"] = np.exp(dists[3]).tolist()
    pair = "the member and its replacement" if ro else "the member"
    return {
        "searched": "the public distribution, the other members (one distribution) and "
        f"{pair} on a {vocab}-token toy; Nelder-Mead from the best {refine} of {starts} starts",
        "relation": relation,
        "members": n,
        "ratio": ratio,
        "order": order,
        "per_order_ratio": _curve(d, charged),
        "toy": toy_json,
        "evaluations": evaluations,
        "alarm": ratio > 1.0,
    }

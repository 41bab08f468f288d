"""Invariants 20-26 and 30 (PMIXED_MATH.md §13): sampler, exact law, end-to-end neighbour tests."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest, chisquare

from pmixed import PMixEDConfig, exact_released_law, mollify, neighbour_divergence, step
from pmixed.mechanism import release_log, release_log_many, sample_subset, sample_token
from pmixed.mollifier import solve_lambdas
from pmixed.standard_modes import R2_MEMBER, R2_PUBLIC
from tests.pmixed.strategies import ensemble, log_uniform

ORDERS = tuple(range(2, 9))
Q_GRID = (0.03, 0.1, 0.3, 0.6)


def config(q=0.3, n=4, mode="certified", **kw):
    if mode == "capped":
        kw.setdefault("lambda_max", 0.3)
    return PMixEDConfig(
        n_members=n,
        sampling_rate=q,
        epsilon=8.0,
        delta=1e-5,
        query_budget=16,
        mode=mode,
        orders=kw.pop("orders", ORDERS),
        **kw,
    )


CALIBRATED = {
    (q, m): config(q, mode=m).calibrate() for q in Q_GRID for m in ("certified", "capped")
}


def logs(p):
    with np.errstate(divide="ignore"):
        return np.log(p)


# ------------------------------------------------------------------------------------- sampler


def test_subsets_have_no_duplicates_and_inclusion_frequency_is_q():
    g = np.random.default_rng(11)
    n, q, reps = 20, 0.3, 4000
    counts = np.zeros(n)
    sizes = []
    pair = 0
    for _ in range(reps):
        s = sample_subset(n, q, g)
        assert len(set(s.tolist())) == len(s)
        assert (np.diff(s) > 0).all()
        counts[s] += 1
        sizes.append(len(s))
        pair += (0 in s) and (1 in s)
    for c in counts:
        assert binomtest(int(c), reps, q).pvalue > 1e-4
    assert binomtest(pair, reps, q * q).pvalue > 1e-4  # pairwise independence
    observed = np.bincount(sizes, minlength=n + 1)
    from scipy.stats import binom

    expected = binom.pmf(np.arange(n + 1), n, q) * reps
    keep = expected > 5
    expected_kept = np.append(expected[keep], expected[~keep].sum())
    observed_kept = np.append(observed[keep], observed[~keep].sum())
    expected_kept *= observed_kept.sum() / expected_kept.sum()
    assert chisquare(observed_kept, expected_kept).pvalue > 1e-4


def test_same_seed_gives_the_same_subsets_and_tokens():
    rng = np.random.default_rng(0)
    pm, p0 = rng.dirichlet(np.ones(6), size=4), rng.dirichlet(np.ones(6))
    cal = CALIBRATED[(0.3, "certified")]
    runs = []
    for _ in range(2):
        g = np.random.default_rng(1234)
        runs.append([(r.token, tuple(r.subset)) for r in (step(pm, p0, cal, g) for _ in range(50))])
    assert runs[0] == runs[1]


def test_step_refuses_an_implicit_random_source():
    cal = CALIBRATED[(0.3, "certified")]
    p = np.full((4, 3), 1 / 3)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        step(p, p[0], cal, None)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        step(p, p[0], cal, np.random)


@pytest.mark.parametrize("draws", [3000, pytest.param(20000, marks=pytest.mark.slow)])
def test_acceptance_step_frequencies_pass_chi_square_against_the_exact_law(draws):
    """Draws through `step` (20000 under ``make test-all``); subsets never contain duplicates."""
    rng = np.random.default_rng(5)
    p0 = rng.dirichlet(np.ones(6))
    pm = rng.dirichlet(np.ones(6) * 0.4, size=4)
    cal = config(0.3).calibration_for_beta(0.02)
    lam = mollify(pm, p0, cal.constraints)
    assert (lam < 1).any() and (lam > 0).any()  # the mollifier is doing real work here
    law = exact_released_law(pm, p0, cal)
    g = np.random.default_rng(6)
    tokens = np.empty(draws, int)
    for t in range(tokens.size):
        r = step(pm, p0, cal, g)
        assert len(np.unique(r.subset)) == len(r.subset)
        tokens[t] = r.token
    counts = np.bincount(tokens, minlength=6)
    assert chisquare(counts, law * tokens.size).pvalue > 1e-3


def test_step_reports_the_charged_cost_and_a_distribution_inside_the_law_support():
    rng = np.random.default_rng(8)
    p0 = rng.dirichlet(np.ones(5))
    pm = rng.dirichlet(np.ones(5), size=4)
    cal = CALIBRATED[(0.6, "certified")]
    r = step(pm, p0, cal, np.random.default_rng(9))
    np.testing.assert_array_equal(r.cost, cal.per_query_rdp)
    assert r.distribution.sum() == pytest.approx(1.0, abs=1e-12)
    assert len(r.lambdas) == len(r.subset)


# ----------------------------------------------------------------------------------- exact law


def brute_force_law(pm, p0, cal, q):
    """Σ over all 2^N subsets of P(S) · mean_{i∈S} p̄_i (β_{|S|} in reference mode)."""
    n = len(pm)
    law = np.zeros_like(p0)
    for mask in itertools.product([0, 1], repeat=n):
        s = [i for i in range(n) if mask[i]]
        prob = q ** len(s) * (1 - q) ** (n - len(s))
        if not s:
            law += prob * p0
            continue
        lam = solve_lambdas(
            logs(pm[s]), np.broadcast_to(logs(p0), pm[s].shape), cal.constraints(len(s))
        )
        law += prob * (lam[:, None] * pm[s] + (1 - lam[:, None]) * p0).mean(axis=0)
    return law


@pytest.mark.parametrize("mode", ["certified", "capped", "reference"])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_closed_form_law_equals_enumeration_over_all_subsets(mode, n):
    rng = np.random.default_rng(n)
    p0 = rng.dirichlet(np.ones(5))
    pm = rng.dirichlet(np.ones(5) * 0.3, size=n)
    q = 0.3
    cal = config(q, n=n, mode=mode).calibrate()
    np.testing.assert_allclose(
        exact_released_law(pm, p0, cal), brute_force_law(pm, p0, cal, q), rtol=1e-12, atol=1e-15
    )


def test_with_replacement_sampler_has_the_same_law():
    """The paper code's Binomial count plus draws with replacement: enumerate every tuple."""
    from scipy.stats import binom

    n, q = 3, 0.4
    rng = np.random.default_rng(2)
    p0, pm = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(4) * 0.3, size=n)
    cal = config(q, n=n, mode="reference", reference_sampler="with_replacement").calibrate()
    law = binom.pmf(0, n, q) * p0
    for m in range(1, n + 1):
        for draw in itertools.product(range(n), repeat=m):
            rows = pm[list(draw)]
            lam = solve_lambdas(
                logs(rows), np.broadcast_to(logs(p0), rows.shape), cal.constraints(m)
            )
            mixed = (lam[:, None] * rows + (1 - lam[:, None]) * p0).mean(axis=0)
            law += binom.pmf(m, n, q) / n**m * mixed
    np.testing.assert_allclose(exact_released_law(pm, p0, cal), law, rtol=1e-12)


@settings(max_examples=100)
@given(ens=ensemble(max_n=4), q=st.sampled_from(Q_GRID), y=st.integers(0, 5))
def test_realised_mixture_loss_is_never_below_the_exact_law_loss(ens, q, y):
    """Invariant 26 (Jensen): E_S[−log p̄_S(y)] ≥ −log P_E(y)."""
    pm, p0 = ens
    y = y % p0.size
    cal = CALIBRATED[(q, "certified")]
    n = len(pm)
    expected_loss = 0.0
    for mask in itertools.product([0, 1], repeat=n):
        s = [i for i in range(n) if mask[i]]
        prob = q ** len(s) * (1 - q) ** (n - len(s))
        if s:
            lam = mollify(pm[s], p0, cal.constraints)
            mixed = (lam[:, None] * pm[s] + (1 - lam[:, None]) * p0).mean(axis=0)
        else:
            mixed = p0
        expected_loss += prob * -math.log(mixed[y])
    assert expected_loss >= -math.log(exact_released_law(pm, p0, cal)[y]) - 1e-12


# -------------------------------------------------------------------- end-to-end privacy tests


@st.composite
def calibrations(draw, mode):
    q = draw(st.sampled_from(Q_GRID) | st.floats(0.01, 0.95))
    if draw(st.booleans()) and (q, mode) in CALIBRATED:
        return CALIBRATED[(q, mode)]
    return config(q, mode=mode).calibration_for_beta(draw(log_uniform(1e-3, 1.0)))


@pytest.mark.parametrize("mode", ["certified", "capped"])
def test_exact_add_remove_divergence_never_exceeds_the_charged_cost(mode):
    """Invariant 23, acceptance: ≥ 2000 hypothesis examples per mode, random and adversarial."""

    @settings(max_examples=2000)
    @given(ens=ensemble(max_n=5), cal=calibrations(mode), data=st.data())
    def check(ens, cal, data):
        pm, p0 = ens
        j = data.draw(st.integers(0, len(pm) - 1))
        nd = neighbour_divergence(pm, p0, cal, member=j)
        tight = cal.add_remove_curve(ORDERS, tight=True)
        charged = cal.per_query_rdp
        slack = 1e-9 * np.maximum(charged, 1e-12)
        assert (nd.forward <= tight + slack).all(), (nd.forward, tight)
        assert (nd.backward <= charged + slack).all(), (nd.backward, charged)
        assert (nd.worst <= charged + slack).all()

    check()


def ro_bound(cal, n, orders):
    """min of the F3 pair bound and the F5 group-of-two bound (PMIXED_MATH.md §10)."""
    q = cal.config.sampling_rate
    w = -math.expm1(n * math.log1p(-q)) / n
    k = np.asarray(orders, float)
    pair = np.logaddexp(math.log1p(-w), math.log(w) + (k - 1) * cal.pair_bound(k)) / (k - 1)
    sub = cal.add_remove_curve(np.arange(2, 2 * int(k.max()) + 1), tight=False)
    at = lambda a: sub[np.asarray(a, int) - 2]  # noqa: E731
    group = (2 * k / (2 * k - 1)) * at(2 * k - 1) + at(2 * k)
    return np.minimum(pair, group)


@pytest.mark.parametrize("mode", ["certified", "capped"])
def test_exact_replace_one_divergence_never_exceeds_the_replace_one_bound(mode):
    """Invariant 25 on orders 2..8 (the group bound needs the AR curve up to order 16)."""

    @settings(max_examples=300)
    @given(ens=ensemble(max_n=4), other=ensemble(max_n=1), data=st.data())
    def check(ens, other, data):
        pm, p0 = ens
        q = data.draw(st.sampled_from(Q_GRID))
        beta = data.draw(log_uniform(1e-3, 1.0))
        cal = config(q, mode=mode, orders=tuple(range(2, 17))).calibration_for_beta(beta)
        v = p0.size
        repl = other[0][0][:v] if other[0].shape[1] >= v else np.full(v, 1.0 / v)
        repl = repl / repl.sum()
        nd = neighbour_divergence(pm, p0, cal, member=0, replacement=repl, orders=ORDERS)
        bound = ro_bound(cal, len(pm), ORDERS)
        assert (nd.worst <= bound * (1 + 1e-9) + 1e-15).all(), (nd.worst, bound)

    check()


def test_replace_one_can_exceed_the_add_remove_curve_so_it_needs_its_own_bound():
    """Regression for §3: at N = 1, q = 0.6, β = 0.01, |V| = 2 the exact RO divergence beats AR."""
    cal = config(0.6, n=1, orders=tuple(range(2, 17))).calibration_for_beta(0.01)
    p0 = np.array([0.5, 0.5])
    worst = 0.0
    for a in np.linspace(0.01, 0.99, 25):
        for b in np.linspace(0.01, 0.99, 25):
            nd = neighbour_divergence(
                [[a, 1 - a]], p0, cal, member=0, replacement=[b, 1 - b], orders=[2]
            )
            worst = max(worst, nd.worst[0] / cal.per_query_rdp_add_remove[0])
    assert worst > 1.5


# ------------------------------------------------------------- reference mode: known defects


def reference(n, alpha=6, q=0.1):
    """Per-query budget r_q = 0.05 at α = 6 (ε_RDP = ε − 1.762 at δ = 1e-5, T = 100)."""
    return PMixEDConfig(
        n_members=n,
        sampling_rate=q,
        epsilon=6.7617,
        delta=1e-5,
        query_budget=100,
        mode="reference",
        reference_alpha=alpha,
        orders=ORDERS,
    ).calibrate()


def test_reference_r1_single_order_check_misses_a_rare_token_blowup():
    """R1: both members pass the order-3 check, yet D_3 between them is 6.91 ≫ 4τ.

    A certified mollifier at the same β keeps the pair within its 4βk bound.
    """
    r, big_k, alpha = 1e4, 1e6, 3
    e = big_k * r ** (1 - 2 * alpha)
    p0 = np.array([1 - e, e])
    p, p2 = np.array([1 - r * e, r * e]), np.array([1 - e / r, e / r])
    cal = PMixEDConfig(
        n_members=2, sampling_rate=0.03, epsilon=8, delta=1e-5, query_budget=1024, mode="reference"
    ).calibrate()
    tau = cal.beta_for(2) * alpha
    lam = mollify(np.stack([p, p2]), p0, cal.constraints)
    assert (lam == 1.0).all()
    from pmixed import renyi_divergence

    d_pair = renyi_divergence(p, p2, 3)[0]
    assert d_pair == pytest.approx(6.91, abs=0.01)
    assert d_pair > 2 * 4 * tau  # the claim: D_3 ≤ 4τ between two members that pass the check
    cert = PMixEDConfig(n_members=2, sampling_rate=0.03, epsilon=8, delta=1e-5, query_budget=1024)
    cert_cal = cert.calibration_for_beta(cal.beta_for(2))
    lam_c = mollify(np.stack([p, p2]), p0, cert_cal.constraints)
    bars = lam_c[:, None] * np.stack([p, p2]) + (1 - lam_c[:, None]) * p0
    assert renyi_divergence(bars[0], bars[1], 3)[0] <= 4 * cert_cal.beta * 3


def test_reference_r2_exact_divergence_exceeds_its_own_claim():
    """R2: β from the realised size. N = 1, |V| = 3, α = 6, q = 0.1; ratio ≈ 3.9 > 2."""
    pm, p0 = np.array([R2_MEMBER]), np.array(R2_PUBLIC)
    pm, p0 = pm / pm.sum(), p0 / p0.sum()
    cal = reference(1)
    nd = neighbour_divergence(pm, p0, cal, member=0, orders=[6])
    claim = cal.per_query_rdp[ORDERS.index(6)]
    assert nd.worst[0] / claim > 2.0
    assert cal.status == "UNCERTIFIED"


def test_reference_mode_violation_is_found_by_a_hypothesis_search():
    """Invariant 24: a search over N ≤ 5, |V| ≤ 5, α = 6, q = 0.1 finds a ratio > 1."""
    cals = {n: reference(n) for n in range(1, 6)}
    claim = cals[1].per_query_rdp[ORDERS.index(6)]

    def ratio(ens):
        pm, p0 = ens
        return neighbour_divergence(pm, p0, cals[len(pm)], member=0, orders=[6]).worst[0] / claim

    found = find(
        ensemble(max_n=5, max_v=5, adversarial=False),
        lambda ens: ratio(ens) > 1.0,
        settings=settings(max_examples=2000, database=None),
    )
    assert ratio(found) > 1.0


def _words(x, n=3):
    """The first n 64-bit words of the binary expansion of x in [0, 1) (a Fraction)."""
    out = []
    for _ in range(n):
        x *= 2**64
        out.append(int(x))
        x -= int(x)
    return out


def test_a_token_below_half_an_ulp_of_its_prefix_is_released_with_its_exact_probability():
    """Mass 0.35·2^-53 next to mass 1/2: a float64 cumulative sum absorbs it (0.5 + tiny rounds to
    0.5), so inverse CDF with a 53-bit uniform never releases it, while a neighbour that raises it
    makes it releasable: an infinite Rényi divergence. The exact sampler releases it exactly on
    X ∈ [S_0/S, S_1/S), whose measure is its probability."""
    from fractions import Fraction

    from pmixed.mechanism import draw_index

    tiny = 0.35 * 2.0**-53
    w = np.array([1.0, 2 * tiny, 1.0])  # weights of masses 1/2, 0.35·2^-53, 1/2 (max = 1)
    assert np.cumsum(w)[1] == np.cumsum(w)[0]  # the float64 CDF gives token 1 no room at all
    s0, s1 = Fraction(1), 1 + Fraction(2 * tiny)
    total = s1 + 1
    inside = (s0 + s1) / 2 / total  # the middle of token 1's interval of X
    for x, expected in [
        (inside, 1),
        (s0 / total - Fraction(1, 2**140), 0),
        (s1 / total + Fraction(1, 2**140), 2),
        (Fraction(1, 7), 0),
        (Fraction(6, 7), 2),
    ]:
        words = iter(_words(x))
        assert draw_index(w, words.__next__) == expected
    assert (s1 - s0) / total == Fraction(2 * tiny) / total  # the released probability, exactly


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.integers(0, 2**32))
def test_exact_and_fast_paths_agree(weights, seed):
    """The slow exact path and the float fast path pick the same index for the same uniform."""
    from pmixed.mechanism import _draw_exact, draw_index

    w = np.array(weights + [1.0])
    g = np.random.default_rng(seed)
    words = [int(v) for v in g.integers(0, 2**64, size=8, dtype=np.uint64)]
    a, b = iter(words), iter(words[1:])
    fast = draw_index(w, lambda: next(a))
    assert fast == _draw_exact(w, words[0], lambda: next(b))
    assert w[fast] > 0  # a zero weight is never drawn


def test_the_sampler_matches_its_law():
    p = np.array([0.5, 0.3, 0.15, 0.049, 0.001])
    g = np.random.default_rng(11)
    counts = np.bincount([sample_token(np.log(p), g) for _ in range(20000)], minlength=5)
    assert chisquare(counts, 20000 * p).pvalue > 1e-3


@pytest.mark.parametrize("mode", ["certified", "reference"])
def test_queries_released_together_get_the_token_lambdas_and_law_they_get_alone(mode):
    """release_log_many solves every query's rows in one mollifier call (per constraint set:
    reference mode's depends on the subset size) and must not change any query's outcome."""
    rng = np.random.default_rng(5)
    cal = config(0.3, mode=mode).calibrate()
    v = 300
    queries = []
    for m in (0, 1, 3, 2, 3):
        lp0 = logs(rng.dirichlet(np.ones(v)))
        queries.append((lp0 + rng.normal(0, 1.0, (m, v)), lp0))
    queries = [(lp - np.logaddexp.reduce(lp, axis=-1, keepdims=True), lp0) for lp, lp0 in queries]
    together = release_log_many(queries, cal, [np.random.default_rng(i) for i in range(5)])
    for i, (lp, lp0) in enumerate(queries):
        token, lam, lmix = release_log(lp, lp0, cal, np.random.default_rng(i))
        assert together[i][0] == token
        assert np.array_equal(together[i][1], lam)  # bit for bit
        assert np.array_equal(together[i][2], lmix)
    assert len({t for t, _, _ in together}) > 1

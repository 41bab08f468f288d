"""Invariants 6-12 (PMIXED_MATH.md §13) for pmixed.mollifier, against a slow scalar reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed import PMixEDConfig, mollify
from pmixed._checks import as_log_distribution
from pmixed.divergence import renyi_divergence_log
from pmixed.mollifier import mix_log
from pmixed.mollifier_bisection import solve_lambdas_bisection
from pmixed.mollifier_reference import halvings, reference_lambdas
from tests.pmixed.strategies import ensemble, log_uniform, simplex

SMALL = dict(n_members=5, sampling_rate=0.1, epsilon=8.0, delta=1e-5, query_budget=64)
ORDERS = tuple(range(2, 9))


def calibration(beta, mode="certified", **kw):
    extra = {"lambda_max": kw.pop("lambda_max", 0.3)} if mode == "capped" else {}
    cfg = PMixEDConfig(**SMALL, mode=mode, orders=ORDERS, **extra, **kw)
    return cfg.calibration_for_beta(beta)


def logs(p):
    """Normalised log-probabilities, as the library derives them from its inputs."""
    return as_log_distribution(p, "p")


def divergences(lp, lp0, lam, cons):
    """D of every constraint at λ, straight from the definition."""
    lpbar = mix_log(lp, lp0, np.array(lam))
    out = []
    for g, fwd in zip(cons.orders, cons.forward):
        a, b = (lpbar, lp0) if fwd else (lp0, lpbar)
        out.append(renyi_divergence_log(a, b, g)[0])
    return np.array(out)


def feasible(lp, lp0, lam, cons):
    return lam == 0 or bool((divergences(lp, lp0, lam, cons) <= np.array(cons.radii)).all())


def scalar_reference(lp, lp0, cons, n_iter=60):
    """Obviously-correct bisection: every constraint checked at every step."""
    if feasible(lp, lp0, cons.lambda_cap, cons):
        return cons.lambda_cap
    lo, hi = 0.0, cons.lambda_cap
    for _ in range(n_iter):
        mid = lo + (hi - lo) / 2
        lo, hi = (mid, hi) if feasible(lp, lp0, mid, cons) else (lo, mid)
    return lo


def modes():
    return st.sampled_from(["certified", "capped", "coarse"])


def make(mode, beta):
    if mode == "coarse":
        return calibration(beta, constraint_grid="coarse")
    return calibration(beta, mode)


def assert_feasible_and_maximal(pm, p0, lam, cons):
    """Every constraint holds at λ, and λ is the cap or some constraint fails 1e-9 above it."""
    for i, l in enumerate(lam):
        lp, lp0 = logs(pm[i]), logs(p0)
        assert 0.0 <= l <= cons.lambda_cap
        assert feasible(lp, lp0, l, cons)
        if l < cons.lambda_cap:
            assert not feasible(lp, lp0, min(l + 1e-9, cons.lambda_cap), cons)


@settings(max_examples=300)
@given(ens=ensemble(max_n=4, max_v=12), beta=log_uniform(1e-3, 1.0), mode=modes())
def test_lambda_is_feasible_and_maximal_to_1e_9(ens, beta, mode):
    pm, p0 = ens
    cal = make(mode, beta)
    assert_feasible_and_maximal(pm, p0, mollify(pm, p0, cal.constraints), cal.constraints(len(pm)))


def _oracle(pm, p0, cal):
    """λ from the previous bisection solver (:mod:`pmixed.mollifier_bisection`)."""
    lp = logs(pm)
    lp0 = np.broadcast_to(logs(p0), lp.shape)
    return solve_lambdas_bisection(lp, lp0, cal.constraints(len(pm)))


@settings(max_examples=300)
@given(ens=ensemble(max_n=4, max_v=12), beta=log_uniform(1e-3, 1.0), mode=modes())
def test_fast_solver_equals_the_bisection_oracle_and_both_are_feasible_and_maximal(ens, beta, mode):
    pm, p0 = ens
    cal = make(mode, beta)
    new, old = mollify(pm, p0, cal.constraints), _oracle(pm, p0, cal)
    np.testing.assert_allclose(new, old, atol=1e-10, rtol=0)
    assert_feasible_and_maximal(pm, p0, old, cal.constraints(len(pm)))


def lm_rows(rng, v, scale, m=3):
    logits0 = -1.1 * np.log(rng.permutation(v) + 1.0) + 0.3 * rng.standard_normal(v)
    logits = logits0 + scale * rng.standard_normal((m, v))
    p0, pm = np.exp(logits0), np.exp(logits)
    return pm / pm.sum(axis=1, keepdims=True), p0 / p0.sum()


@pytest.mark.parametrize("v", [2048, 50257])
def test_fast_solver_equals_the_oracle_on_lm_sized_vocabularies(v):
    rng = np.random.default_rng(v)
    cfg = PMixEDConfig(n_members=16, sampling_rate=0.15, epsilon=8.0, delta=1e-5, query_budget=256)
    cases = [(0.05, None), (0.5, None), (2.0, None), (0.5, 0.3), (2.0, 1e-3)]
    for scale, beta in cases[: 5 if v < 10_000 else 2]:
        pm, p0 = lm_rows(rng, v, scale)
        for mode in ("certified", "capped"):
            extra = {"lambda_max": 0.3} if mode == "capped" else {}
            c = dataclasses.replace(cfg, mode=mode, **extra)
            cal = c.calibrate() if beta is None else c.calibration_for_beta(beta)
            np.testing.assert_allclose(
                mollify(pm, p0, cal.constraints), _oracle(pm, p0, cal), atol=1e-10
            )


@pytest.mark.parametrize("v", [2048, 50257])
def test_the_guess_names_the_binding_constraint_so_newton_needs_at_most_four_evaluations(
    v, monkeypatch
):
    """The row summary steers the search: one target, a few Newton evaluations, one certificate
    (before it, the search certified 3-4 targets in turn: 15-16 evaluations per row)."""
    import pmixed.mollifier as moll

    calls = {"log_gap": 0, "certify": 0}
    for name in calls:
        original = getattr(moll._Search, name)

        def counted(self, *a, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, *a)

        monkeypatch.setattr(moll._Search, name, counted)
    rng = np.random.default_rng(v + 1)
    cal = PMixEDConfig(
        n_members=16, sampling_rate=0.15, epsilon=8.0, delta=1e-5, query_budget=256
    ).calibrate()
    for scale in (0.7, 1.0, 1.5):  # at 2.5 (λ ≈ 1e-3) the guess can name a neighbouring order
        pm, p0 = lm_rows(rng, v, scale, m=3)
        calls.update(log_gap=0, certify=0)
        lam = mollify(pm, p0, cal.constraints)
        assert (lam < 1.0).all()  # a constraint binds, so the search runs
        assert calls == {"log_gap": calls["log_gap"], "certify": 1}
        assert calls["log_gap"] <= 4


def test_a_members_lambda_does_not_depend_on_the_other_rows_solved_with_it():
    rng = np.random.default_rng(11)
    cal = PMixEDConfig(
        n_members=16, sampling_rate=0.15, epsilon=8.0, delta=1e-5, query_budget=256
    ).calibrate()
    for v in (12, 4096):
        pm, p0 = lm_rows(rng, v, 1.0, m=6)
        together = mollify(pm, p0, cal.constraints)
        for i in range(6):
            for others in ([], [j for j in range(6) if j != i][:2]):
                alone = mollify(pm[[i, *others]], p0, cal.constraints)[0]
                assert alone == together[i]  # bit for bit


@settings(max_examples=200)
@given(ens=ensemble(max_n=4, max_v=12), beta=log_uniform(1e-3, 1.0), mode=modes())
def test_returned_lambda_leaves_a_relative_margin_below_every_constraint(ens, beta, mode):
    pm, p0 = ens
    cal = make(mode, beta)
    cons = cal.constraints(len(pm))
    radii = np.array(cons.radii)
    for p, lam in zip(pm, mollify(pm, p0, cal.constraints)):
        d = divergences(logs(p), logs(p0), lam, cons)
        assert (
            d <= radii - np.maximum(0.5e-11 * radii, 0.5e-14 / (np.array(cons.orders) - 1))
        ).all()


@settings(max_examples=60)
@given(ens=ensemble(max_n=3, max_v=8), beta=log_uniform(1e-3, 1.0), mode=modes())
def test_vectorised_solver_equals_the_scalar_reference(ens, beta, mode):
    pm, p0 = ens
    cal = make(mode, beta)
    cons = cal.constraints(len(pm))
    expected = [scalar_reference(logs(p), logs(p0), cons) for p in pm]
    np.testing.assert_allclose(mollify(pm, p0, cal.constraints), expected, atol=1e-10)


@settings(max_examples=200)
@given(ens=ensemble(max_n=4, max_v=12), beta=log_uniform(1e-3, 1.0))
def test_lambda_is_at_least_the_closed_form_start_and_nondecreasing_in_beta(ens, beta):
    pm, p0 = ens
    cal = calibration(beta)
    lam = mollify(pm, p0, cal.constraints)
    cons = cal.constraints(len(pm))
    orders, radii = np.array(cons.orders), np.array(cons.radii)
    for i, p in enumerate(pm):
        d1 = divergences(logs(p), logs(p0), 1.0, cons)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            ratio = np.expm1((orders - 1) * radii) / np.expm1((orders - 1) * d1)
        ratio = np.where(d1 <= radii, np.inf, np.nan_to_num(ratio, nan=0.0))
        assert lam[i] >= min(1.0, ratio.min()) - 1e-12
    assert (mollify(pm, p0, calibration(beta * 1.5).constraints) >= lam - 1e-12).all()


@given(p0=simplex(max_v=200, zeros=False), beta=log_uniform(1e-3, 1.0), mode=modes())
def test_lambda_is_the_cap_when_the_member_equals_the_public_model(p0, beta, mode):
    cal = make(mode, beta)
    lam = mollify(np.stack([p0, p0]), p0, cal.constraints)
    assert (lam == cal.constraints(2).lambda_cap).all()


@given(p0=simplex(min_v=3, max_v=50, zeros=False), beta=log_uniform(1e-3, 1.0), mode=modes())
def test_lambda_is_zero_when_the_member_leaves_the_public_support(p0, beta, mode):
    p0 = p0.copy()
    p0[0] = 0.0
    p0 /= p0.sum()
    member = np.full_like(p0, 1.0 / p0.size)
    assert mollify(member[None], p0, make(mode, beta).constraints)[0] == 0.0


@settings(max_examples=150)
@given(ens=ensemble(max_n=4, max_v=10), beta=log_uniform(1e-3, 1.0))
def test_coarse_grid_lambda_is_smaller_and_meets_every_integer_constraint(ens, beta):
    pm, p0 = ens
    fine, coarse = calibration(beta), calibration(beta, constraint_grid="coarse")
    lam_fine, lam_coarse = mollify(pm, p0, fine.constraints), mollify(pm, p0, coarse.constraints)
    assert (lam_coarse <= lam_fine + 1e-12).all()
    for i, p in enumerate(pm):
        assert feasible(logs(p), logs(p0), lam_coarse[i], fine.constraints(len(pm)))


@settings(max_examples=100)
@given(ens=ensemble(max_n=4, max_v=10), beta=log_uniform(1e-3, 1.0), data=st.data())
def test_solver_is_equivariant_under_permutations_of_members_and_vocabulary(ens, beta, data):
    pm, p0 = ens
    cal = calibration(beta)
    lam = mollify(pm, p0, cal.constraints)
    rows = data.draw(st.permutations(range(len(pm))))
    cols = data.draw(st.permutations(range(p0.size)))
    permuted = mollify(pm[np.ix_(rows, cols)], p0[cols], cal.constraints)
    np.testing.assert_allclose(permuted, lam[rows], atol=1e-12)


def test_batch_axes_are_solved_independently():
    rng = np.random.default_rng(3)
    pm = rng.dirichlet(np.ones(6) * 0.3, size=(2, 3))
    p0 = rng.dirichlet(np.ones(6), size=2)
    cal = calibration(0.05)
    lam = mollify(pm, p0, cal.constraints)
    assert lam.shape == (2, 3)
    np.testing.assert_allclose(lam[1], mollify(pm[1], p0[1], cal.constraints), atol=1e-15)


@settings(max_examples=150)
@given(ens=ensemble(max_n=4, max_v=10), beta=log_uniform(1e-3, 1.0), mode=modes())
def test_mollified_members_and_mixture_are_probability_vectors_within_the_ball(ens, beta, mode):
    pm, p0 = ens
    cal = make(mode, beta)
    lam = mollify(pm, p0, cal.constraints)
    pbar = lam[:, None] * pm + (1 - lam[:, None]) * p0
    assert np.abs(pbar.sum(axis=1) - 1).max() <= 1e-12
    assert (pbar >= (1 - lam[:, None]) * p0 - 1e-18).all()
    mixture = pbar.mean(axis=0)
    cons = cal.constraints(len(pm))
    d = divergences(logs(mixture), logs(p0), 1.0, cons)
    assert (d <= np.array(cons.radii) * (1 + 1e-9) + 1e-15).all()
    if mode == "capped":
        assert (lam <= 0.3).all()


@settings(max_examples=100)
@given(ens=ensemble(max_n=1, max_v=10), beta=log_uniform(1e-3, 1.0))
def test_constraint_divergences_are_nondecreasing_in_lambda(ens, beta):
    pm, p0 = ens
    cons = calibration(beta).constraints(1)
    grid = np.linspace(0, 1, 21)
    values = np.array([divergences(logs(pm[0]), logs(p0), g, cons) for g in grid])
    finite = np.isfinite(values).all(axis=1)
    values = values[finite]
    assert values[0] == pytest.approx(np.zeros(len(cons.orders)), abs=1e-12)
    assert (np.diff(values, axis=0) >= -1e-12).all()


def test_reference_lambda_is_the_lower_end_after_20_halvings():
    cfg = PMixEDConfig(**SMALL, mode="reference")
    cal = cfg.calibrate()
    rng = np.random.default_rng(7)
    p0 = rng.dirichlet(np.ones(8))
    pm = rng.dirichlet(np.ones(8) * 0.2, size=2)
    tau = cal.beta_for(2) * 3
    lam = mollify(pm, p0, cal.constraints)

    def excess(p, x):
        pbar = x * p + (1 - x) * p0
        d = max(
            renyi_divergence_log(logs(pbar), logs(p0), 3)[0],
            renyi_divergence_log(logs(p0), logs(pbar), 3)[0],
        )
        return d - tau

    for p, got in zip(pm, lam):
        if excess(p, 1.0) <= 0:
            assert got == 1.0
            continue
        lo, hi = 0.0, 1.0
        for _ in range(20):
            mid = lo + (hi - lo) / 2
            lo, hi = (mid, hi) if excess(p, mid) * excess(p, lo) > 0 else (lo, mid)
        assert got == lo


@settings(max_examples=150, deadline=None)
@given(
    ens=ensemble(max_n=4, max_v=40),
    scales=st.lists(log_uniform(1e-4, 10.0), min_size=1, max_size=4),
)
def test_reference_newton_reproduces_the_halvings_for_every_radius(ens, scales):
    pm, p0 = ens
    lp, lp0 = logs(pm), np.broadcast_to(logs(p0), pm.shape)
    radii = np.array([[r, r] for r in scales])
    args = (np.array([3.0, 3.0]), radii, np.array([True, False]))
    fast = reference_lambdas(lp, lp0, *args, 20, 1.0)
    for s in range(len(scales)):
        literal = halvings(
            lp, lp0, args[0], np.repeat(radii[s : s + 1], len(pm), 0), args[2], 20, 1.0
        )
        np.testing.assert_array_equal(fast[s], literal)


def test_reference_lambdas_by_size_at_lm_scale_equal_the_halvings_in_a_few_evaluations(
    monkeypatch,
):
    import pmixed.mollifier_reference as ref
    from pmixed.mechanism import lambdas_by_size

    rng = np.random.default_rng(3)
    n, v = 12, 2048
    lp0 = rng.normal(size=v) * 3
    lp0 -= np.logaddexp.reduce(lp0)
    lp = lp0 + rng.normal(size=(n, v)) * rng.uniform(0.2, 3.0, size=(n, 1))
    lp -= np.logaddexp.reduce(lp, axis=1, keepdims=True)
    cfg = PMixEDConfig(
        n_members=n,
        sampling_rate=0.05,
        epsilon=8.0,
        delta=1e-5,
        query_budget=1024,
        mode="reference",
    )
    cal = cfg.calibrate()
    rows = {"n": 0}
    real = ref._divergences

    def counted(t, *a, **k):
        rows["n"] += t.shape[0]
        return real(t, *a, **k)

    monkeypatch.setattr(ref, "_divergences", counted)
    got = lambdas_by_size(lp, lp0, cal)
    per_pair = rows["n"] / (n * n)
    monkeypatch.setattr(ref, "_divergences", real)
    cons = [cal.constraints(m) for m in range(1, n + 1)]
    lp0_rows = np.broadcast_to(lp0, lp.shape)
    for m, c in enumerate(cons):
        orders, radii, fwd = c.arrays()
        literal = halvings(lp, lp0_rows, orders, np.repeat(radii[None], n, 0), fwd, 20, 1.0)
        np.testing.assert_array_equal(got[m], literal)
    assert ((got > 0) & (got < 1)).mean() > 0.5  # the test exercises the search, not the cap
    assert per_pair <= 8, per_pair  # the halvings evaluate 21 points per (size, member)


def test_bad_member_distribution_raises_naming_the_parameter():
    cal = calibration(0.1)
    with pytest.raises(ValueError, match="p_members rows must sum to 1"):
        mollify([[0.5, 0.6]], [0.5, 0.5], cal.constraints)
    with pytest.raises(ValueError, match="p_public must contain probabilities"):
        mollify([[0.5, 0.5]], [np.nan, 1.0], cal.constraints)


def test_a_member_with_exact_zeros_where_the_public_model_has_mass_is_solved_like_the_oracle():
    """t = log(p/p0) = −inf there: the guess's summary must pool it, not turn it into NaN."""
    rng = np.random.default_rng(3)
    cal = PMixEDConfig(
        n_members=16, sampling_rate=0.15, epsilon=8.0, delta=1e-5, query_budget=256
    ).calibrate()
    pm, p0 = lm_rows(rng, 4096, 1.0, m=3)
    pm[:, rng.choice(4096, 500, replace=False)] = 0.0
    pm /= pm.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(mollify(pm, p0, cal.constraints), _oracle(pm, p0, cal), atol=1e-10)

"""The exact pair audit: PLD anchors, soundness of the certified claim, the reference counterexample."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize

from audit.exact import _chi2, conformance, exact_pair_audit, pair_epsilon
from pmixed import PMixEDConfig
from pmixed.amplification import rdp_to_epsilon
from pmixed.standard_modes import R2_ALPHA, R2_MEMBER, R2_PUBLIC, R2_SETTINGS
from tests.pmixed.strategies import ensemble

ORDERS = tuple(range(2, 9))


def rr_pair(eps):
    a = math.exp(eps) / (1 + math.exp(eps))
    return np.log([[a, 1 - a]]), np.log([[1 - a, a]])


def test_randomized_response_anchor():
    """AUDIT.md §7.3: RR with ε = 1 gives 1.000, and 10-fold composition gives 10.0."""
    law, other = rr_pair(1.0)
    assert pair_epsilon(law, other, 0.0) == pytest.approx(1.0, abs=5e-4)
    assert round(pair_epsilon(law, other, 1e-5), 3) == 1.000
    assert pair_epsilon(np.repeat(law, 10, 0), np.repeat(other, 10, 0), 0.0) == pytest.approx(
        10.0, abs=5e-3
    )


def exact_epsilon(lp, lq, delta):
    """ε(δ) of one pair by the hockey-stick divergence, both orders (independent of dp-accounting)."""
    p, q = np.exp(lp), np.exp(lq)

    def hs(e):
        return max(
            np.maximum(p - math.exp(e) * q, 0).sum(), np.maximum(q - math.exp(e) * p, 0).sum()
        )

    if hs(0.0) <= delta:
        return 0.0
    return optimize.brentq(lambda e: hs(e) - delta, 0.0, 50.0, xtol=1e-12)


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1e-5, 1e-2]))
def test_pair_epsilon_is_a_lower_bound_within_discretisation(seed, delta):
    rng = np.random.default_rng(seed)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    lb = pair_epsilon(np.log(p)[None], np.log(q)[None], delta)
    ex = exact_epsilon(np.log(p), np.log(q), delta)
    assert lb <= ex + 1e-9 and lb >= ex - 2e-3


def cal(mode="certified", n=4, q=0.1, relation="add_remove", **kw):
    if mode == "capped":
        kw.setdefault("lambda_max", 0.3)
    return PMixEDConfig(
        n_members=n,
        sampling_rate=q,
        epsilon=8.0,
        delta=1e-5,
        query_budget=16,
        mode=mode,
        relation=relation,
        orders=ORDERS,
        **kw,
    ).calibrate()


CALS = {
    (m, r): cal(m, relation=r)
    for m in ("certified", "capped")
    for r in ("add_remove", "replace_one")
}


@settings(max_examples=40)
@given(st.sampled_from(sorted(CALS)), st.data())
def test_certified_exact_pair_never_exceeds_the_charged_cost(key, data):
    """Issue acceptance: for PMixED certified the exact per-query RDP never exceeds the charge."""
    c = CALS[key]
    t = data.draw(st.integers(1, 3))
    ctx = [data.draw(ensemble(max_n=4, max_v=6)) for _ in range(t)]
    v = min(len(p0) for _, p0 in ctx)
    ctx = [(pm[:, :v] + 1e-12, p0[:v] + 1e-12) for pm, p0 in ctx]
    lp = np.stack([np.log(np.resize(pm / pm.sum(1, keepdims=True), (4, v))) for pm, _ in ctx])
    lp0 = np.stack([np.log(p0 / p0.sum()) for _, p0 in ctx])
    for replacement in (None, lp0):
        pair = exact_pair_audit(lp, lp0, c, member=0, replacement=replacement)
        if not pair.comparable:
            assert pair.relation == "replace_one" and c.config.relation == "add_remove"
            continue
        assert not pair.alarm and pair.worst_ratio <= 1 + 1e-9
        claim, _ = rdp_to_epsilon(np.asarray(ORDERS, float), pair.charged_per_query * t, 1e-5)
        assert pair.epsilon_pair <= claim


@pytest.mark.parametrize("mode", ["certified", "capped", "reference"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_shared_lambdas_give_the_same_laws_as_computing_each_world_alone(mode, n):
    from audit.exact import _laws
    from pmixed.mechanism import exact_released_log_law

    c = PMixEDConfig(
        n_members=n,
        sampling_rate=0.1,
        epsilon=8.0,
        delta=1e-5,
        query_budget=16,
        mode=mode,
        orders=ORDERS,
        **({"lambda_max": 0.3} if mode == "capped" else {}),
    ).calibrate()
    rng = np.random.default_rng(n)
    lp = np.log(rng.dirichlet(np.full(5, 0.3), size=(2, n)))
    lp0 = np.log(rng.dirichlet(np.ones(5), size=2))
    rep = np.log(rng.dirichlet(np.full(5, 0.3), size=2))
    for j in range(n):
        for replacement in (None, rep):
            law, other = _laws(lp, lp0, c, j, replacement)
            for t in range(2):
                rows = np.delete(lp[t], j, 0) if replacement is None else lp[t].copy()
                if replacement is not None:
                    rows[j] = rep[t]
                assert np.allclose(law[t], exact_released_log_law(lp[t], lp0[t], c), atol=1e-12)
                assert np.allclose(other[t], exact_released_log_law(rows, lp0[t], c), atol=1e-12)


def test_reference_mode_counterexample_raises_the_alarm():
    """PMIXED_MATH.md R2 (N = 1, |V| = 3, α = 6, q = 0.1): the exact D_6 is about 3.9x the claim."""
    pm, p0 = np.array([R2_MEMBER]), np.array(R2_PUBLIC)
    pm, p0 = pm / pm.sum(), p0 / p0.sum()
    c = PMixEDConfig(**R2_SETTINGS, mode="reference", reference_alpha=R2_ALPHA).calibrate()
    pair = exact_pair_audit(np.log(pm)[None], np.log(p0)[None], c, member=0)
    assert pair.alarm and pair.worst_ratio > 2.0 and pair.status == "UNCERTIFIED"
    assert pair.to_json()["alarm"] is True


def test_real_sampler_conforms_to_the_exact_law_and_the_test_has_power():
    rng = np.random.default_rng(0)
    c = cal("certified", n=3)
    pm = rng.dirichlet(np.ones(5), size=3)
    p0 = rng.dirichlet(np.ones(5))
    res = conformance(np.log(pm), np.log(p0), c, n_samples=3000, rng=rng)
    assert res["token_p_value"] > 1e-3 and res["subset_size_p_value"] > 1e-3
    assert res["duplicate_members"] == 0
    wrong = np.bincount(rng.choice(5, 3000, p=p0), minlength=5)  # the public law alone
    law = np.exp(np.log(pm).mean(0))
    assert _chi2(wrong, law / law.sum()) < 1e-6


def test_shapes_are_checked():
    c = cal()
    with pytest.raises(ValueError, match="disagree"):
        exact_pair_audit(np.zeros((2, 4, 3)), np.zeros((3, 3)), c, member=0)
    with pytest.raises(ValueError, match="member must be"):
        exact_pair_audit(np.log(np.full((1, 4, 2), 0.5)), np.log(np.full((1, 2), 0.5)), c, member=7)


def test_game_target_is_in_the_band_and_maximises_the_poisoned_divergence():
    from audit.game import GamePlan, _poisoned, choose_target

    c = cal("certified", n=3, relation="replace_one")
    rng = np.random.default_rng(3)
    lp0 = np.log(rng.dirichlet(np.full(40, 0.2)))
    lps = np.log(rng.dirichlet(np.ones(40), size=3))
    plan = GamePlan(band=(1e-4, 1e-2), candidates=40)
    y = choose_target(lp0, lps, c, 0, plan)
    p0 = np.exp(lp0)
    assert 1e-4 <= p0[y] <= 1e-2
    k = c.orders.index(c.planned_order)

    def d(t):
        return exact_pair_audit(
            lps[None], lp0[None], c, member=0, replacement=_poisoned(lp0, t)[None]
        ).per_query[0, k]

    band = [t for t in range(40) if 1e-4 <= p0[t] <= 1e-2]
    assert d(y) == max(d(t) for t in band)
    with pytest.raises(ValueError, match="no token has p0"):
        choose_target(lp0, lps, c, 0, GamePlan(band=(0.99, 1.0)))


def test_a_repeated_context_self_composes_like_the_explicit_composition():
    """Query control: the T-fold PLD self-composition equals composing T copies one by one."""
    from audit.exact import pair_epsilon, repeated_pair_epsilon

    e = 1.0
    law = np.log(np.array([np.exp(e), 1.0]) / (1 + np.exp(e)))
    other = law[::-1].copy()
    explicit = pair_epsilon(np.repeat(law[None], 10, 0), np.repeat(other[None], 10, 0), 1e-5)
    assert repeated_pair_epsilon(law, other, 10, 1e-5) == pytest.approx(explicit, abs=1e-3)
    assert repeated_pair_epsilon(law, other, 1, 1e-5) == pytest.approx(1.0, abs=1e-3)


def test_the_worst_case_report_of_a_certified_deployment_stays_within_its_claim():
    from audit.exact import exact_pair_audit
    from audit.worstcase import pmixed_worst_case

    rng = np.random.default_rng(4)
    lp0 = np.log(rng.dirichlet(np.ones(30), size=3))  # [C, V]
    lps = np.log(rng.dirichlet(np.ones(30), size=(3, 4)))  # [C, N, V]
    cal = PMixEDConfig(
        n_members=4,
        sampling_rate=0.1,
        epsilon=4.0,
        delta=1e-5,
        query_budget=64,
        orders=tuple(range(2, 13)),
    ).calibrate()
    pair = exact_pair_audit(lps, lp0, cal, member=1)
    public, restricted = pmixed_worst_case(
        lp0, lps, cal, member=1, replacement=None, pair=pair, rng=rng, evaluations=30
    )
    qc, om = public["query_control"], public["optimised_member"]
    assert qc["times"] == 64 and qc["epsilon_pair"] >= 0
    assert 0 < om["ratio"] <= 1 and not om["alarm"]
    assert len(om["per_order_ratio"]) == len(cal.orders)
    assert max(r for r in om["per_order_ratio"] if r is not None) == pytest.approx(om["ratio"])
    # (c)'s ε_pair: the optimised member's pair asked T times, within the certified claim
    assert om["epsilon_pair_times"] == 64 and 0 < om["epsilon_pair"] <= cal.config.epsilon
    assert set(restricted) == {"query_control_context", "optimised_context"}

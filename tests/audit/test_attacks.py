"""Attack scores are pure functions of arrays: hand-computed values and contract checks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from audit.attacks import (
    ATTACKS,
    exposure_rank,
    lira_offline,
    loss,
    min_k,
    pmixed_count,
    pmixed_llr,
    reference_calibrated,
    register,
    zlib_ratio,
)
from audit.bounds import BonferroniAll, empirical_epsilon
from audit.risk import auc


def test_sequence_scores_by_hand():
    lp = np.log([[0.5, 0.25, 0.125, 1.0], [0.1, 0.1, 0.1, 0.1]])
    mask = np.array([True, True, True, False])
    assert loss(lp, mask=mask) == pytest.approx([np.log(0.5 * 0.25 * 0.125) / 3, np.log(0.1)])
    ref = np.log(np.full((2, 4), 0.25))
    assert reference_calibrated(lp, ref, mask=mask)[1] == pytest.approx(np.log(0.4))
    assert min_k(lp, mask=mask, k=0.33)[0] == pytest.approx(np.log(0.125))  # ceil(0.99) = 1 token
    assert min_k(lp, mask=mask, k=0.34)[0] == pytest.approx(np.log(0.25 * 0.125) / 2)
    z = zlib_ratio(lp, ["abc", "abcabcabcabc"], mask=mask)
    assert z[0] < 0 and z.shape == (2,)


def test_contract_identical_member_and_nonmember_signals_give_auc_half_and_no_bound():
    """STYLE.md's contract test, for every registered sequence attack."""
    rng = np.random.default_rng(0)
    signals = np.log(rng.dirichlet(np.ones(50), size=(2000, 8))[..., 0])  # [items, T]
    ref = np.log(rng.dirichlet(np.ones(50), size=(2000, 8))[..., 0])
    texts = ["x" * int(n) for n in rng.integers(5, 50, 2000)]
    for name, attack in ATTACKS.items():
        s = attack.score(signals, {"reference": ref, "texts": texts})
        assert auc(s[:1000], s[1000:]) == pytest.approx(0.5, abs=0.05), name
        b = empirical_epsilon(s[:1000], s[1000:], delta=1e-5, strategy=BonferroniAll())
        assert b.epsilon <= 0.05, name


def test_lira_offline_scores_items_the_target_fits_better_than_its_shadows():
    rng = np.random.default_rng(1)
    outs = rng.normal(0.0, 1.0, size=(3, 16))
    s = lira_offline([3.0, 0.0, -3.0], outs)
    assert s[0] > s[1] > s[2]
    with pytest.raises(ValueError, match="out_stats"):
        lira_offline([1.0], np.zeros((1, 1)))


def test_lira_fixed_variance_uses_one_pooled_scale():
    outs = np.array([[0.0, 2.0], [0.0, 0.2]])  # within-item variances 2 and 0.02
    s = lira_offline([2.0, 2.0], outs, fixed_variance=True)
    sigma = np.sqrt((2.0 + 0.02) / 2)
    expected = [stats.norm.logcdf((2.0 - 1.0) / sigma), stats.norm.logcdf((2.0 - 0.1) / sigma)]
    assert np.allclose(s, expected)
    per_item = lira_offline([2.0, 2.0], outs)
    assert per_item[1] > s[1]  # the tight item is far more surprising on its own scale


def test_pmixed_game_scores():
    law_in = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    law_out = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
    tokens = np.array([[0, 0], [1, 1]])
    assert pmixed_count(tokens, [0, 0]).tolist() == [2.0, 0.0]
    llr = pmixed_llr(tokens, law_in, law_out)
    assert llr[0] == pytest.approx(np.log(2) + np.log(1.8))
    assert llr[1] == pytest.approx(np.log(0.5 / 0.75) + np.log(0.2))


def test_exposure_rank_breaks_ties_at_random_and_counts_better_references():
    rng = np.random.default_rng(0)
    assert exposure_rank(5.0, [1.0, 2.0, 6.0], rng) == 2
    ranks = {exposure_rank(1.0, [1.0, 1.0, 1.0], rng) for _ in range(200)}
    assert ranks == {1, 2, 3, 4}


def test_bad_signals_are_refused_and_names_are_unique():
    with pytest.raises(ValueError, match="log-probabilities"):
        loss(np.array([[0.5]]))
    with pytest.raises(ValueError, match="mask"):
        loss(np.log([[0.5, 0.5]]), mask=[[False, False]])
    with pytest.raises(ValueError, match="already registered"):
        register("loss")(lambda x: x)
    with pytest.raises(ValueError, match="needs must be drawn from"):
        register("shadow-free", needs=("shadows",))
    with pytest.raises(ValueError, match="'reference' needs reference"):
        ATTACKS["reference"].score(np.log([[0.5]]), {})


def test_registered_attacks_say_what_they_need_and_score_like_their_functions():
    lp = np.log([[0.5, 0.25], [0.1, 0.2]])
    ref = np.log([[0.25, 0.25], [0.5, 0.5]])
    assert ATTACKS["loss"].needs == () and ATTACKS["reference"].needs == ("reference",)
    assert ATTACKS["zlib"].needs == ("texts",)
    got = ATTACKS["reference"].score(lp, {"reference": ref, "texts": ["a", "b"]})
    np.testing.assert_array_equal(got, reference_calibrated(lp, ref))
    np.testing.assert_array_equal(
        ATTACKS["zlib"].score(lp, {"texts": ["a", "b"]}), zlib_ratio(lp, ["a", "b"])
    )

"""DP-SGD accounting: golden numbers, validation, and the cross-check against Opacus."""

from __future__ import annotations

import mpmath as mp
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant

from accounting import dpsgd_epsilon, from_opacus
from accounting.dpsgd import opacus_history


def test_golden_values():
    # Expected values computed with dp-accounting 0.6.0 (RdpAccountant default orders; PLDAccountant,
    # value_discretization_interval=1e-4): 6.712757 and 6.187745.
    assert dpsgd_epsilon(1.0, 0.01, 10000, 1e-5, "rdp") == pytest.approx(6.71, abs=0.01)
    assert dpsgd_epsilon(1.0, 0.01, 10000, 1e-5, "pld") == pytest.approx(6.19, abs=0.02)
    assert dpsgd_epsilon(1.0, 0.01, 0, 1e-5) == 0.0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.0, 0.01, 10, 1e-5), "noise_multiplier"),
        ((1.0, 1.5, 10, 1e-5), "sample_rate"),
        ((1.0, 0.01, -1, 1e-5), "steps"),
        ((1.0, 0.01, 1.5, 1e-5), "steps"),
        ((1.0, 0.01, 10, 0.0), "delta"),
    ],
)
def test_bad_input_names_the_parameter(args, match):
    with pytest.raises(ValueError, match=match):
        dpsgd_epsilon(*args)
    with pytest.raises(ValueError, match="accountant"):
        dpsgd_epsilon(1.0, 0.01, 10, 1e-5, "prv")


def test_from_opacus_history_agrees_with_opacus_rdp_to_1e6():
    history = [(1.0, 0.01, 6000), (1.3, 0.02, 4000)]
    rep = from_opacus(history, 1e-5)
    opacus = RDPAccountant()
    opacus.history = list(history)
    assert rep.opacus == opacus.get_epsilon(delta=1e-5)
    assert rep.rdp_integer_orders == pytest.approx(rep.opacus_integer_orders, abs=1e-6)
    # On each library's default grid dp-accounting is the more conservative (fractional orders),
    # here by 2.4e-4 in epsilon: under 1e-4 relative.
    assert 0 <= rep.rdp - rep.opacus < 1e-4 * rep.rdp
    assert rep.pld < rep.rdp and rep.steps == 10_000
    with pytest.raises(ValueError, match="empty"):
        from_opacus([], 1e-5)
    with pytest.raises(ValueError, match="history entries"):
        from_opacus([(1.0, 0.01)], 1e-5)


def test_fractional_order_gap_is_dp_accountings_series_not_opacus():
    """The module note's claim: at order 4.1 a 30-digit quadrature sides with Opacus."""
    from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_poisson_subsampled_gaussian
    from opacus.accountants.analysis.rdp import compute_rdp

    mp.mp.dps = 30
    q, a = mp.mpf("0.01"), mp.mpf("4.1")

    def integrand(z):
        return mp.npdf(z) * ((1 - q) + q * mp.exp(z - mp.mpf("0.5"))) ** a

    exact = float(mp.log(mp.quad(integrand, [-mp.inf, -10, 0, 1, 5, 10, 20, mp.inf])) / (a - 1))
    ours = _compute_rdp_poisson_subsampled_gaussian(0.01, 1.0, [4.1])[0]
    theirs = compute_rdp(q=0.01, noise_multiplier=1.0, steps=1, orders=[4.1])[0]
    assert abs(theirs - exact) < 1e-9 * exact < abs(ours - exact)
    assert ours > exact  # conservative


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook")
def test_from_opacus_reads_a_real_privacy_engine():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    engine = PrivacyEngine(accountant="rdp")
    model, optim, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.1,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(1),
    )
    for x, y in loader:
        optim.zero_grad()
        if len(x):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        optim.step()
    hist = opacus_history(engine)
    assert len(hist) == 1 and hist[0][0] == 1.1 and hist[0][1] == pytest.approx(1 / 8)
    rep = from_opacus(engine, 1e-5)
    assert rep.opacus == pytest.approx(engine.accountant.get_epsilon(delta=1e-5), rel=1e-12)
    assert rep.rdp_integer_orders == pytest.approx(rep.opacus_integer_orders, abs=1e-6)
    assert rep.opacus_accountant == "rdp"


def test_profile_composes_once_and_matches_the_single_delta_calls():
    from accounting import dpsgd_profile

    prof = dpsgd_profile(1.0, 0.01, 1000, [1e-3, 1e-5])
    for i, d in enumerate((1e-3, 1e-5)):
        assert prof["rdp"][i] == pytest.approx(dpsgd_epsilon(1.0, 0.01, 1000, d, "rdp"), rel=1e-12)
        assert prof["pld"][i] == pytest.approx(dpsgd_epsilon(1.0, 0.01, 1000, d, "pld"), rel=1e-9)
        assert prof["pld"][i] < prof["rdp"][i]
    assert prof["rdp"][0] < prof["rdp"][1]
    with pytest.raises(ValueError, match="deltas must be in"):
        dpsgd_profile(1.0, 0.01, 10, [0.0])


def test_burn_down_builds_each_step_once_and_equals_the_per_point_calls():
    from accounting import dpsgd_burn_down

    ks = [0, 1, 7, 40]
    got = dpsgd_burn_down(1.1, 0.02, ks, 1e-5, pld_steps={7, 40})
    for k, (rdp, pld) in zip(ks, got):
        assert rdp == dpsgd_epsilon(1.1, 0.02, k, 1e-5, "rdp")
        assert pld == (dpsgd_epsilon(1.1, 0.02, k, 1e-5, "pld") if k in (7, 40) else None)
    assert got[1][0] < got[2][0] < got[3][0]
    with pytest.raises(ValueError, match="steps must be integers"):
        dpsgd_burn_down(1.1, 0.02, [-1], 1e-5)

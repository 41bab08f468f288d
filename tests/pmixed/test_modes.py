"""Modes as registered objects: a fourth mode is one class and one registration line, and the whole
chain (calibrate -> ledger -> compose -> exact audit) runs on it without an edit elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from accounting import compose, read_ledger
from audit.exact import exact_pair_audit
from pmixed import FixedBetaMode, PMixEDConfig, get_mode, mode_names, register_mode
from pmixed.amplification import base_rdp_certified
from pmixed.ledgering import create_ledger, query_event
from pmixed.modes import unregister_mode
from pmixed.mollifier import Constraints

ORDERS = tuple(range(2, 9))


class HalfRadiusMode(FixedBetaMode):
    """Toy mode: the certified constraints at half the radius (so members stay closer to the
    public model), charged the certified curve: sound, and stricter than it needs to be."""

    name = "half_radius"
    scale = 0.5

    def base_rdp(self, config, beta, ks):
        return base_rdp_certified(beta, ks)

    def constraint_set(self, config, beta):
        gammas = tuple(float(g) for g in range(2, 2 * max(config.orders) + 1))
        radii = tuple(self.scale * beta * g for g in gammas)
        n = len(gammas)
        return Constraints(gammas * 2, radii * 2, (True,) * n + (False,) * n, 1.0, 100)

    def pair_bound(self, config, beta, k):
        return 4.0 * self.scale * beta * k


class UnderchargedMode(HalfRadiusMode):
    """A planted defect: constraints 16x looser than the curve it charges for."""

    name = "undercharged"
    scale = 16.0


@pytest.fixture
def toy_modes():
    register_mode(HalfRadiusMode())  # the one registration line a new mode needs
    register_mode(UnderchargedMode())
    yield
    unregister_mode("half_radius")
    unregister_mode("undercharged")


def config(mode: str) -> PMixEDConfig:
    return PMixEDConfig(
        n_members=4,
        sampling_rate=0.2,
        epsilon=4.0,
        delta=1e-5,
        query_budget=8,
        mode=mode,
        orders=ORDERS,
    )


def far_ensemble(seed: int = 0, t: int = 3, n: int = 4, v: int = 6):
    """Members concentrated away from the public model, so the constraints bind."""
    rng = np.random.default_rng(seed)
    lp = np.log(rng.dirichlet(np.full(v, 0.1), size=(t, n)) + 1e-9)
    lp0 = np.log(rng.dirichlet(np.full(v, 5.0), size=t))
    lp -= np.logaddexp.reduce(lp, axis=-1, keepdims=True)
    return lp, lp0


def test_the_built_in_modes_are_three_registrations():
    assert mode_names()[:3] == ("certified", "capped", "reference")
    assert [get_mode(m).certified for m in mode_names()[:3]] == [True, True, False]
    with pytest.raises(ValueError, match="already registered"):
        register_mode(get_mode("certified"))
    with pytest.raises(ValueError, match=r"mode must be one of \('certified', 'capped'"):
        config("paper")


def test_a_toy_mode_runs_calibrate_ledger_compose_and_the_exact_audit(toy_modes, tmp_path):
    cal = config("half_radius").calibrate()
    assert cal.status == "certified" and cal.planned_epsilon <= 4.0
    ref = config("certified").calibrate()
    assert cal.beta == pytest.approx(ref.beta, rel=1e-9)  # same charged curve, same β
    assert cal.constraints(2).radii[0] == pytest.approx(0.5 * ref.constraints(2).radii[0])
    with create_ledger(tmp_path / "toy.jsonl", cal, budget=None) as led:
        for _ in range(8):
            led.append(query_event(cal))
    contents = read_ledger(tmp_path / "toy.jsonl")
    assert contents.header["mode"] == "half_radius"
    spent = compose(contents, 1e-5)
    assert spent.epsilon == pytest.approx(cal.planned_epsilon, rel=1e-9)
    lp, lp0 = far_ensemble()
    pair = exact_pair_audit(lp, lp0, cal, member=0)
    assert not pair.alarm and 0 < pair.worst_ratio <= 1


def test_the_exact_audit_catches_a_toy_mode_that_undercharges(toy_modes):
    cal = config("undercharged").calibrate()
    lp, lp0 = far_ensemble()
    pair = exact_pair_audit(lp, lp0, cal, member=0)
    assert pair.alarm and pair.worst_ratio > 1


def test_a_mode_rule_is_the_modes_own(toy_modes):
    with pytest.raises(ValueError, match="lambda_max applies to mode 'capped' only"):
        PMixEDConfig(**{**config("half_radius").__dict__, "lambda_max": 0.3})
    with pytest.raises(ValueError, match="reference_alpha must be one of the orders"):
        PMixEDConfig(**{**config("certified").__dict__, "mode": "reference", "reference_alpha": 99})


@pytest.mark.parametrize("orders", [5, (1, 2), "2..8"])
def test_malformed_shared_fields_are_reported_before_a_mode_reads_them(orders):
    with pytest.raises(ValueError, match="orders must be"):  # a ValueError, never a TypeError
        PMixEDConfig(**{**config("certified").__dict__, "mode": "reference", "orders": orders})

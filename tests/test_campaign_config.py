"""CampaignConfig: validated at construction, round trip through config.json, one deployment."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from campaign.config import FULL, QUICK, CampaignConfig
from pmixed.train import LoraSpec, ModelSpec


@pytest.mark.parametrize("cfg", [FULL, QUICK], ids=["full", "quick"])
def test_round_trip_through_json_is_identity_and_the_layout_is_unchanged(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert CampaignConfig.from_dict(d) == cfg
    assert cfg.to_dict() == asdict(cfg)  # config.json "demo": the version-1 layout, no new key
    assert isinstance(CampaignConfig.from_dict(d).model, ModelSpec)
    assert isinstance(CampaignConfig.from_dict(d).lora, LoraSpec)


BAD = [
    ("n_members", 0),
    ("n_members", 2.5),
    ("member_steps", True),
    ("sampling_rate", 0.0),
    ("sampling_rate", 1.5),
    ("delta", 1.0),
    ("epsilon", float("inf")),
    ("heldout_fraction", 1.0),
    ("salt", ""),
    ("seed", -1),
    ("max_private_records", 0),
    ("base", ""),
    ("model", ModelSpec(n_embd=30, n_head=4)),
    ("lora", {"r": 8}),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_a_bad_field_is_refused_naming_it(name, value):
    with pytest.raises(ValueError, match=name.split("_")[0]):
        replace(QUICK, **{name: value})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        replace(QUICK, n_members=0, delta=2.0, salt="")
    assert all(k in str(err.value) for k in ("n_members", "delta", "salt"))


def test_from_dict_refuses_unknown_fields_and_versions():
    d = QUICK.to_dict()
    with pytest.raises(ValueError, match=r"unknown fields \['n_member'\]"):
        CampaignConfig.from_dict({**d, "n_member": 3})
    with pytest.raises(ValueError, match="version 2 is not supported"):
        CampaignConfig.from_dict({**d, "version": 2})
    assert CampaignConfig.from_dict({**d, "version": 1}) == QUICK


def test_the_deployment_is_built_in_one_place():
    dep = QUICK.deployment()
    assert (dep.n_members, dep.sampling_rate, dep.query_budget) == (8, 0.1, 64)
    assert (dep.mode, dep.relation) == ("certified", "add_remove")
    assert QUICK.deployment(mode="reference").mode == "reference"

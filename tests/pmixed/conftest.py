"""Fixtures shared by the pmixed tests."""

from __future__ import annotations

import math

import pytest


@pytest.fixture(params=["per_row", "packed", "packed_split"])
def layout(request, monkeypatch):
    """Both batch layouts of a step: never packed, and packed whenever rows differ in length;
    ``packed_split`` with positions costing nothing, so that packing bounds every element's
    cached keys wherever that splits rows apart (the tiny models are too narrow to ask for it)."""
    import pmixed.models

    monkeypatch.setattr(pmixed.models, "PACK_ABOVE", math.inf if request.param == "per_row" else 1)
    if request.param == "packed_split":
        monkeypatch.setattr(pmixed.models, "POSITION_COST", 0)
    return request.param

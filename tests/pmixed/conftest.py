"""Fixtures shared by the pmixed tests."""

from __future__ import annotations

import math

import pytest


@pytest.fixture(params=["per_row", "packed"])
def layout(request, monkeypatch):
    """Both batch layouts of a step: never packed, and packed whenever rows differ in length."""
    import pmixed.models

    monkeypatch.setattr(pmixed.models, "PACK_ABOVE", math.inf if request.param == "per_row" else 1)
    return request.param

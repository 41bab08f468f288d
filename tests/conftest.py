"""Shared pytest configuration: hypothesis profiles.

CI (``CI=true``) runs a derandomized profile so a green build is reproducible; developers get fresh
random examples on every run (set ``HYPOTHESIS_PROFILE=ci`` to reproduce CI locally).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

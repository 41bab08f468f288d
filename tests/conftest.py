"""Shared pytest configuration: hypothesis profiles and the tiny demo run (one per session).

CI (``CI=true``) runs a derandomized profile so a green build is reproducible; developers get fresh
random examples on every run (set ``HYPOTHESIS_PROFILE=ci`` to reproduce CI locally).
"""

import os
import warnings

import pytest
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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run directory, metrics) of the TINY demo: trained, evaluated, audited, reported. Tests
    that modify files must work on a copy."""
    from campaign.run import run_demo
    from tests.tiny_demo import TINY, quiet

    out = tmp_path_factory.mktemp("tiny-run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return out, run_demo(TINY, out, quiet)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the test session: 2 CPUs, a 128 MiB object store (a small
    /dev/shm must not stop it), no dashboard."""
    ray = pytest.importorskip("ray", reason="Ray is the optional extra pmixed-audit[ray]")
    ray.init(
        num_cpus=2, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False
    )
    yield ray
    ray.shutdown()

"""Shared test configuration: the Hypothesis profiles, and fresh afnio settings per test."""

import dataclasses
import os

import pytest
from hypothesis import HealthCheck, settings

import afnio
from afnio._settings import Settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=60)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def fresh_afnio_settings():
    """Every test starts from the default process-wide settings (no backward client, no gradient
    cap) and leaves the process as it found it."""
    saved = afnio.get_settings()
    defaults = Settings()
    afnio.set_settings(**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(Settings)})
    yield
    afnio.set_settings(**{f.name: getattr(saved, f.name) for f in dataclasses.fields(Settings)})


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) shared by every test that needs Ray, shut down at the end.

    Ray is in the ``dev`` extra, so these tests run (never skip) wherever the suite runs. Worker
    processes start in this directory, so they import the same afnio as the tests.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()

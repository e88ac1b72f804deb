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

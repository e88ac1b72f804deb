"""Fixtures for the model-client tests."""

from __future__ import annotations

import pytest

from afnio.testing import FakeProviderServer


@pytest.fixture
def server(fake_server: FakeProviderServer) -> FakeProviderServer:
    """A fresh FakeProviderServer per test (afnio's plugin fixture, by its short name here)."""
    return fake_server

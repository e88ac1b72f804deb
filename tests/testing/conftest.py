"""Fixtures for the test-kit tests: the public ``fake_server`` fixture from afnio's plugin."""

from afnio.testing.pytest_plugin import fake_server  # noqa: F401  (re-exported fixture)

"""A pytest plugin providing the ``fake_server`` fixture.

Installing afnio registers it with pytest (a ``pytest11`` entry point), so any test can ask
for a started :class:`~afnio.testing.fake_server.FakeProviderServer`.

Example:
    >>> def test_reply(fake_server):  # doctest: +SKIP
    ...     fake_server.reply = lambda body: "pong"
    ...     client = afnio.models.openai.AsyncOpenAI(
    ...         "gpt-4.1-nano", base_url=fake_server.openai_base_url, api_key="test")
    ...     assert client.chat([{"role": "user", "content": "ping"}]) == "pong"
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from afnio.testing.fake_server import FakeProviderServer

__all__ = ["fake_server"]


@pytest.fixture
def fake_server() -> Iterator[FakeProviderServer]:
    """A started :class:`FakeProviderServer` (echo replies, no latency, no faults), closed after
    the test. Set ``reply``/``latency`` or call ``inject`` on it to shape its behaviour."""
    with FakeProviderServer() as server:
        yield server

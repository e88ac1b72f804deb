"""No API key ever appears in a repr, log line, cache row, config, pickle or error message."""

import json
import logging
import os
import pickle
import sqlite3
import string
import tempfile
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afnio.models import (
    BudgetExceededError,
    ResponseCache,
    TransientError,
    client_to_config,
)
from afnio.models.anthropic import AsyncAnthropic
from afnio.models.openai import AsyncOpenAI
from afnio.testing import FakeProviderServer, ScriptedModel

HELLO = [{"role": "user", "content": "hello"}]

api_keys = st.text(string.ascii_letters + string.digits + "-_", min_size=24, max_size=48).map(
    lambda body: "sk-" + body
)


class KeyedModel(ScriptedModel):
    """A client that needs an API key, kept the way real clients keep it: privately."""

    def __init__(self, replies=None, *, api_key=None, **options):
        super().__init__(replies, **options)
        self._api_key = api_key or os.environ["TEST_PROVIDER_KEY"]


@contextmanager
def captured_logs():
    """Every log record of every logger, formatted, while the block runs."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Keep(logging.DEBUG)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def cache_contents(path):
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT * FROM responses").fetchall()
    pieces = []
    for name in os.listdir(os.path.dirname(path)):
        with open(os.path.join(os.path.dirname(path), name), "rb") as file:
            pieces.append(file.read())
    return repr(rows), b"".join(pieces)


def assert_secret_free(key, client, *texts):
    config_text = json.dumps(client_to_config(client))
    os.environ["TEST_PROVIDER_KEY"] = "the key from the environment"
    try:
        restored = pickle.loads(pickle.dumps(client))
    finally:
        del os.environ["TEST_PROVIDER_KEY"]
    for text in (repr(client), str(client), config_text, repr(restored), *texts):
        assert key not in text
    assert key.encode() not in pickle.dumps(client)


@given(key=api_keys)
def test_scripted_client_with_a_key_never_shows_it(key):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "cache.sqlite")
        attempts = []

        def flaky(messages, **kwargs):
            attempts.append(1)
            if len(attempts) == 1:
                raise TransientError("overloaded", status=503)
            return "fine"

        client = KeyedModel(
            flaky, api_key=key, cache=ResponseCache(path), budget_tokens=20, max_tokens=5,
            retry_base_delay=0.0,
        )
        with captured_logs() as lines:
            assert client.chat(HELLO) == "fine"
            with pytest.raises(BudgetExceededError) as refused:
                client.chat([{"role": "user", "content": "again"}])
        assert any("retry 1 of 8" in line and "overloaded" in line for line in lines)
        rows, raw = cache_contents(path)
        assert_secret_free(key, client, "\n".join(lines), rows, str(refused.value))
        assert key.encode() not in raw


@pytest.fixture(scope="module")
def server():
    with FakeProviderServer(reply=lambda body: "pong") as running:
        yield running


@pytest.mark.parametrize("client_class", [AsyncOpenAI, AsyncAnthropic])
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=api_keys)
def test_sdk_clients_never_show_the_key(server, client_class, key):
    base_url = server.openai_base_url if client_class is AsyncOpenAI else server.anthropic_base_url
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "cache.sqlite")
        client = client_class(
            model="gpt-4.1-nano" if client_class is AsyncOpenAI else "claude-haiku-4-5",
            api_key=key,
            base_url=base_url,
            cache=ResponseCache(path),
            retry_base_delay=0.0,
            max_retries=1,
        )
        server.reset()
        with captured_logs() as lines:
            server.inject({"status": 429, "retry_after": 0})
            assert client.chat(HELLO) == "pong"  # one 429, then an answer
            server.inject(500, 500)
            with pytest.raises(TransientError) as failed:  # two 500s use up the retry
                client.chat([{"role": "user", "content": "other"}])
        assert len([line for line in lines if "retry 1 of 1" in line]) == 2
        rows, raw = cache_contents(path)
        assert_secret_free(
            key, client, "\n".join(lines), rows, str(failed.value), repr(failed.value)
        )
        assert key.encode() not in raw

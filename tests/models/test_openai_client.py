"""AsyncOpenAI / OpenAI end to end on the real openai SDK against FakeProviderServer."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio._runtime import run
from afnio.models._sdk import PerLoop, json_schema_of, redact, retry_after_seconds
from afnio.models.cache import ResponseCache
from afnio.models.errors import BudgetExceededError, ModelError, TransientError
from afnio.models.model import client_from_config, client_to_config
from afnio.models.openai import AsyncOpenAI, OpenAI
from afnio.models.pricing import price_for
from afnio.testing import FakeProviderServer
from afnio.testing.fake_server import FakeReply

MODEL = "gpt-4.1-nano"
ASK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two words"}]
FAST_RETRY = {"retry_base_delay": 0.001, "retry_max_delay": 0.01}


@pytest.fixture
def server():
    with FakeProviderServer() as fake:
        yield fake


def client_for(server: FakeProviderServer, **kwargs) -> AsyncOpenAI:
    kwargs.setdefault("api_key", "sk-test-0123456789")
    return AsyncOpenAI(MODEL, base_url=server.openai_base_url, **kwargs)


def test_reply_usage_and_cost(server):
    server.reply = lambda body: FakeReply(
        "two words back", prompt_tokens=1000, completion_tokens=500, cached_tokens=200
    )
    client = client_for(server)
    assert client.chat(ASK) == "two words back"
    price = price_for(MODEL)
    expected_cost = (800 * price.input + 200 * price.cached_input + 500 * price.output) / 1e6
    usage = client.get_usage()
    assert usage["requests"] == 1
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["cached_tokens"]) == (
        1000,
        500,
        200,
    )
    assert usage["cost_usd"] == pytest.approx(expected_cost)
    assert server.requests == [{"model": MODEL, "messages": ASK}]


def test_usage_follows_the_servers_counts(server):
    client = client_for(server)
    client.chat([{"role": "user", "content": "one two three"}])
    usage = client.get_usage()
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3, 3)


def test_completion_arguments_reach_the_wire(server):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    client = client_for(server)
    client.chat(
        ASK,
        temperature=0.2,
        seed=3,
        max_completion_tokens=40,
        reasoning_effort="low",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema},
        },
    )
    client.chat(ASK, max_tokens=7, response_format=schema, top_k=5,
                extra_body={"repetition_penalty": 1.1})
    first, second = server.requests
    assert first["temperature"] == 0.2 and first["seed"] == 3
    assert first["max_completion_tokens"] == 40
    assert first["reasoning_effort"] == "low"
    assert first["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema},
    }
    assert second["max_tokens"] == 7
    # Arguments the SDK doesn't know travel in the body, for OpenAI-compatible servers.
    assert second["top_k"] == 5 and second["repetition_penalty"] == 1.1
    # A bare JSON schema is sent as a strict json_schema format.
    assert second["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"n": 2}, "n=2 is not supported"),
        ({"stream": True}, "stream=True is not supported"),
        ({"model": "other"}, "'model' is set by the client"),
        ({"response_format": "json"}, "response_format must be a dict"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "needs"),
    ],
)
def test_bad_completion_arguments_are_refused_before_sending(server, args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        client_for(server).chat(ASK, **args)
    assert server.requests == []


def test_transient_faults_are_retried_until_success(server):
    server.inject(
        {"status": 429, "retry_after": 0.01},
        500,
        503,
        {"kind": "timeout", "hang": 30},
        "truncated_json",
        "invalid_json",
        "disconnect",
    )
    client = client_for(server, timeout=0.5, max_retries=7, **FAST_RETRY)
    assert client.chat(ASK) == "two words"
    assert len(server.requests) == 8
    assert server.pending_faults == 0
    assert client.get_usage()["requests"] == 1


def test_retries_are_exhausted_with_the_last_error(server):
    server.inject(500, 500, 500)
    client = client_for(server, max_retries=2, **FAST_RETRY)
    with pytest.raises(TransientError, match="HTTP 500") as info:
        client.chat(ASK)
    assert info.value.status == 500
    assert len(server.requests) == 3
    assert client.get_usage()["requests"] == 0


def test_one_attempt_maps_faults_to_transient_errors(server):
    client = client_for(server, timeout=0.3)

    async def attempt():
        return await client._send(ASK)

    server.inject({"status": 429, "retry_after": 1.5})
    with pytest.raises(TransientError) as limited:
        asyncio.run(attempt())
    assert (limited.value.status, limited.value.retry_after) == (429, 1.5)
    for fault, words in [
        ({"kind": "timeout", "hang": 30}, "timed out"),
        ("invalid_json", "not valid JSON"),
        ("truncated_json", "not valid JSON"),
        ("disconnect", "connection failed"),
        (502, "HTTP 502"),
    ]:
        server.inject(fault)
        with pytest.raises(TransientError, match=words):
            asyncio.run(attempt())
    assert len(server.requests) == 6


def test_client_errors_are_not_retried(server):
    client = client_for(server, max_retries=3, **FAST_RETRY)
    server.inject(400)
    with pytest.raises(ModelError, match=r"openai-compatible gpt-4.1-nano: HTTP 400") as info:
        client.chat(ASK)
    assert not isinstance(info.value, TransientError)
    server.inject(404)
    with pytest.raises(ModelError, match="HTTP 404"):
        client.chat(ASK)
    assert len(server.requests) == 2


def test_wrong_key_is_a_clear_error_without_the_key():
    with FakeProviderServer(api_key="sk-right-key-000000") as guarded:
        client = client_for(guarded, api_key="sk-wrong-key-111111", max_retries=3)
        with pytest.raises(ModelError, match="HTTP 401: authentication failed") as info:
            client.chat(ASK)
        assert "sk-wrong" not in str(info.value)
        assert len(guarded.requests) == 1


def test_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-222222")
    with FakeProviderServer(api_key="sk-from-env-222222") as guarded:
        assert AsyncOpenAI(MODEL, base_url=guarded.openai_base_url).chat(ASK) == "two words"


def test_missing_key_for_openai_itself_is_an_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ModelError, match="no OpenAI API key"):
        AsyncOpenAI(MODEL)


def test_budget_refuses_before_sending(server):
    server.reply = lambda body: FakeReply("ok", prompt_tokens=60, completion_tokens=5)
    client = client_for(server, budget_tokens=50)
    assert client.chat(ASK) == "ok"
    with pytest.raises(BudgetExceededError):
        client.chat(ASK)
    assert len(server.requests) == 1

    server.reset()
    priced = client_for(server, budget_usd=1e-9)
    priced.chat(ASK)
    with pytest.raises(BudgetExceededError):
        priced.chat(ASK)
    assert len(server.requests) == 1


def test_concurrency_cap_is_never_exceeded():
    client_kwargs = {"max_concurrency": 4}
    with FakeProviderServer(latency=0.1) as slow:
        client = client_for(slow, **client_kwargs)

        async def burst():
            return await asyncio.gather(
                *[client.achat([{"role": "user", "content": f"q {i}"}]) for i in range(20)]
            )

        replies = asyncio.run(burst())
    assert replies == [f"q {i}" for i in range(20)]
    assert len(slow.requests) == 20
    assert slow.max_in_flight == 4


def test_uncapped_requests_overlap():
    with FakeProviderServer(latency=0.5) as slow:
        client = client_for(slow)

        async def burst():
            return await asyncio.gather(*[client.achat(ASK) for _ in range(20)])

        asyncio.run(burst())
    assert slow.max_in_flight == 20


def test_works_on_several_event_loops(server):
    client = client_for(server)
    assert client.chat(ASK) == "two words"  # the runtime loop
    assert asyncio.run(client.achat(ASK)) == "two words"  # a user loop
    assert asyncio.run(client.achat(ASK)) == "two words"  # another one

    async def nested():
        return run(client.achat(ASK))  # a private loop from inside a running one

    assert asyncio.run(nested()) == "two words"
    assert len(client._clients) == 1  # closed loops' SDK clients are dropped

    async def use_and_close():
        reply = await client.achat(ASK)
        opened = len(client._clients)
        await client.aclose()
        return reply, opened, len(client._clients)

    assert asyncio.run(use_and_close()) == ("two words", 2, 1)
    assert len(server.requests) == 5


def test_response_cache_answers_repeats_without_a_request(server, tmp_path):
    cache = ResponseCache(tmp_path / "cache.sqlite", mode="read_write")
    client = client_for(server, cache=cache)
    assert client.chat(ASK) == "two words"
    assert client.chat(ASK) == "two words"
    assert len(server.requests) == 1


def test_sync_flavour_and_config_round_trip(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-333333333333")
    client = OpenAI(MODEL, base_url=server.openai_base_url, timeout=5, max_concurrency=2)
    assert client.provider == "openai-compatible"
    assert client.chat(ASK) == "two words"
    config = client.get_config()
    assert config["base_url"] == server.openai_base_url
    assert config["timeout"] == 5.0 and config["max_concurrency"] == 2
    rebuilt = client_from_config(json.loads(json.dumps(client_to_config(client))))
    assert type(rebuilt) is OpenAI
    assert rebuilt.get_config() == config
    assert rebuilt.chat(ASK) == "two words"
    assert AsyncOpenAI(MODEL, api_key="sk-x-123456789012").provider == "openai"


@given(
    key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=16, max_size=40).map(
        lambda s: "sk-" + s
    )
)
def test_the_key_never_shows(key):
    client = AsyncOpenAI(
        MODEL, api_key=key, base_url="http://127.0.0.1:9/v1", max_concurrency=3, budget_usd=1.0
    )
    views = [
        repr(client),
        str(client),
        json.dumps(client.get_config()),
        json.dumps(client_to_config(client)),
        repr(vars(client)),
    ]
    for view in views:
        assert key not in view
    assert key.encode() not in pickle.dumps(client)


def test_sdk_helpers():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({"retry-after": "-1"}) is None
    assert retry_after_seconds(None) is None
    assert redact("Incorrect API key provided: sk-proj-abcd****wxyz", "sk-proj-abcdefghwxyz") == (
        "Incorrect API key provided: ***abcd****wxyz"
    )
    assert json_schema_of({"type": "json_object"}, "t") == ({"type": "object"}, "response")
    assert json_schema_of({"type": "text"}, "t") == (None, "text")
    pool = PerLoop(list)

    async def same_twice():
        return pool.get() is pool.get()

    assert asyncio.run(same_twice())


def test_the_key_stays_out_of_log_lines_and_errors(server, caplog):
    key = "sk-log-check-4444444444"
    server.inject(429, 500, {"kind": "timeout", "hang": 30})
    client = client_for(server, api_key=key, timeout=0.3, max_retries=3, **FAST_RETRY)
    with caplog.at_level(logging.DEBUG):
        assert client.chat(ASK) == "two words"
        server.inject(400)
        with pytest.raises(ModelError) as info:
            client.chat(ASK)
    assert any("retry" in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        assert key not in record.getMessage()
    assert key not in str(info.value)

"""AsyncOpenAI / OpenAI end to end on the real openai SDK against FakeProviderServer."""

from __future__ import annotations

import asyncio
import gc
import json
import logging

import pytest

from afnio._runtime import run
from afnio.models._sdk import PerLoop, json_schema_of, redact, retry_after_seconds
from afnio.models.cache import ResponseCache
from afnio.models.errors import ModelError
from afnio.models.model import client_from_config, client_to_config
from afnio.models.openai import AsyncOpenAI, OpenAI
from afnio.models.pricing import price_for
from afnio.testing import FakeProviderServer
from afnio.testing.fake_server import FakeReply

MODEL = "gpt-4.1-nano"
ASK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two words"}]
FAST_RETRY = {"retry_base_delay": 0.001, "retry_max_delay": 0.01}


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


def test_sdk_helpers():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({"retry-after": "-1"}) is None
    assert retry_after_seconds(None) is None
    assert redact("Incorrect API key provided: sk-proj-abcd****wxyz", "sk-proj-abcdefghwxyz") == (
        "Incorrect API key provided: *******wxyz"
    )
    assert json_schema_of({"type": "json_object"}, "t") == ({"type": "object"}, "response")
    assert json_schema_of({"type": "text"}, "t") == (None, "text")
    pool = PerLoop(list)

    async def same_twice():
        return pool.get() is pool.get()

    assert asyncio.run(same_twice())


class Resource:
    """Stands in for an SDK client: records the loop it was closed on."""

    def __init__(self) -> None:
        self.closed_on: asyncio.AbstractEventLoop | None = None

    async def close(self) -> None:
        self.closed_on = asyncio.get_running_loop()


async def close_resource(item: Resource) -> None:
    await item.close()


def test_per_loop_objects_are_closed_on_their_loop_when_it_shuts_down():
    pool = PerLoop(Resource, close=close_resource)

    async def use():
        return pool.get(), asyncio.get_running_loop()

    first, first_loop = asyncio.run(use())
    second, second_loop = asyncio.run(use())
    assert first is not second
    assert (first.closed_on, second.closed_on) == (first_loop, second_loop)
    assert len(pool) == 0

    async def use_and_pop():
        item = pool.get()
        assert pool.pop() is item
        return item

    popped = asyncio.run(use_and_pop())
    assert popped.closed_on is None  # pop hands the closing to the caller


def test_per_loop_objects_on_a_running_loop_are_closed_when_the_pool_is_collected():
    from afnio._runtime import get_loop, run

    pools = [PerLoop(Resource, close=close_resource)]

    async def use():
        return pools[0].get()

    item = run(use())
    assert item.closed_on is None
    pools.clear()
    gc.collect()

    async def settle():
        for _ in range(10):
            await asyncio.sleep(0)

    run(settle())
    assert item.closed_on is get_loop()


def test_the_key_stays_out_of_log_lines_and_errors(server, caplog):
    key = "sk-log-check-4444444444"
    server.inject(429, 500, 503)
    client = client_for(server, api_key=key, max_retries=3, **FAST_RETRY)
    with caplog.at_level(logging.DEBUG):
        assert client.chat(ASK) == "two words"
        server.inject(400)
        with pytest.raises(ModelError) as info:
            client.chat(ASK)
    assert any("retry" in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        assert key not in record.getMessage()
    assert key not in str(info.value)

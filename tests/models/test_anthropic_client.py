"""AsyncAnthropic / Anthropic end to end on the real anthropic SDK against FakeProviderServer."""

from __future__ import annotations

import json

import pytest

from afnio.models.anthropic import DEFAULT_MAX_TOKENS, AsyncAnthropic
from afnio.models.model import client_from_config, client_to_config
from afnio.models.pricing import price_for
from afnio.testing import FakeProviderServer
from afnio.testing.fake_server import FakeReply

MODEL = "claude-haiku-4-5"
ASK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two words"}]


def client_for(server: FakeProviderServer, **kwargs) -> AsyncAnthropic:
    kwargs.setdefault("api_key", "sk-ant-test-0123456789")
    return AsyncAnthropic(MODEL, base_url=server.anthropic_base_url, **kwargs)


def test_system_messages_move_to_the_system_field(server):
    client = client_for(server)
    messages = [
        {"role": "system", "content": "rule one"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "system", "content": "rule two"},
        {"role": "user", "content": "again"},
    ]
    assert client.chat(messages) == "again"
    (body,) = server.requests
    assert body["system"] == "rule one\n\nrule two"
    assert body["messages"] == [m for m in messages if m["role"] != "system"]
    assert body["max_tokens"] == DEFAULT_MAX_TOKENS
    assert body["model"] == MODEL


def test_usage_with_cache_reads_and_writes_and_cost(server):
    server.reply = lambda body: FakeReply(
        "done", prompt_tokens=1000, completion_tokens=100, cached_tokens=600, cache_write_tokens=300
    )
    client = client_for(server)
    assert client.chat(ASK) == "done"
    usage = client.get_usage()
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["cached_tokens"]) == (
        1000,
        100,
        600,
    )
    price = price_for(MODEL)
    expected = (
        100 * price.input + 600 * price.cached_input + 300 * price.cache_write + 100 * price.output
    ) / 1e6
    assert usage["cost_usd"] == pytest.approx(expected)


def test_completion_arguments_are_translated(server):
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    client = client_for(server, max_tokens=300)
    client.chat(ASK)
    client.chat(
        ASK,
        max_completion_tokens=20,
        temperature=0.1,
        stop="END",
        reasoning_effort="low",
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    client.chat(ASK, max_tokens=5, stop=["A", "B"], response_format=schema, top_k=3)
    default, translated, bare = server.requests
    assert default["max_tokens"] == 300
    assert translated["max_tokens"] == 20 and "max_completion_tokens" not in translated
    assert translated["temperature"] == 0.1
    assert translated["stop_sequences"] == ["END"]
    assert translated["output_config"] == {
        "effort": "low",
        "format": {"type": "json_schema", "schema": schema},
    }
    assert bare["max_tokens"] == 5 and bare["top_k"] == 3
    assert bare["stop_sequences"] == ["A", "B"]
    assert bare["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


@pytest.mark.parametrize(
    ("messages", "args", "message"),
    [
        (ASK, {"n": 3}, "n=3 is not supported"),
        (ASK, {"seed": 1}, "'seed' is not supported"),
        (ASK, {"stream": True}, "stream=True"),
        (ASK, {"max_tokens": 1, "max_completion_tokens": 2}, "not both"),
        (ASK, {"system": "x"}, "not both"),
        ([{"role": "system", "content": "only"}], {}, "at least one 'user' message"),
    ],
)
def test_bad_requests_are_refused_before_sending(server, messages, args, message):
    with pytest.raises(ValueError, match=message):
        client_for(server).chat(messages, **args)
    assert server.requests == []


def test_config_round_trip_without_key(server, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-env-3333333")
    client = AsyncAnthropic(MODEL, base_url=server.anthropic_base_url, max_tokens=64, timeout=9)
    config = client.get_config()
    assert config == {
        "model": MODEL,
        "base_url": server.anthropic_base_url,
        "timeout": 9.0,
        "max_tokens": 64,
    }
    rebuilt = client_from_config(json.loads(json.dumps(client_to_config(client))))
    assert rebuilt.get_config() == config
    assert rebuilt.chat(ASK) == "two words"
    assert server.requests[0]["max_tokens"] == 64

"""AsyncAnthropic / Anthropic end to end on the real anthropic SDK against FakeProviderServer."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio.models.anthropic import DEFAULT_MAX_TOKENS, Anthropic, AsyncAnthropic
from afnio.models.errors import BudgetExceededError, ModelError, TransientError
from afnio.models.model import client_from_config, client_to_config
from afnio.models.pricing import price_for
from afnio.testing import FakeProviderServer
from afnio.testing.fake_server import FakeReply

MODEL = "claude-haiku-4-5"
ASK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two words"}]
FAST_RETRY = {"retry_base_delay": 0.001, "retry_max_delay": 0.01}


@pytest.fixture
def server():
    with FakeProviderServer() as fake:
        yield fake


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


def test_transient_faults_are_retried_until_success(server):
    server.inject(
        {"status": 429, "retry_after": 0.01},
        529,
        500,
        {"kind": "timeout", "hang": 30},
        "invalid_json",
        "truncated_json",
        "disconnect",
    )
    client = client_for(server, timeout=0.5, max_retries=7, **FAST_RETRY)
    assert client.chat(ASK) == "two words"
    assert len(server.requests) == 8
    assert client.get_usage()["requests"] == 1


def test_one_attempt_reports_status_and_retry_after(server):
    client = client_for(server)
    server.inject({"status": 429, "retry_after": 2}, 529)

    async def attempt():
        return await client._send(ASK)

    with pytest.raises(TransientError) as limited:
        asyncio.run(attempt())
    assert (limited.value.status, limited.value.retry_after) == (429, 2.0)
    with pytest.raises(TransientError, match="HTTP 529") as overloaded:
        asyncio.run(attempt())
    assert overloaded.value.status == 529


def test_client_errors_are_clear_and_not_retried(server):
    client = client_for(server, max_retries=3, **FAST_RETRY)
    server.inject(400)
    with pytest.raises(ModelError, match="anthropic claude-haiku-4-5: HTTP 400") as info:
        client.chat(ASK)
    assert not isinstance(info.value, TransientError)
    assert len(server.requests) == 1
    with FakeProviderServer(api_key="sk-ant-right-000000") as guarded:
        wrong = client_for(guarded, api_key="sk-ant-wrong-111111", max_retries=3)
        with pytest.raises(ModelError, match="HTTP 401: authentication failed") as auth:
            wrong.chat(ASK)
        assert "sk-ant-wrong" not in str(auth.value)
        assert len(guarded.requests) == 1


def test_keys_from_argument_or_environment(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ModelError, match="no Anthropic API key"):
        AsyncAnthropic(MODEL)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-env-2222222")
    with FakeProviderServer(api_key="sk-ant-env-2222222") as guarded:
        assert Anthropic(MODEL, base_url=guarded.anthropic_base_url).chat(ASK) == "two words"


def test_budget_refuses_before_sending(server):
    server.reply = lambda body: FakeReply("ok", prompt_tokens=80, completion_tokens=5)
    client = client_for(server, budget_tokens=80)
    client.chat(ASK)
    with pytest.raises(BudgetExceededError):
        client.chat(ASK)
    assert len(server.requests) == 1


def test_concurrency_cap_is_never_exceeded():
    with FakeProviderServer(latency=0.1) as slow:
        client = client_for(slow, max_concurrency=3)

        async def burst():
            replies = await asyncio.gather(
                *[client.achat([{"role": "user", "content": f"q {i}"}]) for i in range(20)]
            )
            await client.aclose()
            return replies

        replies = asyncio.run(burst())
    assert replies == [f"q {i}" for i in range(20)]
    assert len(slow.requests) == 20
    assert slow.max_in_flight == 3


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


@given(
    key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=16, max_size=40).map(
        lambda s: "sk-ant-" + s
    )
)
def test_the_key_never_shows(key):
    client = AsyncAnthropic(MODEL, api_key=key, budget_tokens=10)
    for view in (repr(client), json.dumps(client_to_config(client)), repr(vars(client))):
        assert key not in view
    assert key.encode() not in pickle.dumps(client)

"""Behaviour every SDK-backed client shares (AsyncOpenAI and AsyncAnthropic, on their real SDKs
against FakeProviderServer): key handling, retries, error translation, limits and secrecy."""

from __future__ import annotations

import asyncio
import json
import pickle
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio.models._sdk import SdkChatModel
from afnio.models.anthropic import Anthropic, AsyncAnthropic
from afnio.models.errors import BudgetExceededError, ModelError, TransientError
from afnio.models.model import client_to_config
from afnio.models.openai import AsyncOpenAI, OpenAI
from afnio.testing import FakeProviderServer, Turnstile
from afnio.testing.fake_server import FakeReply

ASK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two words"}]
FAST_RETRY = {"retry_base_delay": 0.001, "retry_max_delay": 0.01}


@dataclass(frozen=True)
class Kit:
    """How to point one SDK-backed client class at a FakeProviderServer."""

    client_class: type[SdkChatModel]
    sync_class: type[SdkChatModel]
    model: str
    key_prefix: str
    key_env: str
    vendor: str
    base_url_attribute: str
    provider_with_base_url: str

    def base_url(self, server: FakeProviderServer) -> str:
        return getattr(server, self.base_url_attribute)

    def client_for(self, server: FakeProviderServer, **kwargs) -> SdkChatModel:
        kwargs.setdefault("api_key", self.key_prefix + "test-0123456789")
        return self.client_class(self.model, base_url=self.base_url(server), **kwargs)


OPENAI = Kit(
    AsyncOpenAI, OpenAI, "gpt-4.1-nano", "sk-", "OPENAI_API_KEY", "OpenAI", "openai_base_url",
    "openai-compatible",
)
ANTHROPIC = Kit(
    AsyncAnthropic, Anthropic, "claude-haiku-4-5", "sk-ant-", "ANTHROPIC_API_KEY", "Anthropic",
    "anthropic_base_url", "anthropic",
)
each_kit = pytest.mark.parametrize("kit", [OPENAI, ANTHROPIC], ids=["openai", "anthropic"])


@each_kit
def test_transient_faults_are_retried_until_success(server, kit):
    server.inject(
        {"status": 429, "retry_after": 0.01},
        500,
        503,
        529,
        "invalid_json",
        "truncated_json",
        "disconnect",
    )
    # A generous timeout: no answered request may time out, however loaded the machine.
    client = kit.client_for(server, timeout=30, max_retries=7, **FAST_RETRY)
    assert client.chat(ASK) == "two words"
    assert len(server.requests) == 8
    assert server.pending_faults == 0
    assert client.get_usage()["requests"] == 1


@each_kit
def test_a_timed_out_attempt_is_retried(server, kit):
    # The hanging request can only end by the client's timeout (2 s); the retry is answered at
    # once, far within its own 2 s.
    server.inject({"kind": "timeout", "hang": 60})
    client = kit.client_for(server, timeout=2.0, max_retries=1, **FAST_RETRY)

    async def once():
        try:
            return await client.achat(ASK)
        finally:
            await client.aclose()

    assert asyncio.run(once()) == "two words"
    assert len(server.requests) == 2 and server.pending_faults == 0


@each_kit
def test_retries_are_exhausted_with_the_last_error(server, kit):
    server.inject(500, 500, 500)
    client = kit.client_for(server, max_retries=2, **FAST_RETRY)
    with pytest.raises(TransientError, match="HTTP 500") as info:
        client.chat(ASK)
    assert info.value.status == 500
    assert len(server.requests) == 3
    assert client.get_usage()["requests"] == 0


@each_kit
def test_one_attempt_maps_faults_to_transient_errors(server, kit):
    # Only the hanging request meets the short timeout; every answered one has 30 s.
    client = kit.client_for(server, timeout=30)
    hasty = kit.client_for(server, timeout=0.3)

    async def attempt(on=client):
        try:
            return await on._send(ASK)
        finally:
            await on.aclose()

    server.inject({"status": 429, "retry_after": 2})
    with pytest.raises(TransientError) as limited:
        asyncio.run(attempt())
    assert (limited.value.status, limited.value.retry_after) == (429, 2.0)
    server.inject({"kind": "timeout", "hang": 30})
    with pytest.raises(TransientError, match="timed out") as info:
        asyncio.run(attempt(hasty))
    assert info.value.status is None
    for fault, words, status in [
        ("invalid_json", "not valid JSON", None),
        ("truncated_json", "not valid JSON", None),
        ("disconnect", "connection failed", None),
        (502, "HTTP 502", 502),
        (529, "HTTP 529", 529),
    ]:
        server.inject(fault)
        with pytest.raises(TransientError, match=words) as info:
            asyncio.run(attempt())
        assert info.value.status == status
    assert len(server.requests) == 7


@each_kit
def test_client_errors_are_clear_and_not_retried(server, kit):
    client = kit.client_for(server, max_retries=3, **FAST_RETRY)
    server.inject(400)
    prefix = f"{kit.provider_with_base_url} {kit.model}: HTTP 400"
    with pytest.raises(ModelError, match=prefix) as info:
        client.chat(ASK)
    assert not isinstance(info.value, TransientError)
    server.inject(404)
    with pytest.raises(ModelError, match="HTTP 404"):
        client.chat(ASK)
    assert len(server.requests) == 2


@each_kit
def test_wrong_key_is_a_clear_error_without_the_key(kit):
    with FakeProviderServer(api_key=kit.key_prefix + "right-key-000000") as guarded:
        client = kit.client_for(guarded, api_key=kit.key_prefix + "wrong-key-111111", max_retries=3)
        with pytest.raises(ModelError, match="HTTP 401: authentication failed") as info:
            client.chat(ASK)
        assert kit.key_prefix + "wrong" not in str(info.value)
        assert kit.key_env in str(info.value)
        assert len(guarded.requests) == 1


@each_kit
def test_missing_key_without_base_url_is_an_error(monkeypatch, kit):
    monkeypatch.delenv(kit.key_env, raising=False)
    with pytest.raises(ModelError, match=f"no {kit.vendor} API key"):
        kit.client_class(kit.model)


@each_kit
def test_key_from_the_environment(monkeypatch, kit):
    key = kit.key_prefix + "from-env-222222"
    monkeypatch.setenv(kit.key_env, key)
    with FakeProviderServer(api_key=key) as guarded:
        for client_class in (kit.client_class, kit.sync_class):
            assert client_class(kit.model, base_url=kit.base_url(guarded)).chat(ASK) == "two words"


@each_kit
def test_budget_refuses_before_sending(server, kit):
    server.reply = lambda body: FakeReply("ok", prompt_tokens=60, completion_tokens=5)
    client = kit.client_for(server, budget_tokens=50)
    assert client.chat(ASK) == "ok"
    with pytest.raises(BudgetExceededError):
        client.chat(ASK)
    assert len(server.requests) == 1

    server.reset()
    priced = kit.client_for(server, budget_usd=1e-9)
    priced.chat(ASK)
    with pytest.raises(BudgetExceededError):
        priced.chat(ASK)
    assert len(server.requests) == 1


def echo(body: dict) -> str:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(b["text"] for b in content)


@each_kit
def test_concurrency_cap_is_never_exceeded(kit):
    # The first 3 requests are held until all 3 wait on the server: the cap is certainly reached.
    gate = Turnstile("reverse", expected=[3], timeout=30)
    with FakeProviderServer(reply=gate.wrap(echo)) as slow:
        client = kit.client_for(slow, max_concurrency=3)

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


@each_kit
def test_uncapped_requests_overlap(kit):
    gate = Turnstile("reverse", expected=20, timeout=30)  # all 20 must wait at once
    with FakeProviderServer(reply=gate.wrap(echo)) as slow:
        client = kit.client_for(slow)

        async def burst():
            replies = await asyncio.gather(*[client.achat(ASK) for _ in range(20)])
            await client.aclose()
            return replies

        asyncio.run(burst())
    assert slow.max_in_flight == 20


@each_kit
@given(key_body=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=16,
                        max_size=40))
def test_the_key_never_shows(kit, key_body):
    key = kit.key_prefix + key_body
    clients = [
        kit.client_class(kit.model, api_key=key, budget_tokens=10),
        kit.client_class(
            kit.model, api_key=key, base_url="http://127.0.0.1:9/v1", max_concurrency=3,
            budget_usd=1.0,
        ),
    ]
    for client in clients:
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

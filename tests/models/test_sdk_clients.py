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
from afnio.models.errors import (
    BudgetExceededError,
    InvalidRequestError,
    MalformedReplyError,
    ModelError,
    TransientError,
)
from afnio.models.model import client_to_config
from afnio.models.openai import AsyncOpenAI, OpenAI
from afnio.models.pricing import cost_usd
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
        ("disconnect", "connection failed \\(RemoteProtocolError: Server disconnected", None),
        (502, "HTTP 502", 502),
        (529, "HTTP 529", 529),
    ]:
        server.inject(fault)
        with pytest.raises(TransientError, match=words) as info:
            asyncio.run(attempt())
        assert info.value.status == status
    assert len(server.requests) == 5


@each_kit
@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("invalid_json", "with a body that is not valid JSON"),
        ("truncated_json", "with a body that is not valid JSON"),
        ("non_utf8", "with a body that is not UTF-8"),
        ("html", "with an HTML page instead of JSON.*Sign in to the network"),
        ("missing_fields", "the HTTP 200 reply has no"),
    ],
)
def test_every_malformed_reply_is_a_retried_model_error_naming_endpoint_and_status(
    server, kit, fault, words
):
    # Issue 14, defect 4: UnicodeDecodeError / AttributeError / TypeError escaped unretried.
    client = kit.client_for(server, max_retries=1, **FAST_RETRY)
    server.inject(fault, fault)
    with pytest.raises(MalformedReplyError, match=words) as info:
        client.chat(ASK)
    assert isinstance(info.value, TransientError) and isinstance(info.value, ModelError)
    assert info.value.status == 200 and "HTTP 200" in str(info.value)
    assert server.url in str(info.value) and server.url in info.value.endpoint
    assert len(server.requests) == 2  # retried once
    server.inject(fault)
    assert client.chat(ASK) == "two words"  # and a retry that gets a good reply succeeds


@each_kit
def test_client_errors_are_clear_and_not_retried(server, kit):
    client = kit.client_for(server, max_retries=3, **FAST_RETRY)
    server.inject(400)
    prefix = (f"{kit.provider_with_base_url} {kit.model}: {server.url}/v1/\\S+ answered HTTP 400: "
              "the server rejected the request as invalid")
    with pytest.raises(InvalidRequestError, match=prefix) as info:
        client.chat(ASK)
    assert not isinstance(info.value, TransientError) and info.value.status == 400
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
    with pytest.raises(BudgetExceededError, match="up to 1024 of reply"):
        client.chat(ASK)  # the default output reserve alone passes the budget
    assert len(server.requests) == 0
    assert client.chat(ASK, max_tokens=10) == "ok"  # prompt estimate + 10 fit in 50
    with pytest.raises(BudgetExceededError, match="65 used"):
        client.chat(ASK, max_tokens=10)
    assert len(server.requests) == 1

    server.reset()
    prompt = client.count_message_tokens(ASK)
    estimate = cost_usd(client.provider, kit.model, prompt_tokens=prompt, completion_tokens=10)
    priced = kit.client_for(server, budget_usd=1.5 * estimate)
    priced.chat(ASK, max_tokens=10)
    with pytest.raises(BudgetExceededError, match="USD budget"):
        priced.chat(ASK, max_tokens=10)
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


# ------------------------------------------------------------------ completion arguments


@each_kit
def test_a_misspelled_argument_is_refused_before_sending(server, kit):
    # Issue 14, defect 9: tempreture= was sent silently in extra_body.
    client = kit.client_for(server)
    with pytest.raises(ValueError, match="unknown completion argument 'tempreture' "
                                         "\\(did you mean 'temperature'\\?\\)"):
        client.chat(ASK, tempreture=0.3)
    with pytest.raises(ValueError, match="put it in extra_body=\\{'frobnicate': ...\\}"):
        client.chat(ASK, frobnicate=1)
    with pytest.raises(TypeError, match="max_tokens must be a positive int, got 'ten'"):
        client.chat(ASK, max_tokens="ten")
    with pytest.raises(TypeError, match="extra_body must be a dict"):
        client.chat(ASK, extra_body=["x"])
    assert len(server.requests) == 0
    assert client.chat(ASK, temperature=0.3, extra_body={"frobnicate": 1}) == "two words"
    sent = server.requests[-1]
    assert sent["temperature"] == 0.3 and sent["frobnicate"] == 1  # explicit extras go through


def test_compatible_servers_keep_their_documented_extras(server):
    client = OPENAI.client_for(server)
    client.chat(ASK, top_k=5, min_p=0.1, repetition_penalty=1.1, guided_choice=["a", "b"])
    sent = server.requests[-1]
    assert (sent["top_k"], sent["min_p"], sent["repetition_penalty"]) == (5, 0.1, 1.1)
    assert sent["guided_choice"] == ["a", "b"]
    with pytest.raises(ValueError, match="'top_kk' \\(did you mean 'top_k'\\?\\)"):
        client.chat(ASK, top_kk=5)


def test_openai_itself_gets_only_openai_arguments(server, monkeypatch):
    # Without base_url the client talks to OpenAI (here the SDK's OPENAI_BASE_URL points it at
    # the fake server): a vLLM extra is a mistake there, unless sent explicitly.
    monkeypatch.setenv("OPENAI_BASE_URL", server.openai_base_url)
    client = AsyncOpenAI("gpt-4.1-nano", api_key="sk-test-0123456789")
    assert client.provider == "openai"
    with pytest.raises(ValueError, match="unknown completion argument 'top_k'"):
        client.chat(ASK, top_k=5)
    assert client.chat(ASK, extra_body={"top_k": 5}) == "two words"
    assert server.requests[-1]["top_k"] == 5 and len(server.requests) == 1


def test_anthropic_sampling_arguments_travel_in_the_body(server):
    client = ANTHROPIC.client_for(server)
    client.chat(ASK, temperature=0.2, top_p=0.9, top_k=3)
    sent = server.requests[-1]
    assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (0.2, 0.9, 3)


# ------------------------------------------------------------------ invalid requests


@each_kit
@pytest.mark.parametrize(
    ("fault", "field"),
    [
        ({"status": 400, "body": {"error": {"message": "Invalid value for 'response_format'",
                                            "type": "invalid_request_error",
                                            "param": "response_format"}}}, "response_format"),
        ({"status": 422, "body": {"detail": [{"loc": ["body", "temperature"],
                                              "msg": "Input should be a number",
                                              "type": "float_parsing"}]}}, "temperature"),
        ({"status": 500, "message": "1 validation error for ChatCompletionRequest\n"
                                    "response_format.type\n  Input should be 'json_object'"},
         "response_format"),
        ({"status": 500, "body": {"detail": [{"loc": ["body", "messages", 0, "role"],
                                              "msg": "bad role"}]}}, "messages.0.role"),
    ],
    ids=["400-openai-param", "422-fastapi", "500-pydantic-text", "500-fastapi"],
)
def test_invalid_requests_are_not_retried_and_name_the_field(server, kit, fault, field):
    client = kit.client_for(server, max_retries=3, **FAST_RETRY)
    server.inject(fault, fault, fault, fault)
    with pytest.raises(InvalidRequestError, match=f"rejected field: {field}") as info:
        client.chat(ASK)
    assert info.value.field == field and info.value.status == fault["status"]
    assert server.url in str(info.value) and "rejected the request as invalid" in str(info.value)
    assert len(server.requests) == 1  # not retried


@each_kit
def test_a_plain_server_error_is_still_retried(server, kit):
    client = kit.client_for(server, max_retries=3, **FAST_RETRY)
    server.inject({"status": 500, "message": "upstream overloaded, try later"})
    assert client.chat(ASK) == "two words"
    assert len(server.requests) == 2


# ------------------------------------------------------------------ redaction


@each_kit
@pytest.mark.parametrize(
    ("key", "echo", "redacted", "kept"),
    [
        # Issue 19: with api_key="x" every letter x of the message was replaced.
        ("x", "expected 'text' but the key x is wrong; context exceeded",
         "expected 'text' but the key *** is wrong; context exceeded", "text"),
        ("sk-local", "key sk-local rejected; expected an sk-... key",
         "key *** rejected; expected an sk-... key", "expected"),
        # Issue 14, defect 9: a server echoing a slice of the key.
        ("sk-proj-Abcdefghijklmnopqrstuvwxyz0123456789",
         "Incorrect API key provided: sk-proj-Abcdefgh************6789. See the docs.",
         "Incorrect API key provided: ***************6789. See the docs.", "See the docs"),
        ("sk-ant-api03-Zyxwvutsrqponmlkjihgfedcba9876543210",
         "key ...hgfedcba98765... is invalid", "key ...***... is invalid", "is invalid"),
    ],
    ids=["one-letter", "short", "openai-masked-prefix", "middle-slice"],
)
def test_keys_are_redacted_whole_never_letter_by_letter(server, kit, key, echo, redacted, kept):
    client = kit.client_for(server, api_key=key)
    server.inject({"status": 400, "message": echo})
    with pytest.raises(InvalidRequestError) as info:
        client.chat(ASK)
    message = str(info.value)
    assert redacted in message and kept in message
    if len(key) >= 8:
        assert all(key[i:i + 8] not in message for i in range(len(key) - 7))


@given(key=st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=8, max_size=60),
       start=st.integers(0, 59), length=st.integers(8, 60),
       prefix=st.text("ABCDEFGHIJ .,:", max_size=20), suffix=st.text("KLMNOP .,:", max_size=20))
def test_property_no_slice_of_eight_or_more_key_characters_survives(
    key, start, length, prefix, suffix
):
    from afnio.models._sdk import redact

    start %= len(key)
    text = prefix + key[start:start + length] + suffix
    cleaned = redact(text, key)
    assert all(key[i:i + 8] not in cleaned for i in range(len(key) - 7))
    # Text around it (here of other characters) is kept whole.
    assert cleaned.startswith(prefix) and cleaned.endswith(suffix)

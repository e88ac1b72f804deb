"""FakeProviderServer speaks the real wire formats: checked with the official SDKs and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import anthropic
import httpx2
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio.testing import FakeProviderServer, Turnstile
from afnio.testing.fake_server import FakeReply, Fault

USER = [{"role": "user", "content": "hello there world"}]
_opened: list = []  # SDK clients made by a test, closed after it (their sockets with them)


@pytest.fixture(autouse=True)
def close_sdk_clients():
    yield
    while _opened:
        _opened.pop().close()


def openai_client(server: FakeProviderServer, **kwargs) -> openai.OpenAI:
    kwargs.setdefault("api_key", "test-key")
    client = openai.OpenAI(base_url=server.openai_base_url, max_retries=0, **kwargs)
    _opened.append(client)
    return client


def anthropic_client(server: FakeProviderServer, **kwargs) -> anthropic.Anthropic:
    kwargs.setdefault("api_key", "test-key")
    client = anthropic.Anthropic(base_url=server.anthropic_base_url, max_retries=0, **kwargs)
    _opened.append(client)
    return client


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_openai_sdk_gets_an_echo_with_word_usage(fake_server):
    completion = openai_client(fake_server).chat.completions.create(
        model="gpt-4.1-nano",
        messages=[{"role": "system", "content": "be brief"}, *USER],
    )
    assert completion.choices[0].message.content == "hello there world"
    assert completion.model == "gpt-4.1-nano"
    assert completion.usage.prompt_tokens == 5
    assert completion.usage.completion_tokens == 3
    assert completion.usage.total_tokens == 8
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    assert fake_server.requests == [
        {"model": "gpt-4.1-nano", "messages": [{"role": "system", "content": "be brief"}, *USER]}
    ]
    assert fake_server.paths == ["/v1/chat/completions"]


def test_anthropic_sdk_gets_a_message_with_usage(fake_server):
    message = anthropic_client(fake_server).messages.create(
        model="claude-haiku-4-5", max_tokens=50, system="be brief", messages=USER
    )
    assert [block.text for block in message.content] == ["hello there world"]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 5
    assert message.usage.output_tokens == 3
    assert message.usage.cache_read_input_tokens == 0
    assert message.usage.cache_creation_input_tokens == 0
    assert fake_server.requests[0]["system"] == "be brief"
    assert fake_server.paths == ["/v1/messages"]


def test_anthropic_requires_max_tokens_like_the_real_api(fake_server):
    response = httpx2.post(
        f"{fake_server.url}/v1/messages", json={"model": "claude", "messages": USER}
    )
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert "max_tokens" in response.json()["error"]["message"]


def test_reply_function_sees_the_request_and_may_be_async():
    seen = []

    async def reply(body):
        seen.append(body)
        await asyncio.sleep(0)
        return f"{body['model']} says {len(body['messages'])}"

    with FakeProviderServer(reply=reply) as server:
        completion = openai_client(server).chat.completions.create(
            model="m1", messages=USER, temperature=0.5, seed=7
        )
    assert completion.choices[0].message.content == "m1 says 1"
    assert seen == [{"model": "m1", "messages": USER, "temperature": 0.5, "seed": 7}]


def test_fake_reply_sets_usage_for_both_wire_formats():
    reply = FakeReply(
        "ok", prompt_tokens=100, completion_tokens=7, cached_tokens=60, cache_write_tokens=30
    )
    with FakeProviderServer(reply=lambda body: reply) as server:
        oa = openai_client(server).chat.completions.create(model="m", messages=USER)
        an = anthropic_client(server).messages.create(model="c", max_tokens=5, messages=USER)
    assert (oa.usage.prompt_tokens, oa.usage.completion_tokens) == (100, 7)
    assert oa.usage.prompt_tokens_details.cached_tokens == 60
    # Anthropic counts uncached input apart from cache reads and writes.
    assert (an.usage.input_tokens, an.usage.output_tokens) == (10, 7)
    assert (an.usage.cache_read_input_tokens, an.usage.cache_creation_input_tokens) == (60, 30)


def test_n_choices_for_openai(fake_server):
    completion = openai_client(fake_server).chat.completions.create(model="m", messages=USER, n=2)
    assert [c.message.content for c in completion.choices] == ["hello there world"] * 2
    assert completion.usage.completion_tokens == 6


def test_rate_limit_fault_carries_retry_after(fake_server):
    fake_server.inject({"status": 429, "retry_after": 2})
    client = openai_client(fake_server)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=USER)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "2"
    assert client.chat.completions.create(model="m", messages=USER).choices[0].message.content
    assert len(fake_server.requests) == 2
    assert fake_server.pending_faults == 0


def test_anthropic_error_bodies_use_its_format(fake_server):
    fake_server.inject(529, {"status": 429, "retry_after": 0.25})
    client = anthropic_client(fake_server)
    with pytest.raises(anthropic.InternalServerError) as overloaded:
        client.messages.create(model="c", max_tokens=5, messages=USER)
    assert overloaded.value.status_code == 529
    assert overloaded.value.type == "overloaded_error"
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="c", max_tokens=5, messages=USER)
    assert limited.value.response.headers["retry-after"] == "0.25"


def test_faults_apply_once_each_in_order():
    server = FakeProviderServer(faults=[500, "invalid_json", "truncated_json", "disconnect"])
    with server:
        client = openai_client(server)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=USER)
        with pytest.raises(json.JSONDecodeError):
            client.chat.completions.create(model="m", messages=USER)
        with pytest.raises(json.JSONDecodeError):
            client.chat.completions.create(model="m", messages=USER)
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="m", messages=USER)
        ok = client.chat.completions.create(model="m", messages=USER)
    assert ok.choices[0].message.content == "hello there world"
    assert [f.kind for f in server.faults_applied] == [
        "status",
        "invalid_json",
        "truncated_json",
        "disconnect",
    ]
    assert len(server.requests) == 5


def test_truncated_json_is_a_prefix_of_the_real_body(fake_server):
    fake_server.inject("truncated_json")
    cut = httpx2.post(
        f"{fake_server.openai_base_url}/chat/completions", json={"model": "m", "messages": USER}
    )
    full = httpx2.post(
        f"{fake_server.openai_base_url}/chat/completions", json={"model": "m", "messages": USER}
    )
    assert cut.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.content)
    assert full.json()["choices"][0]["message"]["content"] == "hello there world"
    assert len(cut.content) == len(full.content) // 2


def test_timeout_fault_holds_until_the_client_gives_up(fake_server):
    fake_server.inject({"kind": "timeout", "hang": 30})
    client = openai_client(fake_server, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="m", messages=USER)
    assert time.monotonic() - started < 10
    assert wait_until(lambda: fake_server.in_flight == 0)
    # The next request is answered at once; a default timeout keeps a loaded machine out of it.
    patient = openai_client(fake_server)
    assert patient.chat.completions.create(model="m", messages=USER).choices[0].message.content


def test_api_key_is_checked_when_configured():
    with FakeProviderServer(api_key="sk-right") as server:
        with pytest.raises(openai.AuthenticationError):
            openai_client(server, api_key="sk-wrong").chat.completions.create(
                model="m", messages=USER
            )
        with pytest.raises(anthropic.AuthenticationError):
            anthropic_client(server, api_key="sk-wrong").messages.create(
                model="c", max_tokens=5, messages=USER
            )
        assert (
            openai_client(server, api_key="sk-right")
            .chat.completions.create(model="m", messages=USER)
            .choices[0]
            .message.content
        )
        assert (
            anthropic_client(server, api_key="sk-right")
            .messages.create(model="c", max_tokens=5, messages=USER)
            .content[0]
            .text
        )


def test_a_failing_reply_function_is_a_visible_500():
    def reply(body):
        raise KeyError("oops")

    with FakeProviderServer(reply=reply) as server:
        with pytest.raises(openai.InternalServerError) as info:
            openai_client(server).chat.completions.create(model="m", messages=USER)
    assert "KeyError" in str(info.value)
    assert [type(e) for e in server.errors] == [KeyError]


def test_unknown_route_and_models_listing(fake_server):
    assert httpx2.get(f"{fake_server.url}/v1/nothing").status_code == 404
    models = httpx2.get(f"{fake_server.openai_base_url}/models")
    assert models.status_code == 200
    assert models.json()["object"] == "list"


def test_chunked_request_bodies_are_read(fake_server):
    body = json.dumps({"model": "m", "messages": USER}).encode()

    def chunks():
        yield body[:10]
        yield body[10:]

    response = httpx2.post(
        f"{fake_server.openai_base_url}/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert response.json()["choices"][0]["message"]["content"] == "hello there world"


def test_many_requests_are_in_flight_at_once():
    async def burst(server):
        client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0)
        async with client:
            return await asyncio.gather(
                *[
                    client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": f"n {i}"}]
                    )
                    for i in range(64)
                ]
            )

    # The server holds every request until all 64 wait at once: certain, whatever the load.
    gate = Turnstile("reverse", expected=64, timeout=30)
    reply = gate.wrap(lambda body: body["messages"][-1]["content"])
    with FakeProviderServer(reply=reply) as server:
        results = asyncio.run(burst(server))
        assert server.in_flight == 0
    assert sorted(r.choices[0].message.content for r in results) == sorted(
        f"n {i}" for i in range(64)
    )
    assert server.max_in_flight == 64
    assert len(server.requests) == 64


def test_lifecycle_and_bad_arguments():
    server = FakeProviderServer()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.url
    with server:
        url = server.url
        assert server.start() is server
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{url}/v1/models")
    server.close()
    with pytest.raises(ValueError, match="latency"):
        FakeProviderServer(latency=-1)
    with pytest.raises(ValueError, match="unknown kind 'explode'"):
        FakeProviderServer(faults=["explode"])
    with pytest.raises(ValueError, match="4xx/5xx"):
        Fault.parse(200)
    with pytest.raises(ValueError, match="got float"):
        Fault.parse(1.5)


def test_reset_forgets_everything(fake_server):
    fake_server.inject(500, 500)
    with pytest.raises(openai.InternalServerError):
        openai_client(fake_server).chat.completions.create(model="m", messages=USER)
    fake_server.reset()
    assert (fake_server.requests, fake_server.paths, fake_server.faults_applied) == ([], [], [])
    assert fake_server.pending_faults == 0
    assert fake_server.max_in_flight == 0


@pytest.fixture(scope="module")
def shared_server():
    with FakeProviderServer() as server:
        yield server


texts = st.text(alphabet=st.sampled_from("ab \n\té"), max_size=30)


@given(contents=st.lists(texts, min_size=1, max_size=4))
def test_prompt_usage_is_the_word_count_of_all_messages(shared_server, contents):
    messages = [{"role": "user", "content": c} for c in contents]
    completion = openai_client(shared_server).chat.completions.create(model="m", messages=messages)
    expected = sum(len(c.split()) for c in contents)
    assert completion.usage.prompt_tokens == expected
    assert completion.choices[0].message.content == contents[-1]
    assert completion.usage.completion_tokens == len(contents[-1].split())


def raw_exchange(server: FakeProviderServer, data: bytes) -> bytes:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_malformed_http_gets_a_400_and_the_server_keeps_serving(fake_server):
    assert raw_exchange(fake_server, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400")
    reply = raw_exchange(fake_server, b"POST /v1/messages HTTP/1.1\r\n"
                                      b"content-length: lots\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b"content-length" in reply
    response = httpx2.post(f"{fake_server.openai_base_url}/chat/completions",
                           content=b"not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert fake_server.requests == [{"_raw": "not json"}]
    assert openai_client(fake_server).chat.completions.create(
        model="m", messages=USER).choices[0].message.content == "hello there world"


def _raw_post(server, path, payload):
    with httpx2.Client(base_url=server.url) as http:
        return http.post(path, json=payload)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_reply_faults_a_proxy_or_a_broken_server_produces(fake_server, api):
    path = "/v1/chat/completions" if api == "openai" else "/v1/messages"
    payload = {"model": "m", "max_tokens": 5, "messages": USER}
    fake_server.inject("non_utf8", "html", "missing_fields")
    raw = _raw_post(fake_server, path, payload)
    assert raw.status_code == 200
    with pytest.raises(UnicodeDecodeError):
        raw.content.decode("utf-8")
    assert json.loads(raw.content.decode("latin-1"))["model"] == "m"  # JSON, just not UTF-8
    page = _raw_post(fake_server, path, payload)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.startswith("<!DOCTYPE html>")
    missing = _raw_post(fake_server, path, payload).json()
    if api == "openai":
        assert "content" not in missing["choices"][0]["message"]
    else:
        assert "content" not in missing and missing["usage"]["output_tokens"] == 3
    assert _raw_post(fake_server, path, payload).status_code == 200  # faults apply once each


def test_status_faults_carry_a_message_or_a_whole_body(fake_server):
    fake_server.inject({"status": 400, "message": "bad temperature"},
                       {"status": 422, "body": {"detail": [{"loc": ["body", "x"]}]}})
    first = _raw_post(fake_server, "/v1/chat/completions", {"model": "m", "messages": USER})
    assert first.status_code == 400 and first.json()["error"]["message"] == "bad temperature"
    second = _raw_post(fake_server, "/v1/chat/completions", {"model": "m", "messages": USER})
    assert second.status_code == 422 and second.json() == {"detail": [{"loc": ["body", "x"]}]}


def test_random_faults_follow_the_rate_and_the_seed():
    def kinds(seed, rate):
        with FakeProviderServer(fault_rate=rate, seed=seed,
                                fault_mix=[500, 503, "html", "non_utf8"]) as server:
            with httpx2.Client(base_url=server.url) as http:
                for _ in range(60):
                    http.post("/v1/chat/completions", json={"model": "m", "messages": USER})
            return [(f.kind, f.status) for f in server.faults_applied]

    first = kinds(seed=3, rate=0.3)
    assert first == kinds(seed=3, rate=0.3)  # reproducible
    assert first != kinds(seed=4, rate=0.3)
    assert 8 <= len(first) <= 30 and {kind for kind, _ in first} == {"status", "html", "non_utf8"}
    assert kinds(seed=3, rate=0.0) == [] and len(kinds(seed=3, rate=1.0)) == 60
    with pytest.raises(ValueError, match="fault_rate must be in \\[0, 1\\]"):
        FakeProviderServer(fault_rate=1.5)

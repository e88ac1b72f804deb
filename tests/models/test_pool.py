"""EndpointPool: routing, per-endpoint limits, failover, health checks, usage and caching,
against several FakeProviderServers (the real OpenAI SDK on the wire)."""

from __future__ import annotations

import asyncio
import pickle
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import afnio
from afnio import cognitive
from afnio._runtime import run
from afnio.cognitive import Parameter
from afnio.models import (
    ContextWindowError,
    EndpointPool,
    PoolEndpoint,
    ResponseCache,
    TransientError,
    client_from_config,
    client_to_config,
    get_client,
    set_price,
    track_usage,
)
from afnio.models.openai import AsyncOpenAI
from afnio.models.pool import POOL_CACHE_ENDPOINT
from afnio.models.registry import parse_model_path
from afnio.optim import TGD
from afnio.testing import FakeProviderServer

MODEL = "pool-test-model"
FAST = {"retry_base_delay": 0.0, "retry_max_delay": 0.0}
GUARD = 60  # seconds: a guard against a hang, never part of a result


@pytest.fixture(autouse=True)
def priced_model():
    """Give the test model a price so every request has a cost to account for."""
    set_price(MODEL, input=1.0, output=3.0)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def signed(name: str):
    """A server reply naming the server and echoing the question."""
    return lambda body: f"{name}:{body['messages'][-1]['content']}"


def user_texts(server: FakeProviderServer) -> list[str]:
    return [body["messages"][-1]["content"] for body in server.requests]


def pool_of(*servers: FakeProviderServer, **options) -> EndpointPool:
    return EndpointPool(MODEL, [server.openai_base_url for server in servers],
                        context_window=100_000, **{**FAST, **options})


def gather_chats(pool: EndpointPool, texts: list[str]) -> list[str]:
    async def main() -> list[str]:
        return list(await asyncio.gather(*(pool.achat(ask(text)) for text in texts)))

    return run(main())


# --------------------------------------------------------------------------- routing
def test_requests_avoid_the_endpoint_with_outstanding_requests() -> None:
    """Least outstanding requests: while A holds a request, B and C share the rest in turn."""
    arrived, release = threading.Event(), threading.Event()

    async def held(body):
        arrived.set()
        await asyncio.to_thread(release.wait, GUARD)
        return "A:" + body["messages"][-1]["content"]

    with FakeProviderServer(reply=held) as a, FakeProviderServer(reply=signed("B")) as b, \
            FakeProviderServer(reply=signed("C")) as c, ThreadPoolExecutor(1) as executor:
        pool = pool_of(a, b, c)
        first = executor.submit(pool.chat, ask("first"))
        assert arrived.wait(GUARD)
        assert pool.endpoint_stats()[0]["outstanding"] == 1
        later = [pool.chat(ask(f"q{i}")) for i in range(4)]
        release.set()
        assert first.result(GUARD) == "A:first"
    assert later == ["B:q0", "C:q1", "B:q2", "C:q3"]
    assert (len(a.requests), len(b.requests), len(c.requests)) == (1, 2, 2)
    assert [s["outstanding"] for s in pool.endpoint_stats()] == [0, 0, 0]


def test_each_endpoint_keeps_its_own_concurrency_cap() -> None:
    """Two endpoints capped at 2: eight requests run in waves of four, two per endpoint."""
    wave = threading.Barrier(4)

    def gated(name):
        async def reply(body):
            await asyncio.to_thread(wave.wait, GUARD)
            return f"{name}:{body['messages'][-1]['content']}"
        return reply

    with FakeProviderServer(reply=gated("A")) as a, FakeProviderServer(reply=gated("B")) as b:
        pool = EndpointPool(MODEL, [PoolEndpoint(a.openai_base_url, max_concurrency=2),
                                    {"base_url": b.openai_base_url, "max_concurrency": 2}],
                            context_window=100_000, **FAST)
        texts = [f"q{i}" for i in range(8)]
        replies = gather_chats(pool, texts)
    assert [reply.split(":")[1] for reply in replies] == texts
    assert (a.max_in_flight, b.max_in_flight) == (2, 2)
    assert (len(a.requests), len(b.requests)) == (4, 4)


# --------------------------------------------------------------------------- failover
def test_an_endpoint_killed_mid_run_loses_and_duplicates_nothing() -> None:
    """B is closed while it holds four requests: they fail over to A and C, every question is
    answered once, and usage counts each answer once — per endpoint, in the pool, run-wide."""
    loaded = threading.Event()
    held = []

    async def hang(body):
        held.append(body)
        if len(held) == 4:
            loaded.set()
        await asyncio.Event().wait()  # until the server is closed

    texts = [f"question {i} please" for i in range(12)]
    with FakeProviderServer(reply=signed("A")) as a, FakeProviderServer(reply=hang) as b, \
            FakeProviderServer(reply=signed("C")) as c, ThreadPoolExecutor(1) as executor, \
            track_usage() as run_wide:
        pool = pool_of(a, b, c, health_check_interval=3600)
        pending = executor.submit(gather_chats, pool, texts)
        assert loaded.wait(GUARD)
        b.close()
        replies = pending.result(GUARD)
        after = [pool.chat(ask(f"later {i}")) for i in range(6)]

    assert [reply.split(":", 1)[1] for reply in replies] == texts
    assert {reply.split(":")[0] for reply in replies} == {"A", "C"}
    survivors = [text for text in user_texts(a) + user_texts(c) if text.startswith("question")]
    assert sorted(survivors) == sorted(texts)  # each question sent to A or C exactly once
    assert len(user_texts(b)) == 4 and set(user_texts(b)) < set(texts)
    assert {reply.split(":")[0] for reply in after} <= {"A", "C"}

    usage = pool.get_usage()
    by_endpoint = pool.endpoint_usage()
    assert usage["requests"] == 18 and run_wide.requests == 18
    assert by_endpoint[b.openai_base_url]["requests"] == 0
    for field in ("requests", "prompt_tokens", "completion_tokens"):
        assert sum(u[field] for u in by_endpoint.values()) == usage[field] == getattr(
            run_wide, field)
    assert sum(u["cost_usd"] for u in by_endpoint.values()) == pytest.approx(usage["cost_usd"])
    assert run_wide.cost_usd == pytest.approx(usage["cost_usd"]) and usage["cost_usd"] > 0
    stats = {s["base_url"]: s for s in pool.endpoint_stats()}
    assert not stats[b.openai_base_url]["healthy"]
    assert stats[b.openai_base_url]["failures"] == 4  # never tried again once out of rotation


def test_a_failed_attempt_fails_over_at_once_without_using_a_retry() -> None:
    with FakeProviderServer(reply=signed("A"), faults=[500]) as a, \
            FakeProviderServer(reply=signed("B")) as b:
        pool = pool_of(a, b, max_retries=0)
        assert pool.chat(ask("hello")) == "B:hello"
    assert (len(a.requests), len(b.requests)) == (1, 1)
    assert pool.get_usage()["requests"] == 1
    assert [u["requests"] for u in pool.endpoint_usage().values()] == [0, 1]
    first = pool.endpoint_stats()[0]
    assert (first["healthy"], first["failures"], first["consecutive_failures"]) == (True, 1, 1)


def test_an_endpoint_is_tried_once_per_attempt_then_the_pools_retries_decide() -> None:
    """A one-endpoint pool is no retry loop: with max_retries=0 one failure is the end."""
    with FakeProviderServer(reply=signed("A"), faults=[500, 500]) as a:
        pool = pool_of(a, max_retries=0, failure_threshold=5)
        with pytest.raises(TransientError, match="tried 1 of 1"):
            pool.chat(ask("once"))
        assert len(a.requests) == 1
        retrying = pool_of(a, max_retries=1, failure_threshold=5)
        assert retrying.chat(ask("twice")) == "A:twice" and len(a.requests) == 3


def test_rate_limited_endpoint_is_busy_not_broken() -> None:
    with FakeProviderServer(reply=signed("A"), faults=[429, 429, 429]) as a, \
            FakeProviderServer(reply=signed("B")) as b:
        pool = pool_of(a, b, failure_threshold=1)
        replies = [pool.chat(ask(f"q{i}")) for i in range(4)]
    assert [reply[0] for reply in replies] == ["B", "B", "B", "A"]  # A stayed in the rotation
    assert pool.endpoint_stats()[0]["healthy"]  # three 429s with a threshold of 1
    assert pool.endpoint_stats()[0]["failures"] == 3


def test_every_endpoint_down_is_a_transient_error_naming_the_pool() -> None:
    a, b = FakeProviderServer().start(), FakeProviderServer().start()
    pool = pool_of(a, b, max_retries=1)
    a.close()
    b.close()
    with pytest.raises(TransientError, match=r"EndpointPool\(model='pool-test-model'"):
        pool.chat(ask("anyone?"))
    assert pool.get_usage()["requests"] == 0
    assert all(not stats["healthy"] for stats in pool.endpoint_stats())


# --------------------------------------------------------------------------- health
def test_unhealthy_endpoint_leaves_rotation_until_a_health_check_passes() -> None:
    with FakeProviderServer(reply=signed("A"), faults=[503, 503]) as a, \
            FakeProviderServer(reply=signed("B")) as b:
        pool = pool_of(a, b, health_check_interval=3600)
        replies = [pool.chat(ask(f"q{i}")) for i in range(4)]
        assert [reply[0] for reply in replies] == ["B"] * 4
        assert len(a.requests) == 2 and not pool.endpoint_stats()[0]["healthy"]
        assert "/v1/models" not in a.paths
        assert pool.check_health() == {a.openai_base_url: True, b.openai_base_url: True}
        assert "/v1/models" in a.paths
        again = [pool.chat(ask(f"r{i}")) for i in range(4)]
    assert sorted(reply[0] for reply in again) == ["A", "A", "B", "B"]


def test_a_due_endpoint_is_probed_by_the_next_request() -> None:
    with FakeProviderServer(reply=signed("A"), faults=[503]) as a, \
            FakeProviderServer(reply=signed("B")) as b:
        pool = pool_of(a, b, failure_threshold=1, health_check_interval=0)
        assert pool.chat(ask("one")) == "B:one"
        assert not pool.endpoint_stats()[0]["healthy"]
        assert pool.chat(ask("two")) == "A:two"  # probed, healthy again, least loaded
    assert a.paths == ["/v1/chat/completions", "/v1/models", "/v1/chat/completions"]


def test_a_failing_health_check_keeps_the_endpoint_out() -> None:
    with FakeProviderServer(reply=signed("B")) as b:
        a = FakeProviderServer().start()
        pool = pool_of(a, b, failure_threshold=1, health_check_interval=3600)
        a.close()
        assert pool.chat(ask("x")) == "B:x"
        assert pool.check_health() == {a.openai_base_url: False, b.openai_base_url: True}
        assert pool.chat(ask("y")) == "B:y"
    assert not pool.endpoint_stats()[0]["healthy"]


# --------------------------------------------------------------------------- property
FAULTS = st.sampled_from([500, 503, 429, "disconnect", "truncated_json", "html"])


@pytest.fixture(scope="module")
def trio():
    """Three servers shared by the examples of the property (reset before each)."""
    servers = [FakeProviderServer(reply=signed(name)).start() for name in "ABC"]
    yield servers
    for server in servers:
        server.close()


@settings(max_examples=10)
@given(
    count=st.integers(1, 6),
    faults=st.lists(st.lists(FAULTS, max_size=3), min_size=3, max_size=3),
)
def test_every_request_is_answered_once_whatever_fails(trio, count, faults) -> None:
    """Whatever faults the endpoints inject, every request gets its own answer, exactly one
    endpoint answered it, and usage counts it once everywhere."""
    for server, queued in zip(trio, faults):
        server.reset()
        server.inject(*queued)
    pool = pool_of(*trio, max_retries=8, failure_threshold=2, health_check_interval=3600)
    texts = [f"distinct question {i}" for i in range(count)]
    with track_usage() as run_wide:
        replies = gather_chats(pool, texts)
    run(pool.aclose())
    assert [reply.split(":", 1)[1] for reply in replies] == texts
    answered = {
        name: len(server.requests) - len(server.faults_applied)
        for name, server in zip("ABC", trio)
    }
    assert sum(answered.values()) == count
    assert sorted(answered.items()) == sorted(
        (name, sum(reply.startswith(name + ":") for reply in replies)) for name in "ABC"
    )
    usage = pool.get_usage()
    assert usage["requests"] == run_wide.requests == count
    assert [u["requests"] for u in pool.endpoint_usage().values()] == [answered[n] for n in "ABC"]


# --------------------------------------------------------------------------- as a client
def test_cache_entries_belong_to_the_logical_model(tmp_path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    with FakeProviderServer(reply=signed("A")) as a, FakeProviderServer(reply=signed("B")) as b:
        first = pool_of(a, b, cache=cache)
        assert first.chat(ask("cached?")) == "A:cached?"
        other = pool_of(b, cache=cache)  # another pool of the same model: a hit
        assert other.chat(ask("cached?")) == "A:cached?"
        assert len(b.requests) == 0 and other.get_usage()["cached_tokens"] > 0
        alone = AsyncOpenAI(MODEL, base_url=a.openai_base_url, cache=cache,
                            context_window=100_000)
        assert alone.chat(ask("cached?")) == "A:cached?"  # keyed by its URL: a miss
        assert len(a.requests) == 2
    assert first.endpoint == POOL_CACHE_ENDPOINT


def test_pool_runs_ops_backward_and_optimizer() -> None:
    def answer(body):
        user = body["messages"][-1]["content"]
        system = body["messages"][0]["content"]
        if "<IMPROVED_VARIABLE>" in user:
            return "<IMPROVED_VARIABLE>Answer and name the day.</IMPROVED_VARIABLE>"
        if "<FEEDBACK>" in system or "<FEEDBACK>" in user:
            return "<FEEDBACK>Name the delivery day.</FEEDBACK>"
        return "About " + re.search(r"order \d+", user).group(0)

    class Support(cognitive.Module):
        def __init__(self, client):
            super().__init__()
            self.prompt = Parameter("Answer.", role="system prompt for support")
            self.reply = cognitive.ChatCompletion(client, backward_model_client=client)

        def forward(self, questions):
            return self.reply([{"role": "system", "content": [self.prompt]},
                               {"role": "user", "content": ["{q}"]}], inputs={"q": questions})

    with FakeProviderServer(reply=answer) as a, FakeProviderServer(reply=answer) as b:
        pool = pool_of(a, b)
        agent = Support(pool)
        optimizer = TGD(agent.parameters(), model_client=pool)
        questions = [f"Where is order {i}?" for i in range(4)]
        replies = agent(afnio.Variable(questions, role="questions"))
        assert replies.data == [f"About order {i}" for i in range(4)]
        score, explanation = cognitive.DeterministicEvaluator(
            lambda reply, _: 0, "1 if the reply names a day")(replies, questions)
        explanation.backward()
        optimizer.step()
        sent = len(a.requests) + len(b.requests)
    assert agent.prompt.data == "Answer and name the day."
    assert pool.get_usage()["requests"] == sent == 6  # 4 forward, 1 gradient, 1 step
    assert min(len(a.requests), len(b.requests)) >= 2


def test_window_tokens_reserve_and_structured_outputs_are_an_openai_compatible_clients() -> None:
    with FakeProviderServer() as a, FakeProviderServer() as b:
        pool = EndpointPool(MODEL, [a.openai_base_url, b.openai_base_url], context_window=2000,
                            structured_output="vllm")
        single = AsyncOpenAI(MODEL, base_url=a.openai_base_url, context_window=2000,
                             structured_output="vllm")
        messages = ask("how many tokens is this")
        assert pool.context_window == 2000
        assert pool.count_message_tokens(messages) == single.count_message_tokens(messages)
        assert pool.output_reserve({}) == single.output_reserve({}) == 1024
        assert pool.output_reserve({"max_tokens": 50}) == 50
        schema = {"type": "object", "properties": {"a": {"type": "string"}}}
        assert pool.structured_output_args(schema, "s") == {"guided_json": schema}
        with pytest.raises(ValueError, match="tempreture"):
            pool.chat(messages, tempreture=0)
        with pytest.raises(ContextWindowError):
            pool.chat(ask("long " * 1500))
        assert pool.chat(messages, top_k=3) == "how many tokens is this"
    assert len(a.requests) + len(b.requests) == 1  # refused requests were never sent
    assert (a.requests or b.requests)[0]["top_k"] == 3  # a server extra goes into the body


def test_path_config_and_pickle_never_hold_the_key() -> None:
    secret = "sk-secret-pool-key-0123456789"
    with FakeProviderServer(reply=lambda body: "ok") as a, FakeProviderServer() as b:
        path = f"openai-compatible/{MODEL}@{a.openai_base_url},{b.openai_base_url}"
        pool = get_client(path, api_key=secret, failure_threshold=3, context_window=100_000)
        assert isinstance(pool, EndpointPool)
        assert [spec.base_url for spec in pool.endpoints] == [a.openai_base_url, b.openai_base_url]
        assert pool.chat(ask("hi")) == "ok"
        rebuilt = client_from_config(client_to_config(pool))
        assert rebuilt.get_config() == pool.get_config()
        assert rebuilt.failure_threshold == 3
        for text in (repr(pool), str(pool.get_config()), pickle.dumps(pool).decode("latin-1")):
            assert secret not in text and secret[:12] not in text


@pytest.mark.parametrize(
    ("endpoints", "options", "error", "match"),
    [
        ([], {}, ValueError, "endpoints is empty"),
        ("http://a:1/v1", {}, TypeError, "must be a list"),
        (["ftp://a:1/v1"], {}, ValueError, "http:// or https://"),
        (["http://a:1/v1", "http://a:1/v1/"], {}, ValueError, "more than once"),
        ([3], {}, TypeError, r"endpoints\[0\] must be a base URL"),
        ([{"base_url": "http://a:1/v1", "max_concurency": 2}], {}, TypeError, "endpoints"),
        (["http://a:1/v1"], {"failure_threshold": 0}, ValueError, "failure_threshold"),
        (["http://a:1/v1"], {"health_check_interval": -1}, ValueError, "health_check_interval"),
        (["http://a:1/v1"], {"max_retrys": 1}, TypeError, "max_retries"),
    ],
)
def test_bad_arguments_are_refused_naming_them(endpoints, options, error, match) -> None:
    with pytest.raises(error, match=match):
        EndpointPool(MODEL, endpoints, **options)


def test_pool_endpoint_checks_its_limits() -> None:
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        PoolEndpoint("http://a:1/v1", max_concurrency=0)
    assert PoolEndpoint("http://a:1/v1", requests_per_minute=60).get_config() == {
        "base_url": "http://a:1/v1", "requests_per_minute": 60}


def test_malformed_pool_paths_are_refused() -> None:
    assert parse_model_path("openai-compatible/m@http://a/v1, http://b/v1")[2] == {
        "endpoints": ["http://a/v1", "http://b/v1"]}
    with pytest.raises(ValueError, match="separated by single commas"):
        parse_model_path("openai-compatible/m@http://a/v1,,http://b/v1")

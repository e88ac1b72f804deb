"""Limits in the request pipeline: budgets, concurrency caps, pacing and retries."""

import asyncio
import inspect
import logging
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio._runtime import run
from afnio.models import BudgetExceededError, TransientError
from afnio.models.limits import Limits, RateLimit, backoff_delay
from afnio.models.model import ChatCompletionModel
from afnio.models.usage import Usage
from afnio.testing import ScriptedModel, Turnstile

HELLO = [{"role": "user", "content": "hello"}]


class PricedModel(ScriptedModel):
    provider = "openai"


def failing(times, *, status=500, retry_after=None, reply="ok"):
    """A reply function failing transiently ``times`` times, then answering ``reply``."""
    failures = [times]

    def answer(messages, **kwargs):
        if failures[0] > 0:
            failures[0] -= 1
            raise TransientError(f"injected {status}", status=status, retry_after=retry_after)
        return reply

    return answer


# Budgets ----------------------------------------------------------------------------------------


def test_token_budget_refuses_before_sending():
    model = ScriptedModel(["ok"], budget_tokens=1)
    assert model.chat(HELLO) == "ok"
    with pytest.raises(BudgetExceededError, match="token budget of 1 is spent"):
        model.chat(HELLO)
    assert model.calls == 1
    assert model.get_usage()["requests"] == 1


def test_usd_budget_refuses_before_sending():
    probe = PricedModel(["ok"], model="gpt-4.1")
    probe.chat(HELLO)
    per_request = probe.get_usage()["cost_usd"]
    assert per_request > 0
    model = PricedModel(["ok"], model="gpt-4.1", budget_usd=2.5 * per_request)
    for _ in range(3):  # spent 0, 1 and 2 requests' worth: still under budget
        model.chat(HELLO)
    with pytest.raises(BudgetExceededError, match="USD budget of .* is spent"):
        model.chat(HELLO)
    assert model.calls == 3
    assert model.get_usage()["cost_usd"] == pytest.approx(3 * per_request)


def test_requests_queued_behind_the_cap_are_refused_once_the_budget_is_spent():
    model = ScriptedModel(["ok"], latency=0.01, max_concurrency=1, budget_tokens=1)

    async def three():
        return await asyncio.gather(*(model.achat(HELLO) for _ in range(3)), return_exceptions=True)

    results = run(three())
    assert results[0] == "ok"
    assert all(isinstance(r, BudgetExceededError) for r in results[1:])
    assert model.calls == 1


def test_clear_usage_restarts_the_budget():
    model = ScriptedModel(["ok"], budget_tokens=1)
    model.chat(HELLO)
    model.clear_usage()
    assert model.chat(HELLO) == "ok"
    assert model.calls == 2


# Concurrency ------------------------------------------------------------------------------------


def gated(*sizes: int) -> Any:
    """A reply that holds the first waves of requests until ``sizes`` of them wait at once (so
    the cap is certainly reached), one turnstile per event loop."""
    gates: dict[asyncio.AbstractEventLoop, Turnstile] = {}

    async def reply(messages, **kwargs):
        loop = asyncio.get_running_loop()
        gate = gates.setdefault(loop, Turnstile("reverse", expected=list(sizes), timeout=30))
        await gate.wait()
        return "hi"

    return reply


@pytest.mark.parametrize("cap", [1, 3, 8])
def test_concurrency_cap_is_never_exceeded(cap):
    model = ScriptedModel(gated(cap), max_concurrency=cap)

    async def many():
        await asyncio.gather(*(model.achat(HELLO) for _ in range(24)))

    run(many())
    assert model.max_in_flight == cap
    assert model.calls == 24


def test_concurrency_cap_works_on_any_event_loop():
    model = ScriptedModel(gated(2), max_concurrency=2)

    async def many():
        await asyncio.gather(*(model.achat(HELLO) for _ in range(6)))

    asyncio.run(many())  # a private loop
    run(many())  # the runtime loop
    asyncio.run(many())  # a fresh private loop: the cap must not be bound to a dead loop
    assert model.max_in_flight == 2
    assert model.calls == 18


@given(cap=st.integers(1, 6), requests=st.integers(1, 16))
def test_concurrency_cap_property(cap, requests):
    model = ScriptedModel(gated(min(cap, requests)), max_concurrency=cap)

    async def many():
        await asyncio.gather(*(model.achat(HELLO) for _ in range(requests)))

    run(many())
    assert model.max_in_flight == min(cap, requests)
    assert model.calls == requests


def test_no_cap_lets_everything_overlap():
    model = ScriptedModel(gated(10))

    async def many():
        await asyncio.gather(*(model.achat(HELLO) for _ in range(10)))

    run(many())
    assert model.max_in_flight == 10


# Retries ----------------------------------------------------------------------------------------


def test_transient_failures_are_retried_with_exact_counts():
    model = ScriptedModel(failing(2), retry_base_delay=0.001)
    assert model.chat(HELLO) == "ok"
    assert model.calls == 3
    assert model.get_usage()["requests"] == 1


def test_retries_give_up_after_max_retries():
    model = ScriptedModel(failing(10, status=429), max_retries=2, retry_base_delay=0.001)
    with pytest.raises(TransientError, match="injected 429") as info:
        model.chat(HELLO)
    assert info.value.status == 429
    assert model.calls == 3
    assert model.get_usage()["requests"] == 0


def test_zero_retries_means_one_attempt():
    model = ScriptedModel(failing(1), max_retries=0)
    with pytest.raises(TransientError):
        model.chat(HELLO)
    assert model.calls == 1


def test_other_errors_are_not_retried():
    def broken(messages, **kwargs):
        raise KeyError("bug in the reply function")

    model = ScriptedModel(broken, retry_base_delay=0.001)
    with pytest.raises(KeyError):
        model.chat(HELLO)
    assert model.calls == 1


def test_retries_are_logged_without_secrets(caplog):
    model = ScriptedModel(failing(1, status=503), retry_base_delay=0.001)
    with caplog.at_level(logging.WARNING, logger="afnio.models.model"):
        model.chat(HELLO)
    assert len(caplog.records) == 1
    assert "status 503" in caplog.text and "retry 1 of 3" in caplog.text


def test_retry_after_is_honoured():
    limits = Limits(max_retries=2, retry_base_delay=10.0)
    attempts, delays = [], []

    async def send():
        attempts.append(1)
        if len(attempts) < 3:
            raise TransientError("slow down", status=429, retry_after=0.02)
        return "done"

    result = run(
        limits.call(
            send,
            estimated_tokens=0,
            spent=Usage,
            client="c",
            on_retry=lambda n, error, delay: delays.append((n, delay)),
        )
    )
    assert result == "done" and len(attempts) == 3
    assert [n for n, _ in delays] == [1, 2]
    assert all(0.02 <= delay <= 0.022 for _, delay in delays)


def test_backoff_doubles_with_jitter_and_a_cap():
    rng = random.Random(0)
    for attempt in range(8):
        expected = min(4.0, 0.5 * 2**attempt)
        for _ in range(50):
            assert expected / 2 <= backoff_delay(attempt, base=0.5, cap=4.0, rng=rng) <= expected
    spread = {round(backoff_delay(2, base=1.0, rng=rng), 6) for _ in range(20)}
    assert len(spread) > 1  # jittered
    assert backoff_delay(5, retry_after=0.0) == 0.0


# Pacing -----------------------------------------------------------------------------------------


def test_rate_limit_spaces_requests():
    now = [100.0]
    limit = RateLimit(120, clock=lambda: now[0])  # 2 per second, bucket of 2
    assert [limit.reserve(1) for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]
    now[0] += 10  # long idle: the bucket refills, but only up to its capacity
    assert [limit.reserve(1) for _ in range(3)] == [0.0, 0.0, 0.5]


def test_token_rate_limit_paces_large_requests_and_takes_corrections():
    now = [0.0]
    limit = RateLimit(600, clock=lambda: now[0])  # 10 tokens per second, bucket of 10
    assert limit.reserve(30) == pytest.approx(2.0)
    limit.adjust(-20)  # the request used 20 tokens fewer than estimated
    assert limit.reserve(10) == pytest.approx(1.0)


@given(per_minute=st.integers(1, 10_000), amounts=st.lists(st.integers(1, 500), max_size=20))
def test_rate_limit_waits_exactly_for_the_debt(per_minute, amounts):
    limit = RateLimit(per_minute, clock=lambda: 0.0)  # everything reserved at one instant
    per_second = per_minute / 60
    capacity = max(per_second, 1.0)
    reserved = 0
    for amount in amounts:
        reserved += amount
        expected = max(0.0, (reserved - capacity) / per_second)
        assert limit.reserve(amount) == pytest.approx(expected)


def test_paced_client_sends_everything():
    model = ScriptedModel(requests_per_minute=6000, tokens_per_minute=600_000)

    async def many():
        return await asyncio.gather(*(model.achat(HELLO) for _ in range(5)))

    assert run(many()) == ["hello"] * 5
    assert model.calls == 5


# Options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "error", "message"),
    [
        ("max_concurrency", 0, ValueError, "max_concurrency must be >= 1, got 0"),
        ("max_concurrency", 2.5, TypeError, "max_concurrency must be an int"),
        ("requests_per_minute", -1, ValueError, "requests_per_minute must be > 0, got -1"),
        ("tokens_per_minute", 0, ValueError, "tokens_per_minute must be > 0, got 0"),
        ("max_retries", True, TypeError, "max_retries must be an int"),
        ("budget_usd", "5", TypeError, "budget_usd must be a number"),
        ("budget_tokens", -3, ValueError, "budget_tokens must be >= 0"),
    ],
)
def test_bad_options_are_rejected_by_name(option, value, error, message):
    with pytest.raises(error, match=message):
        ScriptedModel(**{option: value})


def test_limit_options_survive_a_config_round_trip():
    model = ScriptedModel(
        max_concurrency=4,
        requests_per_minute=60,
        tokens_per_minute=1000,
        max_retries=5,
        budget_usd=1.5,
        budget_tokens=10_000,
    )
    config = model.get_config()
    assert config == {
        "model": "scripted",
        "latency": 0.0,
        "max_concurrency": 4,
        "requests_per_minute": 60,
        "tokens_per_minute": 1000,
        "max_retries": 5,
        "budget_usd": 1.5,
        "budget_tokens": 10_000,
    }
    assert ScriptedModel.from_config(config).get_config() == config


def test_clients_take_exactly_the_limit_options_of_limits():
    # ChatCompletionModel spells Limits' options out in its own public signature; the two must
    # agree, and the defaults must be what Limits.get_config leaves out.
    limit_options = inspect.signature(Limits).parameters
    client_options = inspect.signature(ChatCompletionModel.__init__).parameters
    assert set(limit_options) <= set(client_options)
    for name, option in limit_options.items():
        mirrored = client_options[name]
        assert mirrored.kind is option.kind is inspect.Parameter.KEYWORD_ONLY
        assert (mirrored.default, mirrored.annotation) == (option.default, option.annotation)
    defaults = {name: option.default for name, option in limit_options.items()}
    assert Limits(**defaults).get_config() == {}

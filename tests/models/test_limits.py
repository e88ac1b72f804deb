"""Limits in the request pipeline: budgets, concurrency caps, pacing and retries."""

import asyncio
import inspect
import logging
import random
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio._runtime import run
from afnio.models import BudgetExceededError, TransientError
from afnio.models.limits import ConcurrencyLimit, Limits, RateLimit, backoff_delay
from afnio.models.model import ChatCompletionModel
from afnio.models.options import PipelineOptions
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
    # Each request needs 8 prompt tokens + 10 of reply = 18: two fit in 40, a third would not.
    model = ScriptedModel(["ok"], budget_tokens=40, max_tokens=10)
    assert model.count_message_tokens(HELLO) == 8
    assert model.chat(HELLO) == model.chat(HELLO) == "ok"
    spent = model.get_usage()
    assert spent["prompt_tokens"] + spent["completion_tokens"] == 18  # 2 x (8 + 1)
    model.chat(HELLO)  # 18 used + 18 estimated = 36 <= 40
    with pytest.raises(BudgetExceededError, match="token budget of 40 would be passed: 27 used"):
        model.chat(HELLO)  # 27 + 18 = 45 > 40
    assert model.calls == 3
    assert model.get_usage()["requests"] == 3


def test_a_request_larger_than_the_budget_is_never_sent():
    # Issue 14, defect 3: a 627-token request went out under budget_tokens=10.
    model = ScriptedModel(["ok"], budget_tokens=10)
    big = [{"role": "user", "content": " ".join(f"w{i}" for i in range(300))}]
    with pytest.raises(BudgetExceededError, match="request refused before sending"):
        model.chat(big, max_tokens=1)
    assert model.calls == 0 and model.get_usage()["requests"] == 0


def test_usd_budget_refuses_before_sending():
    probe = PricedModel(["ok"], model="gpt-4.1", max_tokens=4)
    probe.chat(HELLO)
    per_request = probe.get_usage()["cost_usd"]  # 8 prompt + 1 completion tokens
    assert per_request == pytest.approx((8 * 2.0 + 1 * 8.0) / 1e6)
    estimate = (8 * 2.0 + 4 * 8.0) / 1e6  # the reply is reserved at its cap of 4 tokens
    model = PricedModel(["ok"], model="gpt-4.1", max_tokens=4,
                        budget_usd=2 * per_request + estimate)
    for _ in range(3):  # spent 0, 1 and 2 requests' worth, plus one estimate: within budget
        model.chat(HELLO)
    with pytest.raises(BudgetExceededError, match="USD budget of .* would be passed"):
        model.chat(HELLO)
    assert model.calls == 3
    assert model.get_usage()["cost_usd"] == pytest.approx(3 * per_request)


def test_usd_budget_without_a_known_price_is_an_error_at_construction():
    # Issue 14, defect 3: 16 requests under budget_usd=1e-6 on an unpriced model all went out.
    with pytest.raises(ValueError, match="budget_usd needs the model's price.*set_price"):
        PricedModel(["ok"], model="my-unpriced-finetune", budget_usd=1e-6)
    PricedModel(["ok"], model="my-unpriced-finetune", budget_tokens=100)  # tokens need no price
    ScriptedModel(["ok"], model="my-unpriced-finetune", budget_usd=1e-6)  # a free provider


def test_concurrent_requests_reserve_their_estimate_so_a_batch_cannot_overshoot():
    # Issue 14, defect 3: a 64-sample batch under budget_tokens=100 sent 51 requests.
    gate = asyncio.Event()

    async def held(messages, **kwargs):
        await gate.wait()
        return "ok"

    model = ScriptedModel(held, budget_tokens=100)
    prompts = [[{"role": "user", "content": f"sample {i}"}] for i in range(64)]
    estimate = model.count_message_tokens(prompts[0]) + 64

    async def batch():
        tasks = [asyncio.ensure_future(model.achat(p)) for p in prompts]
        # Hold every sent request until each of the 64 is either in flight or refused.
        while model.in_flight + sum(t.done() for t in tasks) < 64:
            await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(batch())
    sent = [r for r in results if r == "ok"]
    assert len(sent) == 100 // estimate == model.calls == 1
    assert all(isinstance(r, BudgetExceededError) for r in results if r != "ok")
    used = model.get_usage()
    assert used["prompt_tokens"] + used["completion_tokens"] <= 100


def test_requests_queued_behind_the_cap_are_refused_once_the_budget_is_spent():
    model = ScriptedModel(["ok"], latency=0.01, max_concurrency=1, budget_tokens=30, max_tokens=10)

    async def three():
        return await asyncio.gather(*(model.achat(HELLO) for _ in range(3)), return_exceptions=True)

    results = run(three())
    assert results[0] == "ok"
    assert all(isinstance(r, BudgetExceededError) for r in results[1:])
    assert model.calls == 1


def test_a_request_that_used_more_than_reserved_stops_those_waiting_for_a_slot():
    # A reply longer than the reserve (a scripted model doesn't enforce max_tokens) is real
    # spending: the next attempt is checked again when it gets its slot.
    long_reply = " ".join(["word"] * 30)
    model = ScriptedModel([long_reply], latency=0.01, max_concurrency=1, budget_tokens=40,
                          max_tokens=5)

    async def two():
        return await asyncio.gather(*(model.achat(HELLO) for _ in range(2)), return_exceptions=True)

    first, second = run(two())
    assert first == long_reply and isinstance(second, BudgetExceededError)
    assert model.calls == 1


def test_requests_cancelled_in_flight_are_accounted():
    # Issue 14, defect 3: the server received 16 requests, usage said 13.
    started = asyncio.Event()
    never = asyncio.Event()

    async def hang(messages, **kwargs):
        started.set()
        await never.wait()
        return "never"

    model = ScriptedModel(hang)

    async def cancel_one():
        task = asyncio.ensure_future(model.achat(HELLO))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_one())
    assert model.calls == 1
    used = model.get_usage()
    assert used["requests"] == 1 and used["prompt_tokens"] == model.count_message_tokens(HELLO)
    assert model.limits.budget.reserved == (0, 0.0)


def test_a_cancelled_request_gives_its_reservation_back():
    started = asyncio.Event()
    never = asyncio.Event()

    async def hang(messages, **kwargs):
        started.set()
        await never.wait()

    model = ScriptedModel(hang, budget_tokens=500)

    async def cancel_one():
        task = asyncio.ensure_future(model.achat(HELLO))
        await started.wait()
        assert model.limits.budget.reserved[0] == 8 + 64
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(cancel_one())
    assert model.limits.budget.reserved == (0, 0.0)


def test_clear_usage_restarts_the_budget():
    model = ScriptedModel(["ok"], budget_tokens=20, max_tokens=10)
    model.chat(HELLO)
    with pytest.raises(BudgetExceededError):
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
    assert "status 503" in caplog.text and "retry 1 of 8" in caplog.text
    assert "TransientError: injected 503" in caplog.text  # the error text itself


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


def test_pipeline_options_are_declared_once():
    # ChatCompletionModel, Limits and get_config all read PipelineOptions: no second list of
    # names or defaults anywhere.
    client_options = inspect.signature(ChatCompletionModel.__init__).parameters
    assert [p.kind for p in client_options.values()][-1] is inspect.Parameter.VAR_KEYWORD
    assert set(client_options) == {"self", "model", "options"}
    names = [f.name for f in fields(PipelineOptions)]
    defaults = {f.name: f.default for f in fields(PipelineOptions)}
    assert ScriptedModel(**defaults).get_config() == {"model": "scripted", "latency": 0.0}
    assert Limits(**{n: defaults[n] for n in Limits._LIMIT_OPTIONS}).get_config() == {}
    limits = ScriptedModel(max_retries=2).limits
    assert limits.options.max_retries == limits.max_retries == 2
    assert set(Limits._LIMIT_OPTIONS) < set(names)


def test_a_misspelled_option_is_refused_with_a_suggestion():
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_retry' .*'max_retries'"):
        ScriptedModel(max_retry=2)
    with pytest.raises(TypeError, match="'budget_token'.*'budget_tokens'"):
        Limits(budget_token=5)


# Process-wide concurrency ------------------------------------------------------------------------


def _wait_until(condition, what):
    """Wait (on events set by other threads) until ``condition()``; fail loudly after 10 s."""
    import time

    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def test_the_cap_is_shared_by_event_loops_in_other_threads():
    # One cap per client per process: a request on another thread's loop waits for the slot.
    import threading

    started = {"a": threading.Event(), "b": threading.Event()}
    release_a = threading.Event()

    def reply(messages, **kwargs):
        name = messages[-1]["content"]
        started[name].set()
        if name == "a":
            release_a.wait(10)
        return name

    model = ScriptedModel(reply, max_concurrency=1)
    results = {}

    def ask(name):
        results[name] = asyncio.run(model.achat([{"role": "user", "content": name}]))

    first = threading.Thread(target=ask, args=("a",))
    first.start()
    assert started["a"].wait(10)
    second = threading.Thread(target=ask, args=("b",))
    second.start()
    _wait_until(lambda: len(model.limits.concurrency._waiters) == 1, "b to queue for the slot")
    assert not started["b"].is_set()  # b waits although it runs on its own event loop
    release_a.set()
    first.join(10)
    second.join(10)
    assert results == {"a": "a", "b": "b"} and model.limits.concurrency.in_use == 0


def test_a_waiter_cancelled_in_the_queue_passes_its_turn_on():
    limit = ConcurrencyLimit(1)
    order = []

    async def scenario():
        release = asyncio.Event()

        async def holder():
            async with limit.slot():
                order.append("holder")
                await release.wait()

        async def waiter(name):
            async with limit.slot():
                order.append(name)

        first = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        cancelled = asyncio.ensure_future(waiter("cancelled"))
        second = asyncio.ensure_future(waiter("second"))
        while len(limit._waiters) < 2:
            await asyncio.sleep(0)
        cancelled.cancel()
        release.set()
        await asyncio.gather(first, second)
        assert cancelled.cancelled()

    asyncio.run(scenario())
    assert order == ["holder", "second"] and limit.in_use == 0


@given(cancel=st.lists(st.booleans(), min_size=1, max_size=8), cap=st.integers(1, 3))
def test_property_slots_are_never_lost_or_duplicated_under_cancellation(cancel, cap):
    limit = ConcurrencyLimit(cap)
    peak = [0]

    async def scenario():
        release = asyncio.Event()

        async def user():
            async with limit.slot():
                peak[0] = max(peak[0], limit.in_use)
                await release.wait()

        tasks = [asyncio.ensure_future(user()) for _ in cancel]
        await asyncio.sleep(0)
        for task, drop in zip(tasks, cancel):
            if drop:
                task.cancel()
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    assert peak[0] <= cap and limit.in_use == 0 and not limit._waiters

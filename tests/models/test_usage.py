"""Usage accounting: per client, run-wide, and per block."""

import asyncio
import dataclasses
import threading

import pytest

from afnio._runtime import run
from afnio.models import Usage, get_usage, reset_usage, track_usage
from afnio.models.tokens import count_message_tokens, count_tokens
from afnio.models.usage import record_usage
from afnio.testing import ScriptedModel

HELLO = [{"role": "user", "content": "hello there"}]


class PricedModel(ScriptedModel):
    """A scripted model billed like OpenAI's gpt-4.1-nano."""

    provider = "openai"


def test_usage_adds_up():
    a = Usage(requests=1, prompt_tokens=10, completion_tokens=2, cached_tokens=4, cost_usd=0.5)
    b = Usage(requests=2, prompt_tokens=1, completion_tokens=1, cached_tokens=0, cost_usd=0.25)
    assert (a + b).as_dict() == {
        "requests": 3,
        "prompt_tokens": 11,
        "completion_tokens": 3,
        "cached_tokens": 4,
        "cost_usd": 0.75,
    }
    a += b
    assert a == Usage(3, 11, 3, 4, 0.75)
    assert a.total_tokens == 14


def test_every_counter_is_added():
    # Addition is spelled out field by field (it runs per request): none may be left out.
    for field in dataclasses.fields(Usage):
        one = Usage(**{field.name: 1})
        total = Usage(**{field.name: 2})
        total += one
        assert (one + one, total) == (Usage(**{field.name: 2}), Usage(**{field.name: 3}))


def test_client_usage_counts_requests_and_tokens():
    model = ScriptedModel(["a reply"])
    model.chat(HELLO)
    model.chat(HELLO)
    prompt = count_message_tokens(HELLO, "scripted")
    completion = count_tokens("a reply", "scripted")
    assert model.get_usage() == {
        "requests": 2,
        "prompt_tokens": 2 * prompt,
        "completion_tokens": 2 * completion,
        "cached_tokens": 0,
        "cost_usd": 0.0,
    }
    model.clear_usage()
    assert model.get_usage()["requests"] == 0


def test_priced_client_records_cost():
    model = PricedModel(["a reply"], model="gpt-4.1-nano-2025-04-14")
    model.chat(HELLO)
    prompt = count_message_tokens(HELLO, model.model)
    completion = count_tokens("a reply", model.model)
    expected = (prompt * 0.10 + completion * 0.40) / 1_000_000
    assert model.get_usage()["cost_usd"] == pytest.approx(expected)


def test_track_usage_sees_only_its_block():
    model = ScriptedModel()
    model.chat(HELLO)
    with track_usage() as outer:
        model.chat(HELLO)
        with track_usage() as inner:
            model.chat(HELLO)
        model.chat(HELLO)
    model.chat(HELLO)
    assert (outer.requests, inner.requests) == (3, 1)
    assert outer.prompt_tokens == 3 * count_message_tokens(HELLO, "scripted")


def test_track_usage_is_live_and_counts_async_work():
    model = ScriptedModel(latency=0.001)

    async def many():
        await asyncio.gather(*(model.achat(HELLO) for _ in range(20)))

    with track_usage() as used:
        run(many())
        assert used.requests == 20
        model.chat(HELLO)
        assert used.requests == 21


def test_run_wide_total_and_reset():
    reset_usage()
    ScriptedModel().chat(HELLO)
    ScriptedModel().chat(HELLO)
    assert get_usage().requests == 2
    snapshot = get_usage()
    ScriptedModel().chat(HELLO)
    assert snapshot.requests == 2  # a snapshot, not a live view
    reset_usage()
    assert get_usage() == Usage()


def test_recording_is_thread_safe():
    reset_usage()
    one = Usage(requests=1, prompt_tokens=3, completion_tokens=1, cost_usd=0.001)

    def spend():
        for _ in range(500):
            record_usage(one)

    with track_usage() as used:
        threads = [threading.Thread(target=spend) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert used.requests == 4000 and used.prompt_tokens == 12000
    assert get_usage().requests == 4000
    assert used.cost_usd == pytest.approx(4.0)

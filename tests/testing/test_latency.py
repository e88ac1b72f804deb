"""LatencyModel, and the offline models that take it: durations follow the prompt and the reply.

No test measures the clock: the models' sleeps are recorded instead (each model sleeps through
its ``_sleep``), and the recorded durations are compared with the formula.
"""

import asyncio

import openai
import pytest

from afnio._runtime import run
from afnio.models.tokens import count_message_tokens, count_tokens
from afnio.testing import FakeProviderServer, LatencyModel, ScriptedModel
from afnio.testing.latency import LatencyModel as Direct


def recorder(sleeps):
    async def sleep(seconds):
        sleeps.append(seconds)
        await asyncio.sleep(0)

    return sleep


def test_seconds_is_base_plus_token_costs_plus_a_seeded_jitter_per_request():
    model = LatencyModel(base=0.05, per_prompt_token=0.001, per_output_token=0.01)
    assert model.seconds(100, 7) == pytest.approx(0.05 + 0.1 + 0.07)
    jittery = LatencyModel(base=0.05, jitter=0.02, seed=3)
    draws = [jittery.seconds(10, 1, f"request {i}") for i in range(200)]
    assert all(0.05 <= d < 0.07 for d in draws)
    assert len(set(draws)) == 200  # each request its own draw...
    assert draws == [jittery.seconds(10, 1, f"request {i}") for i in range(200)]  # ...always
    other_seed = LatencyModel(base=0.05, jitter=0.02, seed=4)
    assert other_seed.seconds(10, 1, "request 0") != draws[0]
    assert LatencyModel.of(0.2) == LatencyModel(base=0.2) and LatencyModel is Direct
    assert LatencyModel.of(model.as_dict()) == model
    assert not LatencyModel(base=1).per_token and LatencyModel(jitter=0.1).per_token


@pytest.mark.parametrize(
    "fields", [{"base": -1}, {"per_prompt_token": float("nan")}, {"jitter": "1"}, {"seed": 1.5}]
)
def test_bad_fields_are_refused(fields):
    with pytest.raises(ValueError, match="LatencyModel"):
        LatencyModel(**fields)


def test_scripted_model_sleeps_the_modelled_time_of_each_request():
    latency = LatencyModel(base=0.5, per_prompt_token=0.01, per_output_token=0.1, jitter=0.3)
    model = ScriptedModel(lambda messages, **kw: "a short reply", latency=latency)
    sleeps = []
    model._sleep = recorder(sleeps)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert model.chat(messages) == "a short reply"
    expected = latency.seconds(
        count_message_tokens(messages), count_tokens("a short reply"),
        LatencyModel.request_key(["Be brief.", "Hi"]),
    )
    assert sleeps == [pytest.approx(expected)]  # one sleep, once the reply is known
    assert model.get_config()["latency"] == latency.as_dict()
    rebuilt = ScriptedModel.from_config(model.get_config())
    assert rebuilt._latency == latency


def test_a_constant_latency_stays_one_sleep_before_the_reply():
    order = []
    model = ScriptedModel(lambda messages, **kw: order.append("reply") or "ok", latency=0.25)

    async def sleep(seconds):
        order.append(seconds)

    model._sleep = sleep
    model.chat([{"role": "user", "content": "hi"}])
    assert order == [0.25, "reply"] and model.get_config()["latency"] == 0.25
    with pytest.raises(ValueError, match="base must be a finite number >= 0"):
        ScriptedModel(latency=-1)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_the_fake_server_sleeps_by_the_words_its_usage_reports(api):
    latency = LatencyModel(base=0.5, per_prompt_token=0.01, per_output_token=0.1, jitter=0.3)
    sleeps = []
    with FakeProviderServer(reply=lambda body: "three word reply", latency=latency) as server:
        server._sleep = recorder(sleeps)
        if api == "openai":
            with openai.OpenAI(base_url=server.openai_base_url, api_key="t") as client:
                client.chat.completions.create(
                    model="m", messages=[{"role": "system", "content": "be very brief"},
                                         {"role": "user", "content": "hello there"}])
            key = LatencyModel.request_key(["be very brief", "hello there"])
        else:
            import anthropic

            with anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="t") as client:
                client.messages.create(model="m", max_tokens=5, system="be very brief",
                                       messages=[{"role": "user", "content": "hello there"}])
            key = LatencyModel.request_key(["hello there", "be very brief"])
    # 5 prompt words, 3 reply words.
    assert sleeps == [pytest.approx(latency.seconds(5, 3, key))]


def test_a_faulted_request_waits_only_the_base():
    sleeps = []
    latency = LatencyModel(base=0.5, per_prompt_token=1.0)
    with FakeProviderServer(latency=latency, faults=[500]) as server:
        server._sleep = recorder(sleeps)
        with openai.OpenAI(base_url=server.openai_base_url, api_key="t", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "many words in here"}])
    assert sleeps == [0.5]


def test_requests_still_overlap_under_a_token_latency():
    model = ScriptedModel(latency=LatencyModel(per_prompt_token=0.0001))

    async def both():
        return await asyncio.gather(*(model.achat([{"role": "user", "content": f"q{i}"}])
                                      for i in range(8)))

    assert run(both()) == [f"q{i}" for i in range(8)]
    assert model.max_in_flight == 8

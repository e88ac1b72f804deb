"""Every client knows its context window, counts tokens and refuses a request that can't fit."""

from __future__ import annotations

import json
import math
import warnings
from importlib import resources

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio.models import (
    DEFAULT_CONTEXT_WINDOW,
    DEFAULT_OUTPUT_RESERVE,
    ContextWindowError,
    ModelError,
    client_from_config,
    client_to_config,
    context_window_for,
    get_client,
)
from afnio.models import tokens as token_counting
from afnio.models.anthropic import AsyncAnthropic
from afnio.models.openai import AsyncOpenAI
from afnio.testing import ScriptedModel
from afnio.testing.scripted import SCRIPTED_CONTEXT_WINDOW

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# ----------------------------------------------------------------------------- the table


def test_the_shipped_table_is_well_formed():
    text = resources.files("afnio.models").joinpath("context_windows.json").read_text()
    windows = json.loads(text)["models"]
    assert windows and all(isinstance(w, int) and w >= 4096 for w in windows.values())


@pytest.mark.parametrize(
    ("model", "window"),
    [
        ("gpt-4.1-nano", 1_047_576),
        ("gpt-4.1-nano-2025-04-14", 1_047_576),
        ("gpt-4o-2024-08-06", 128_000),
        ("gpt-4o-mini-2024-07-18", 128_000),
        ("chatgpt-4o-latest", 128_000),
        ("gpt-4-0613", 8_192),
        ("gpt-4-turbo-2024-04-09", 128_000),  # the longest listed family wins over "gpt-4"
        ("o3-mini-2025-01-31", 200_000),
        ("o1-preview-2024-09-12", 128_000),  # not o1's 200k
        ("claude-sonnet-4-5-20250929", 200_000),
        ("claude-3-5-haiku-latest", 200_000),
    ],
)
def test_names_resolve_to_their_family(model, window):
    assert context_window_for(model) == window


@pytest.mark.parametrize("model", ["llama3", "gpt-4x", "claude", "o3x-mini", ""])
def test_unlisted_names_have_no_window(model):
    assert context_window_for(model) is None


def test_provider_clients_take_the_window_from_the_table():
    openai_client = AsyncOpenAI("gpt-4o-2024-08-06", api_key="sk-test")
    anthropic_client = AsyncAnthropic("claude-haiku-4-5-20251001", api_key="sk-test")
    assert openai_client.context_window == 128_000
    assert anthropic_client.context_window == 200_000


def test_an_explicit_window_overrides_the_table():
    client = get_client("openai/gpt-4o", api_key="sk-test", context_window=50_000)
    assert client.context_window == 50_000
    assert client.get_config()["context_window"] == 50_000


def test_unknown_model_gets_the_default_and_one_warning_naming_it():
    client = AsyncOpenAI("unlisted-model-for-window-test", base_url="http://127.0.0.1:9/v1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert client.context_window == DEFAULT_CONTEXT_WINDOW == 8192
        assert client.context_window == 8192
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "'unlisted-model-for-window-test'" in messages[0]
    assert "context_window=" in messages[0]


def test_an_explicit_window_never_warns():
    client = AsyncOpenAI("another-unlisted-model", base_url="http://127.0.0.1:9/v1",
                         context_window=32_768)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert client.context_window == 32_768


@pytest.mark.parametrize(
    ("bad", "error"),
    [(0, ValueError), (-5, ValueError), (1.5, TypeError), ("4096", TypeError), (True, TypeError)],
)
def test_a_bad_window_is_refused_at_construction(bad, error):
    with pytest.raises(error, match="option context_window must be"):
        ScriptedModel(context_window=bad)


def test_scripted_model_has_a_large_default_window():
    assert ScriptedModel().context_window == SCRIPTED_CONTEXT_WINDOW == 1_000_000
    assert ScriptedModel(context_window=300).context_window == 300


def test_the_window_survives_a_config_round_trip():
    client = ScriptedModel(context_window=777, max_tokens=12)
    rebuilt = client_from_config(json.loads(json.dumps(client_to_config(client))))
    assert (rebuilt.context_window, rebuilt.output_reserve({})) == (777, 12)


# ----------------------------------------------------------------------------- counting


def test_openai_models_with_a_local_encoding_count_exactly():
    client = AsyncOpenAI("gpt-4", api_key="sk-test")  # cl100k_base: always available offline
    text = "The quick brown fox jumps over the lazy dog."
    assert client.count_tokens(text) == token_counting.count_tokens(text, "gpt-4") == 10
    assert client.count_message_tokens(QUESTION) == token_counting.count_message_tokens(
        QUESTION, "gpt-4")


@pytest.mark.parametrize(
    "client",
    [
        AsyncAnthropic("claude-haiku-4-5", api_key="sk-test"),
        AsyncOpenAI("llama3", base_url="http://127.0.0.1:9/v1", context_window=4096),
    ],
    ids=["anthropic", "openai-compatible"],
)
def test_other_models_count_the_estimate_times_the_margin(client):
    text = "The quick brown fox jumps over the lazy dog. " * 7
    estimate = token_counting.count_tokens(text)
    assert client.count_tokens(text) == math.ceil(estimate * token_counting.ESTIMATE_MARGIN)
    assert client.count_tokens(text) > estimate
    prompt = token_counting.count_message_tokens(QUESTION)
    assert client.count_message_tokens(QUESTION) == math.ceil(
        prompt * token_counting.ESTIMATE_MARGIN)


def test_a_compatible_server_named_like_an_openai_model_is_not_trusted_to_count_alike():
    # A vLLM server may call any model "gpt-4"; only OpenAI's own endpoint counts with tiktoken.
    client = AsyncOpenAI("gpt-4", base_url="http://127.0.0.1:9/v1")
    assert client.count_tokens("hello world") == token_counting.with_margin(2)


def test_count_tokens_refuses_non_text():
    with pytest.raises(TypeError, match="text must be a str"):
        ScriptedModel().count_tokens(42)


# ----------------------------------------------------------------------------- output reserve


@pytest.mark.parametrize(
    ("client", "default"),
    [
        (ScriptedModel(), 64),
        (ScriptedModel(max_tokens=7), 7),
        (AsyncOpenAI("gpt-4o", api_key="sk-test"), DEFAULT_OUTPUT_RESERVE),
        (AsyncAnthropic("claude-haiku-4-5", api_key="sk-test", max_tokens=333), 333),
    ],
    ids=["scripted", "scripted-7", "openai", "anthropic"],
)
def test_output_reserve_is_the_request_cap_else_the_client_default(client, default):
    assert client.output_reserve({}) == default
    assert client.output_reserve({"temperature": 0.3, "max_tokens": None}) == default
    assert client.output_reserve({"max_tokens": 21}) == 21
    assert client.output_reserve({"max_completion_tokens": 22}) == 22


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ({"max_tokens": "ten"}, TypeError, "max_tokens must be a positive int, got 'ten'"),
        ({"max_tokens": 2.5}, TypeError, "max_tokens must be a positive int"),
        ({"max_tokens": True}, TypeError, "max_tokens must be a positive int"),
        ({"max_completion_tokens": 0}, ValueError, "max_completion_tokens must be >= 1"),
        ({"max_tokens": 5, "max_completion_tokens": 5}, ValueError, "not both"),
    ],
)
def test_a_bad_output_cap_is_refused_before_sending(args, error, match):
    model = ScriptedModel(["ok"])
    with pytest.raises(error, match=match):
        model.chat(QUESTION, **args)
    assert model.calls == 0


# ----------------------------------------------------------------------------- the check


def _fitting_window(model: ScriptedModel, messages, reserve: int) -> int:
    return model.count_message_tokens(messages) + reserve


def test_a_request_filling_the_window_exactly_is_sent_one_more_token_is_refused():
    probe = ScriptedModel()
    needed = _fitting_window(probe, QUESTION, 10)
    exact = ScriptedModel(["ok"], context_window=needed)
    assert exact.chat(QUESTION, max_tokens=10) == "ok"
    assert exact.calls == 1

    short = ScriptedModel(["ok"], context_window=needed - 1)
    with pytest.raises(ContextWindowError) as raised:
        short.chat(QUESTION, max_tokens=10)
    assert (raised.value.needed, raised.value.available) == (needed, needed - 1)
    assert isinstance(raised.value, ModelError)
    message = str(raised.value)
    assert "ScriptedModel(" in message and f"holds {needed - 1}" in message
    assert "10 reserved for the reply" in message and "nothing was sent" in message
    assert short.calls == 0 and short.get_usage()["requests"] == 0


def test_the_default_reserve_counts_when_the_request_gives_no_cap():
    probe = ScriptedModel(max_tokens=40)
    needed = _fitting_window(probe, QUESTION, 40)
    with pytest.raises(ContextWindowError):
        ScriptedModel(["ok"], max_tokens=40, context_window=needed - 1).chat(QUESTION)
    assert ScriptedModel(["ok"], max_tokens=40, context_window=needed).chat(QUESTION) == "ok"


def test_cache_hits_of_an_oversized_request_are_refused_too(tmp_path):
    from afnio.models import ResponseCache

    cache = ResponseCache(tmp_path / "cache.sqlite")
    ScriptedModel(["big"], cache=cache).chat(QUESTION, max_tokens=500)
    small = ScriptedModel(["never"], cache=cache, context_window=100)
    with pytest.raises(ContextWindowError):
        small.chat(QUESTION, max_tokens=500)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_no_oversized_request_reaches_the_server(server, api):
    if api == "openai":
        client = AsyncOpenAI("gpt-4", base_url=server.openai_base_url, context_window=60)
    else:
        client = AsyncAnthropic("claude-haiku-4-5", base_url=server.anthropic_base_url,
                                context_window=60)
    assert client.chat(QUESTION, max_tokens=8) == QUESTION[0]["content"]
    with pytest.raises(ContextWindowError):
        client.chat([{"role": "user", "content": "word " * 80}], max_tokens=8)
    with pytest.raises(ContextWindowError):
        client.chat(QUESTION, max_tokens=59)
    assert len(server.requests) == 1


@given(
    window=st.integers(min_value=16, max_value=600),
    reserve=st.integers(min_value=1, max_value=64),
    words=st.lists(st.integers(min_value=0, max_value=150), min_size=1, max_size=6),
)
def test_property_a_request_is_sent_exactly_when_it_fits(window, reserve, words):
    # Distinct texts per message; every sent request fits, every refused one would not have.
    model = ScriptedModel(["ok"], context_window=window)
    sent_fitting = 0
    for index, count in enumerate(words):
        messages = [{"role": "user", "content": " ".join(f"w{index}x{i}" for i in range(count))}]
        needed = model.count_message_tokens(messages) + reserve
        try:
            model.chat(messages, max_tokens=reserve)
        except ContextWindowError as error:
            assert needed > window and (error.needed, error.available) == (needed, window)
        else:
            assert needed <= window
            sent_fitting += 1
    assert model.calls == sent_fitting
    for messages, args in model.requests:
        assert model.count_message_tokens(messages) + model.output_reserve(args) <= window

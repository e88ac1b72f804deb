"""Token counting: tiktoken when its files are local, the bundled offline encoding otherwise."""

import hashlib
import math
import socket
import warnings

import pytest
import tiktoken
import tiktoken.registry
from hypothesis import example, given
from hypothesis import strategies as st

from afnio.models import tokens
from afnio.models.tokens import CHARS_PER_TOKEN, count_message_tokens, count_tokens


@pytest.fixture
def no_network(monkeypatch):
    """Make every outgoing connection fail at once, and record that one was tried."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def cold_tiktoken(monkeypatch, tmp_path):
    """A process state where no encoding is loaded and tiktoken's download cache is empty."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(tokens, "_encodings", {})
    monkeypatch.setattr(tokens, "_preloading", set())
    monkeypatch.setattr(tokens, "_unreported", {})
    yield tmp_path / "tiktoken-cache"


def test_counts_known_text():
    assert count_tokens("hello world") == 2
    assert count_tokens("") == 0


def test_rejects_non_string():
    with pytest.raises(TypeError, match="count_tokens: text must be a str, got int"):
        count_tokens(42)


def test_special_token_markers_are_counted_as_text():
    assert count_tokens("<|endoftext|>") > 1


def test_counts_offline_for_every_model_with_network_unreachable(no_network, cold_tiktoken):
    # o200k_base (gpt-4o) isn't cached, so the bundled cl100k_base must answer without a download.
    counts = {
        model: count_tokens("The quick brown fox jumps over the lazy dog.", model)
        for model in (None, "gpt-4o", "gpt-4.1-nano", "claude-haiku-4-5", "smollm2", "o3")
    }
    assert set(counts.values()) == {10}
    assert no_network == []


def test_corrupt_tiktoken_cache_file_is_not_trusted(no_network, cold_tiktoken):
    # tiktoken would delete a file failing its hash check and download it again: never hand it one.
    url, _ = tokens._DOWNLOADS["o200k_base"]
    cold_tiktoken.mkdir(parents=True)
    (cold_tiktoken / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"not an encoding")
    assert count_tokens("hello world", "gpt-4o") == 2
    assert no_network == []


def test_falls_back_to_estimate_with_a_warning(monkeypatch, cold_tiktoken):
    def unavailable(name):
        raise ValueError(f"Unknown encoding {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", unavailable)
    text = "x" * 10
    with pytest.warns(RuntimeWarning, match="estimated as one token per 4 characters"):
        assert count_tokens(text) == math.ceil(len(text) / CHARS_PER_TOKEN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_tokens("y" * 9) == 3  # warned once, not on every call


def test_message_tokens_add_the_chat_format_overhead():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello world", "name": "ann"},
    ]
    expected = (
        3
        + sum(3 + count_tokens(m["role"]) + count_tokens(m["content"]) for m in messages)
        + 1
        + count_tokens("ann")
    )
    assert count_message_tokens(messages) == expected


def test_message_tokens_accept_text_parts():
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": " world"}],
        }
    ]
    assert count_message_tokens(parts) == count_message_tokens(
        [{"role": "user", "content": "hello world"}]
    )


def test_message_tokens_reject_bad_messages():
    with pytest.raises(TypeError, match="each message must be a dict, got str"):
        count_message_tokens(["hello"])
    with pytest.raises(TypeError, match="content must be a str or a list of text parts, got int"):
        count_message_tokens([{"role": "user", "content": 3}])


@given(st.text(min_size=1, max_size=200))
def test_count_is_between_one_and_the_byte_length(text):
    assert 1 <= count_tokens(text) <= len(text.encode("utf-8"))


_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text()},
        optional={"name": st.text(alphabet="abcxyz_", min_size=1, max_size=8)},
    ),
    min_size=1, max_size=4,
)


@given(_MESSAGES)
@example([{"role": "user", "content": "😀🎉🧪 ✓ ñ 日本語"}])
def test_the_byte_bound_is_never_below_the_token_count(messages):
    for model in ("gpt-4.1-nano", "gpt-4", None):
        assert tokens.message_bytes_bound(messages) >= count_message_tokens(messages, model)


@given(_MESSAGES, st.integers(min_value=-2, max_value=2))
@example([{"role": "user", "content": "😀🎉🧪 ✓ ñ 日本語"}], 0)
def test_prompt_fits_agrees_with_the_count_around_the_limit(messages, offset):
    from afnio.models.openai import AsyncOpenAI
    from afnio.testing import ScriptedModel

    for client in (ScriptedModel(model="gpt-4.1-nano"),
                   AsyncOpenAI("claude-like", base_url="http://127.0.0.1:9/v1")):
        count = client.count_message_tokens(messages)
        for limit in (count + offset, tokens.with_margin(tokens.message_bytes_bound(messages))):
            assert client.prompt_fits(messages, limit) == (count <= limit)

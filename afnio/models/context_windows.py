"""Context windows of provider models, from ``context_windows.json``.

A model's context window is the most tokens one request may hold, prompt plus reply. Clients ask
:func:`context_window_for` when they were given no ``context_window=`` and have no window of
their own (a :class:`~afnio.models.local.LocalModel` uses its ``n_ctx``). A name that isn't in
the table matches the longest listed name it starts with, followed by ``-``: dated snapshots
(``"gpt-4o-2024-08-06"`` → ``"gpt-4o"``, ``"claude-sonnet-4-5-20250929"`` →
``"claude-sonnet-4-5"``) and ``-latest`` aliases take their family's window. A model the table
doesn't know gets :data:`DEFAULT_CONTEXT_WINDOW` from :func:`unknown_context_window`, with a
warning the first time, naming the model and how to set its window.

Example:
    >>> context_window_for("gpt-4o-2024-08-06")
    128000
    >>> context_window_for("my-own-model") is None
    True
"""

from __future__ import annotations

import json
import threading
import warnings
from importlib import resources

__all__ = ["DEFAULT_CONTEXT_WINDOW", "context_window_for", "unknown_context_window"]

DEFAULT_CONTEXT_WINDOW = 8192
"""Tokens assumed for a model whose window nobody stated (small enough for most servers)."""

_lock = threading.Lock()
_windows: dict[str, int] | None = None
_warned: set[tuple[str, str]] = set()


def _load() -> dict[str, int]:
    global _windows
    with _lock:
        if _windows is None:
            text = resources.files("afnio.models").joinpath("context_windows.json").read_text()
            _windows = {name: int(window) for name, window in json.loads(text)["models"].items()}
        return _windows


def context_window_for(model: str) -> int | None:
    """The context window of ``model`` from the shipped table, or ``None`` if it isn't listed.

    Args:
        model: The model name as sent to the provider (e.g. ``"claude-haiku-4-5-20251001"``).

    Returns:
        Tokens of prompt plus reply; ``None`` for a name neither listed nor a listed name
        followed by ``-`` and a suffix.

    Example:
        >>> context_window_for("claude-haiku-4-5-20251001")
        200000
        >>> context_window_for("gpt-4-0613")
        8192
    """
    windows = _load()
    if model in windows:
        return windows[model]
    family = max((name for name in windows if model.startswith(name + "-")), key=len, default=None)
    return None if family is None else windows[family]


def unknown_context_window(client: str, provider: str, model: str) -> int:
    """:data:`DEFAULT_CONTEXT_WINDOW`, warning once per (provider, model) that it is a guess.

    Args:
        client: The client's name, shown in the warning (e.g. its repr).
        provider: The client's provider.
        model: The model name.

    Returns:
        :data:`DEFAULT_CONTEXT_WINDOW`.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     unknown_context_window("AsyncOpenAI('llama3')", "openai-compatible", "llama3")
        8192
    """
    with _lock:
        first_time = (provider, model) not in _warned
        _warned.add((provider, model))
    if first_time:
        warnings.warn(
            f"{client}: the context window of {provider + ' ' if provider else ''}model "
            f"{model!r} is unknown, so "
            f"{DEFAULT_CONTEXT_WINDOW} tokens are assumed; give the model's real window with "
            f"the client's context_window= argument (e.g. get_client(..., "
            f"context_window=32768))",
            UserWarning,
            stacklevel=3,
        )
    return DEFAULT_CONTEXT_WINDOW

"""Plumbing shared by the clients built on official provider SDKs (``openai``, ``anthropic``).

Three concerns: keeping one SDK async client per running event loop (an SDK client's connection
pool belongs to the loop that opened it), reading ``Retry-After`` headers, and keeping API keys out
of error messages.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["PerLoop", "json_schema_of", "redact", "retry_after_seconds"]

T = TypeVar("T")


class PerLoop(Generic[T]):
    """One lazily built object per running event loop.

    ``achat`` may be awaited on afnio's runtime loop, on a private nested loop, or on a user's
    loop; an SDK async client must never be shared between them. Entries of loops that have
    been closed are dropped.

    Args:
        factory: Builds the object for the current loop; called at most once per loop.

    Example:
        >>> pool = PerLoop(object)
        >>> async def same():
        ...     return pool.get() is pool.get()
        >>> asyncio.run(same())
        True
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._items: dict[asyncio.AbstractEventLoop, T] = {}
        self._lock = threading.Lock()

    def get(self) -> T:
        """The object for the running loop (must be called from a coroutine)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            item = self._items.get(loop)
            if item is None:
                for stale in [lp for lp in self._items if lp.is_closed()]:
                    del self._items[stale]
                item = self._items[loop] = self._factory()
            return item

    def pop(self) -> T | None:
        """Remove and return the running loop's object (``None`` if it has none)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            return self._items.pop(loop, None)

    def __len__(self) -> int:
        with self._lock:
            return sum(not loop.is_closed() for loop in self._items)


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a provider asked us to wait, from ``retry-after-ms`` or ``retry-after``.

    ``retry-after`` may be a number of seconds or an HTTP date. Unparseable or negative values
    give ``None``.

    Example:
        >>> retry_after_seconds({"retry-after": "2"})
        2.0
        >>> retry_after_seconds({"retry-after-ms": "150"})
        0.15
    """
    if not headers:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        value = _finite(milliseconds)
        if value is not None and value >= 0:
            return value / 1000
    raw = headers.get("retry-after")
    if raw is None:
        return None
    value = _finite(raw)
    if value is not None:
        return value if value >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` (and of its first 8 characters, which
    providers echo in masked form) replaced by ``***``.

    Example:
        >>> redact("bad key sk-abcdef123456", "sk-abcdef123456")
        'bad key ***'
    """
    if not secret:
        return text
    text = text.replace(secret, "***")
    if len(secret) >= 12:
        text = text.replace(secret[:8], "***")
    return text


def json_schema_of(response_format: Any, who: str) -> tuple[dict[str, Any] | None, str]:
    """The JSON schema a ``response_format`` asks for, and its name.

    Accepted forms: OpenAI's ``{"type": "json_schema", "json_schema": {"name", "schema"}}``,
    llama.cpp's ``{"type": "json_object", "schema": {...}}``, ``{"type": "json_object"}`` (any
    JSON object: the schema is ``{"type": "object"}``), ``{"type": "text"}`` (no schema: returns
    ``None``) or a bare JSON schema dict.

    Args:
        response_format: The ``response_format`` completion argument.
        who: The client and method, for error messages.

    Raises:
        TypeError: If ``response_format`` is not a dict.
        ValueError: If it is a ``json_schema`` format without a schema dict.

    Example:
        >>> json_schema_of({"type": "json_schema", "json_schema": {"name": "answer",
        ...     "schema": {"type": "object"}}}, "demo")
        ({'type': 'object'}, 'answer')
    """
    if not isinstance(response_format, dict):
        raise TypeError(
            f"{who}: response_format must be a dict (OpenAI-style or a JSON schema), "
            f"got {type(response_format).__name__}"
        )
    kind = response_format.get("type")
    if kind == "text":
        return None, "text"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError(
                f"{who}: response_format of type 'json_schema' needs "
                f"{{'json_schema': {{'name': ..., 'schema': {{...}}}}}}, got {response_format!r}"
            )
        return schema, str(spec.get("name") or "response")
    if kind == "json_object":
        schema = response_format.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise ValueError(f"{who}: response_format 'schema' must be a dict, got {schema!r}")
        return schema, "response"
    return response_format, "response"

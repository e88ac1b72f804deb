"""What the clients built on official provider SDKs (``openai``, ``anthropic``) share.

:class:`SdkChatModel` is their common base: API key handling, one SDK async client per running
event loop (an SDK client's connection pool belongs to the loop that opened it), closing, the
common config and the translation of SDK errors into afnio's. The helpers read ``Retry-After``
headers, keep API keys out of error messages and check completion arguments (the last also for
:class:`~afnio.models.local.LocalModel`).
"""

from __future__ import annotations

import abc
import asyncio
import email.utils
import functools
import inspect
import json
import math
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

from afnio.models.errors import ModelError, TransientError
from afnio.models.model import ChatCompletionModel

__all__ = [
    "PerLoop",
    "SdkChatModel",
    "check_model_and_timeout",
    "check_one_whole_reply",
    "create_arguments",
    "json_schema_of",
    "move_unknown_to_extra_body",
    "redact",
    "refuse_client_set_arguments",
    "rename_max_completion_tokens",
    "retry_after_seconds",
]

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 409, 429})
"""HTTP statuses (besides 5xx) worth retrying."""

NO_KEY_NEEDED = "no-key-needed"
"""The placeholder key sent to a ``base_url`` when no key was given (such servers ignore it)."""


class PerLoop(Generic[T]):
    """One lazily built object per running event loop, closed on its own loop when no longer
    needed.

    ``achat`` may be awaited on afnio's runtime loop, on a private nested loop, or on a user's
    loop; an SDK async client must never be shared between them. With ``close``, each object is
    closed *on its own loop*: when that loop shuts down its async generators (``asyncio.run``
    and afnio's nested loops do), or soon after this ``PerLoop`` is garbage-collected while the
    loop still runs (afnio's runtime loop). Objects of loops closed some other way are dropped.

    Args:
        factory: Builds the object for the current loop; called at most once per loop.
        close: ``async close(item)``, called once per object.

    Example:
        >>> closed = []
        >>> async def close(item):
        ...     closed.append(item)
        >>> pool = PerLoop(object, close=close)
        >>> async def same():
        ...     return pool.get() is pool.get()
        >>> asyncio.run(same()), len(closed)
        (True, 1)
    """

    def __init__(
        self,
        factory: Callable[[], T],
        close: Callable[[T], Awaitable[Any]] | None = None,
    ) -> None:
        self._factory = factory
        self._close = close
        self._items: dict[asyncio.AbstractEventLoop, T] = {}
        # Per loop, a suspended async generator that the loop closes when it shuts down, which
        # closes the loop's object there (see _closer).
        self._closers: dict[asyncio.AbstractEventLoop, Any] = {}
        self._lock = threading.RLock()  # re-entrant: the finalizer may run during get()
        if close is not None:
            # Holds the objects, not this PerLoop, so they outlive it until they are closed.
            finalizer = weakref.finalize(self, _close_all, self._items, self._lock, close)
            finalizer.atexit = False

    def get(self) -> T:
        """The object for the running loop (must be called from a coroutine)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            item = self._items.get(loop)
            if item is None:
                for stale in [lp for lp in self._items if lp.is_closed()]:
                    del self._items[stale]
                    self._closers.pop(stale, None)
                item = self._items[loop] = self._factory()
                if self._close is not None:
                    closer = _closer(loop, self._items, self._lock, self._close)
                    self._closers[loop] = _start(closer)
            return item

    def pop(self) -> T | None:
        """Remove and return the running loop's object (``None`` if it has none); closing it is
        then the caller's job."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._closers.pop(loop, None)
            return self._items.pop(loop, None)

    def __len__(self) -> int:
        with self._lock:
            return sum(not loop.is_closed() for loop in self._items)


_closing: set[asyncio.Task] = set()
"""Close tasks in flight (the loop keeps only weak references to tasks)."""


def _start(generator: Any) -> Any:
    """Advance a new async generator to its first ``yield`` from synchronous code on the running
    loop, so that the loop tracks it (and closes it when it shuts down)."""
    step = generator.__anext__()
    try:
        step.send(None)
    except StopIteration:
        return generator
    raise RuntimeError("PerLoop: a closer must yield before it awaits anything")


async def _closer(
    loop: asyncio.AbstractEventLoop,
    items: dict[asyncio.AbstractEventLoop, Any],
    lock: threading.RLock,
    close: Callable[[Any], Awaitable[Any]],
) -> AsyncIterator[None]:
    """Waits at its ``yield`` until ``loop`` shuts its async generators down, then closes the
    loop's object (unless :meth:`PerLoop.pop` or the finalizer took it first)."""
    try:
        yield
    finally:
        with lock:
            item = items.pop(loop, None)
        if item is not None:
            await close(item)


def _close_all(
    items: dict[asyncio.AbstractEventLoop, Any],
    lock: threading.RLock,
    close: Callable[[Any], Awaitable[Any]],
) -> None:
    """A collected PerLoop's objects: each closed by a task on its own loop, if still running."""
    with lock:
        pairs = list(items.items())
        items.clear()
    for loop, item in pairs:
        if not loop.is_closed():
            loop.call_soon_threadsafe(_close_task, loop, item, close)


def _close_task(
    loop: asyncio.AbstractEventLoop, item: Any, close: Callable[[Any], Awaitable[Any]]
) -> None:
    task = loop.create_task(close(item))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def _close_sdk_client(client: Any) -> None:
    await client.close()


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


def check_model_and_timeout(who: str, model: Any, timeout: Any) -> None:
    """Check an SDK client's ``model`` and ``timeout`` constructor arguments.

    Raises:
        ValueError: If ``model`` is not a non-empty str or ``timeout`` is not > 0.

    Example:
        >>> check_model_and_timeout("AsyncOpenAI", "gpt-4.1-nano", 60.0)
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"{who}: model must be a non-empty str, got {model!r}")
    if not timeout or timeout <= 0:
        raise ValueError(f"{who}: timeout must be > 0 seconds, got {timeout!r}")


def check_one_whole_reply(args: dict[str, Any], who: str, why_one: str) -> None:
    """Remove ``n`` and ``stream`` from ``args``, refusing values asking for more than one
    whole reply.

    Args:
        args: Completion arguments (changed in place).
        who: The client and method, for error messages.
        why_one: Why only one reply is possible, for the ``n`` error message.

    Raises:
        ValueError: If ``n`` is not 1 (or ``None``) or ``stream`` is true.

    Example:
        >>> args = {"n": 1, "stream": False, "temperature": 0.5}
        >>> check_one_whole_reply(args, "demo", "one per request")
        >>> args
        {'temperature': 0.5}
    """
    n = args.pop("n", 1)
    if n not in (None, 1):
        raise ValueError(f"{who}: n={n!r} is not supported; {why_one}")
    if args.pop("stream", False):
        raise ValueError(f"{who}: stream=True is not supported; achat returns the whole text")


def refuse_client_set_arguments(args: Mapping[str, Any], who: str) -> None:
    """Refuse ``model`` and ``messages`` as completion arguments (the client sets them).

    Raises:
        ValueError: If ``args`` holds either.

    Example:
        >>> refuse_client_set_arguments({"temperature": 0.5}, "demo")
    """
    for forbidden in ("model", "messages"):
        if forbidden in args:
            raise ValueError(f"{who}: {forbidden!r} is set by the client, not a completion "
                             "argument")


def rename_max_completion_tokens(args: dict[str, Any], who: str) -> None:
    """Send OpenAI's ``max_completion_tokens`` as ``max_tokens`` (in place).

    Raises:
        ValueError: If ``args`` holds both.

    Example:
        >>> args = {"max_completion_tokens": 20}
        >>> rename_max_completion_tokens(args, "demo")
        >>> args
        {'max_tokens': 20}
    """
    if "max_completion_tokens" in args:
        if "max_tokens" in args:
            raise ValueError(f"{who}: give max_tokens or max_completion_tokens, not both")
        args["max_tokens"] = args.pop("max_completion_tokens")


@functools.cache
def create_arguments(create: Callable[..., Any]) -> frozenset[str]:
    """Keyword arguments of an SDK's ``create`` method (without ``self``).

    Example:
        >>> sorted(create_arguments(lambda self, model, messages: None))
        ['messages', 'model']
    """
    return frozenset(inspect.signature(create).parameters) - {"self"}


def move_unknown_to_extra_body(args: dict[str, Any], accepted: frozenset[str]) -> None:
    """Move the arguments an SDK's ``create`` doesn't list into its ``extra_body`` (in place),
    so they reach the JSON body exactly as given.

    Example:
        >>> args = {"temperature": 0.5, "top_k": 3}
        >>> move_unknown_to_extra_body(args, frozenset({"temperature", "extra_body"}))
        >>> args
        {'temperature': 0.5, 'extra_body': {'top_k': 3}}
    """
    extra_body = dict(args.pop("extra_body", None) or {})
    extra_body.update({name: args.pop(name) for name in list(args) if name not in accepted})
    if extra_body:
        args["extra_body"] = extra_body


class SdkChatModel(ChatCompletionModel):
    """Base of the chat clients built on an official provider SDK.

    It resolves the API key (argument, then the environment; with a ``base_url`` and no key, a
    placeholder), keeps the key only inside one *template* SDK client built with
    ``max_retries=0`` (afnio retries), copies that template once per running event loop, closes
    the running loop's copy in :meth:`aclose`, adds ``base_url`` and ``timeout`` to the config,
    and turns the SDK's exceptions into :class:`~afnio.models.errors.ModelError` /
    :class:`~afnio.models.errors.TransientError` with the key redacted.

    A subclass sets ``_sdk`` (the SDK module), ``_api_key_env`` and ``_vendor``, implements
    ``_new_sdk_template(api_key)`` and ``_api_message(exc)``, and makes its request in ``_send``
    through :meth:`_call_sdk`.

    Args:
        model: The model name.
        api_key: The API key; defaults to the ``_api_key_env`` environment variable.
        base_url: Another endpoint speaking the provider's protocol, or ``None``.
        timeout: Seconds before one HTTP request is abandoned (and retried by afnio).
        **options: Pipeline options of :class:`~afnio.models.model.ChatCompletionModel`.

    Raises:
        ValueError: If ``model`` or ``timeout`` is invalid.
        ModelError: If there is no key and no ``base_url``.
    """

    _sdk: ClassVar[ModuleType]
    _api_key_env: ClassVar[str]
    _vendor: ClassVar[str]
    _missing_key_hint: ClassVar[str] = ""

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None,
        base_url: str | None,
        timeout: float,
        **options: Any,
    ) -> None:
        name = type(self).__name__
        check_model_and_timeout(name, model, timeout)
        super().__init__(model=model, **options)
        key = api_key or os.environ.get(self._api_key_env)
        if not key:
            if base_url is None:
                raise ModelError(
                    f"{name}({model!r}): no {self._vendor} API key; pass api_key= or set "
                    f"{self._api_key_env}{self._missing_key_hint}"
                )
            key = NO_KEY_NEEDED
        self.base_url = base_url
        self.timeout = float(timeout)
        # The key lives only in this SDK object; per-loop clients are copies of it.
        self._template = self._new_sdk_template(key)
        self._clients: PerLoop[Any] = PerLoop(self._new_sdk_client, close=_close_sdk_client)

    @abc.abstractmethod
    def _new_sdk_template(self, api_key: str) -> Any:
        """The SDK async client holding ``api_key`` (built with ``max_retries=0``)."""

    @abc.abstractmethod
    def _api_message(self, exc: Any) -> str:
        """The provider's error message carried by an SDK ``APIStatusError``."""

    def _auth_hint(self) -> str:
        """Text appended to the authentication-failure message."""
        return ""

    def _new_sdk_client(self) -> Any:
        return self._template.copy(
            http_client=self._sdk.DefaultAsyncHttpxClient(timeout=self.timeout)
        )

    async def aclose(self) -> None:
        """Close the connections this client opened on the running event loop.

        Optional: call it before a loop you created (e.g. with ``asyncio.run``) ends, to release
        its connections at once instead of when they are garbage-collected.
        """
        sdk_client = self._clients.pop()
        if sdk_client is not None:
            await sdk_client.close()

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments without the API key (it comes from the environment again)."""
        config = super().get_config()
        config.update(base_url=self.base_url, timeout=self.timeout)
        return config

    async def _call_sdk(self, request: Callable[[Any], Awaitable[T]]) -> T:
        """``request(sdk_client)`` with the running loop's SDK client, SDK errors translated."""
        sdk = self._sdk
        client = self._clients.get()
        try:
            return await request(client)
        except sdk.APIStatusError as exc:
            raise self._status_error(exc) from None
        except sdk.APITimeoutError:
            raise TransientError(
                f"{self.provider} {self.model}: request timed out after {self.timeout}s"
            ) from None
        except sdk.APIConnectionError as exc:
            raise TransientError(f"{self.provider} {self.model}: connection failed: "
                                 f"{self._safe(str(exc.__cause__ or exc))}") from None
        except (json.JSONDecodeError, sdk.APIResponseValidationError) as exc:
            raise TransientError(f"{self.provider} {self.model}: the response body was not "
                                 f"valid JSON ({type(exc).__name__}: {exc})") from None

    def _status_error(self, exc: Any) -> ModelError:
        status = exc.status_code
        name = f"{self.provider} {self.model}"
        if status in RETRYABLE_STATUS or status >= 500:
            return TransientError(
                f"{name}: HTTP {status}: {self._safe(self._api_message(exc))}",
                status=status, retry_after=retry_after_seconds(exc.response.headers),
            )
        if status in (401, 403):
            return ModelError(
                f"{name}: HTTP {status}: authentication failed; check the API key (api_key= or "
                f"{self._api_key_env}){self._auth_hint()}"
            )
        return ModelError(f"{name}: HTTP {status}: {self._safe(self._api_message(exc))}")

    def _safe(self, text: str) -> str:
        return redact(text, self._template.api_key)

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
import difflib
import email.utils
import functools
import inspect
import json
import math
import os
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

from afnio.models.errors import (
    InvalidRequestError,
    MalformedReplyError,
    ModelError,
    StructuredOutputUnsupportedError,
    TransientError,
)
from afnio.models.model import ChatCompletionModel

__all__ = [
    "COMPATIBLE_SERVER_ARGUMENTS",
    "CONNECTIONS",
    "MIN_SECRET_SLICE",
    "PerLoop",
    "SdkChatModel",
    "SharedConnections",
    "check_model_and_timeout",
    "check_one_whole_reply",
    "default_ssl_context",
    "create_arguments",
    "json_schema_of",
    "redact",
    "refuse_client_set_arguments",
    "rename_max_completion_tokens",
    "retry_after_seconds",
    "sort_arguments",
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


class SharedConnections:
    """HTTP connection pools shared by afnio's SDK clients: one per event loop and endpoint.

    Three clients of one endpoint (say the forward, backward and optimizer clients) then reuse
    the same open connections instead of each opening its own. A pool is counted: each
    :meth:`acquire` on a loop is matched by one :meth:`release` on that loop, and the last
    release closes the pool there. Pools of loops closed some other way are dropped.

    Example:
        >>> class Pool:
        ...     async def aclose(self):
        ...         print("closed")
        >>> shared = SharedConnections()
        >>> async def two_users():
        ...     first = shared.acquire("endpoint", Pool)
        ...     assert shared.acquire("endpoint", Pool) is first
        ...     await shared.release("endpoint")
        ...     await shared.release("endpoint")
        >>> asyncio.run(two_users())
        closed
    """

    def __init__(self) -> None:
        # (loop, key) -> [pool, users]
        self._pools: dict[tuple[asyncio.AbstractEventLoop, Any], list[Any]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: Any, factory: Callable[[], Any]) -> Any:
        """The running loop's pool for ``key`` (built by ``factory`` if there is none yet),
        counted as one more user."""
        loop = asyncio.get_running_loop()
        with self._lock:
            for stale in [pair for pair in self._pools if pair[0].is_closed()]:
                del self._pools[stale]
            entry = self._pools.get((loop, key))
            if entry is None:
                entry = self._pools[(loop, key)] = [factory(), 0]
            entry[1] += 1
            return entry[0]

    async def release(self, key: Any) -> None:
        """One user of the running loop's pool for ``key`` is done; the last one closes it."""
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._pools.get((loop, key))
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._pools[(loop, key)]
        await entry[0].aclose()

    def __len__(self) -> int:
        with self._lock:
            return sum(not loop.is_closed() for loop, _ in self._pools)


CONNECTIONS = SharedConnections()
"""The connection pools of every :class:`SdkChatModel` in the process."""

_ssl_lock = threading.Lock()
_ssl_contexts: list[Any] = []  # the process's one default TLS context, once built


def default_ssl_context() -> Any:
    """The TLS context the SDKs' HTTP clients would each build by default (system or certifi
    roots, ``SSL_CERT_FILE``), built once per process and shared by every connection pool.

    Building one reads every trusted root certificate, which takes a noticeable time; afnio's
    clients start it in the background when they are created (see :class:`SdkChatModel`).

    Example:
        >>> default_ssl_context() is default_ssl_context()
        True
    """
    with _ssl_lock:
        if not _ssl_contexts:
            import httpx2  # the HTTP library of both SDKs

            _ssl_contexts.append(httpx2.create_ssl_context())
        return _ssl_contexts[0]


def _prepare_ssl_context() -> None:
    """Build :func:`default_ssl_context` in a background thread, unless it is built."""
    if not _ssl_contexts:
        threading.Thread(target=default_ssl_context, name="afnio-tls-context", daemon=True).start()


async def _release_sdk_client(key: Any, client: Any) -> None:
    """An SDK client's copy is done: release its share of the connection pool (closing the SDK
    client itself would close the pool under the other clients)."""
    await CONNECTIONS.release(key)


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


MIN_SECRET_SLICE = 8
"""Shortest run of a key's characters that :func:`redact` removes from text (and the shortest
key length whose slices are redacted at all: shorter keys are redacted only as whole words)."""

_WORD_CHARS = r"A-Za-z0-9_\-"


def redact(text: str, secret: str | None) -> str:
    """``text`` with the API key ``secret``, and any echoed slice of it, replaced by ``***``.

    A key of :data:`MIN_SECRET_SLICE` characters or more: every run of at least that many
    characters of ``text`` that also occurs in the key is replaced (the whole key, its prefix,
    a provider's masked echo such as ``sk-proj-abc1…``), so no stretch long enough to matter
    survives. A shorter key (``"x"``, a local server's placeholder) can't be told apart from
    ordinary text by its characters, so it is replaced only where it stands as a whole word —
    never a letter inside another word.

    Example:
        >>> redact("bad key sk-abcdef123456", "sk-abcdef123456")
        'bad key ***'
        >>> redact("key sk-abcdef12… rejected", "sk-abcdef123456")
        'key ***… rejected'
        >>> redact("expected text, got x", "x")
        'expected text, got ***'
    """
    if not secret or not text:
        return text
    if len(secret) < MIN_SECRET_SLICE:
        word = rf"(?<![{_WORD_CHARS}]){re.escape(secret)}(?![{_WORD_CHARS}])"
        return re.sub(word, "***", text)
    size = MIN_SECRET_SLICE
    slices = {secret[i : i + size] for i in range(len(secret) - size + 1)}
    covered = [False] * len(text)
    for i in range(len(text) - size + 1):
        if text[i : i + size] in slices:
            covered[i : i + size] = [True] * size
    parts: list[str] = []
    i = 0
    while i < len(text):
        if covered[i]:
            while i < len(text) and covered[i]:
                i += 1
            parts.append("***")
        else:
            parts.append(text[i])
            i += 1
    return "".join(parts)


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


COMPATIBLE_SERVER_ARGUMENTS = frozenset({
    # Sampling arguments of vLLM's and llama.cpp's OpenAI-compatible servers (and Ollama's).
    "top_k", "min_p", "typical_p", "tfs_z", "repetition_penalty", "repeat_penalty",
    "repeat_last_n", "penalty_last_n", "penalize_nl", "length_penalty", "min_tokens",
    "ignore_eos", "mirostat", "mirostat_mode", "mirostat_tau", "mirostat_eta", "dry_multiplier",
    "dry_base", "dry_allowed_length", "dry_penalty_last_n", "xtc_probability", "xtc_threshold",
    "top_n_sigma", "samplers", "n_probs", "cache_prompt", "id_slot", "use_beam_search",
    "best_of", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "stop_token_ids", "truncate_prompt_tokens", "prompt_logprobs",
    "priority", "add_generation_prompt", "continue_final_message", "chat_template",
    "chat_template_kwargs",
    # Their structured-output arguments.
    "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "guided_decoding_backend", "guided_whitespace_pattern", "structured_outputs", "grammar",
    "json_schema",
})
"""Arguments an ``openai-compatible`` client sends in the request body although the OpenAI API
doesn't define them: the documented extras of vLLM, llama.cpp's server and Ollama. Any other
name is refused as a likely typo; send it anyway inside ``extra_body={...}``."""


def sort_arguments(
    args: dict[str, Any],
    accepted: frozenset[str],
    who: str,
    *,
    body_extras: frozenset[str] = frozenset(),
    extras_name: str = "",
) -> None:
    """Check completion arguments against what a client can send (in place).

    Names in ``accepted`` stay as they are; names in ``body_extras`` move into ``extra_body``
    (the SDK then puts them in the JSON body as given); anything else is refused, with the
    closest known name suggested. What the caller put in ``extra_body`` itself is sent as is:
    that is the way to send an argument afnio doesn't know.

    Args:
        args: Completion arguments (changed in place).
        accepted: Arguments the SDK's ``create`` lists (or the client handles itself).
        who: The client and method, for error messages.
        body_extras: Arguments known to the backend though not to the SDK.
        extras_name: What ``body_extras`` are, for the error message.

    Raises:
        TypeError: If ``extra_body`` is not a dict.
        ValueError: If an argument is unknown.

    Example:
        >>> args = {"temperature": 0.5, "top_k": 3}
        >>> sort_arguments(args, frozenset({"temperature", "extra_body"}), "demo",
        ...                body_extras=frozenset({"top_k"}))
        >>> args
        {'temperature': 0.5, 'extra_body': {'top_k': 3}}
        >>> sort_arguments({"tempreture": 0.5}, frozenset({"temperature"}), "demo")
        Traceback (most recent call last):
        ...
        ValueError: demo: unknown completion argument 'tempreture' (did you mean ...
    """
    extra_body = args.pop("extra_body", None)
    if extra_body is not None and not isinstance(extra_body, Mapping):
        raise TypeError(f"{who}: extra_body must be a dict, got {type(extra_body).__name__}")
    extra_body = dict(extra_body or {})
    known = accepted | body_extras
    for name in args:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else (
                f" (not an argument of the API{' or of ' + extras_name if extras_name else ''})"
            )
            raise ValueError(
                f"{who}: unknown completion argument {name!r}{hint}; to send an argument afnio "
                f"doesn't know, put it in extra_body={{{name!r}: ...}}"
            )
    for name in [name for name in args if name not in accepted]:
        extra_body[name] = args.pop(name)
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
        # Clients of one endpoint share its connections (per loop; see SharedConnections).
        self._connections_key = (self._sdk.__name__, self.endpoint, self.timeout)
        self._clients: PerLoop[Any] = PerLoop(
            self._new_sdk_client,
            close=functools.partial(_release_sdk_client, self._connections_key),
        )
        _prepare_ssl_context()

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
        pool = CONNECTIONS.acquire(
            self._connections_key,
            lambda: self._sdk.DefaultAsyncHttpxClient(
                timeout=self.timeout, verify=default_ssl_context()
            ),
        )
        return self._template.copy(http_client=pool)

    async def aclose(self) -> None:
        """Release this client's share of the running event loop's connections to its endpoint
        (closed once no other afnio client of that endpoint uses them).

        Optional: call it before a loop you created (e.g. with ``asyncio.run``) ends, to release
        its connections at once instead of when the loop shuts down or they are
        garbage-collected.
        """
        if self._clients.pop() is not None:
            await CONNECTIONS.release(self._connections_key)

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments without the API key (it comes from the environment again)."""
        config = super().get_config()
        config.update(base_url=self.base_url, timeout=self.timeout)
        return config

    @property
    def endpoint(self) -> str:
        """The base URL requests go to (the SDK's default when no ``base_url`` was given)."""
        return str(self._template.base_url).rstrip("/")

    def _where(self) -> str:
        return f"{self.provider} {self.model} at {self.endpoint}"

    async def _call_sdk(
        self, request: Callable[[Any], Awaitable[Any]], *, structured: str | None = None
    ) -> dict[str, Any]:
        """The JSON body of ``request(sdk_client)`` (a ``with_raw_response`` call), with the
        running loop's SDK client; SDK errors and unreadable replies become afnio's errors.

        ``structured`` names the structured-output form the request carries (if any), so that
        a server rejecting it raises StructuredOutputUnsupportedError."""
        sdk = self._sdk
        client = self._clients.get()
        try:
            raw = await request(client)
        except sdk.APIStatusError as exc:
            raise self._status_error(exc, structured) from None
        except sdk.APITimeoutError:
            raise TransientError(
                f"{self._where()}: request timed out after {self.timeout}s"
            ) from None
        except sdk.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            detail = str(cause) or type(cause).__name__
            raise TransientError(
                f"{self._where()}: connection failed ({type(cause).__name__}: "
                f"{self._safe(detail)})"
            ) from None
        http = raw.http_response
        return self._reply_json(http.status_code, str(http.url),
                                http.headers.get("content-type", ""), http.content)

    def _reply_json(self, status: int, url: str, content_type: str, body: bytes) -> dict[str, Any]:
        """Decode a successful reply's body, or raise :class:`MalformedReplyError` saying why."""
        where = f"{self.provider} {self.model}: {url} answered HTTP {status}"
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise MalformedReplyError(
                f"{where} with a body that is not UTF-8 ({error.reason} at byte {error.start})",
                status=status, endpoint=url,
            ) from None

        def snippet() -> str:  # only for an error: a well-formed reply costs no redaction
            return self._safe(" ".join(text[:2000].split())[:120])

        if "html" in content_type.lower() or text.lstrip()[:1] == "<":
            raise MalformedReplyError(
                f"{where} with an HTML page instead of JSON (a proxy or a wrong base_url?): "
                f"{snippet()!r}", status=status, endpoint=url,
            )
        try:
            data = json.loads(text)
        except ValueError as error:
            raise MalformedReplyError(
                f"{where} with a body that is not valid JSON ({error}): {snippet()!r}",
                status=status, endpoint=url,
            ) from None
        if not isinstance(data, dict):
            raise MalformedReplyError(
                f"{where} with JSON that is not an object: {snippet()!r}", status=status,
                endpoint=url,
            )
        return data

    def _malformed(self, data: Any, problem: str) -> MalformedReplyError:
        """A MalformedReplyError for a JSON reply lacking what the API promises."""
        snippet = self._safe(json.dumps(data)[:160])
        return MalformedReplyError(
            f"{self._where()}: the HTTP 200 reply {problem}: {snippet}", status=200,
            endpoint=self.endpoint,
        )

    def _status_error(self, exc: Any, structured: str | None = None) -> ModelError:
        status = exc.status_code
        response = getattr(exc, "response", None)
        url = str(response.url) if response is not None else self.endpoint
        name = f"{self.provider} {self.model}: {url} answered HTTP {status}"
        if status in (401, 403):
            return ModelError(
                f"{name}: authentication failed; check the API key (api_key= or "
                f"{self._api_key_env}){self._auth_hint()}"
            )
        message = self._safe(self._api_message(exc))
        if structured and status not in RETRYABLE_STATUS and _STRUCTURED_TEXT.search(message):
            return StructuredOutputUnsupportedError(
                f"{name}: the server rejected the structured-output format ({structured}): "
                f"{message}. Structured outputs are now off for this client "
                f"(structured_output_args returns None): ask again without them",
                status=status, field=_rejected_field(exc.body, message), endpoint=url,
            )
        if status in (400, 422) or (status >= 500 and _is_validation_error(exc.body, message)):
            field = _rejected_field(exc.body, message)
            rejected = f" (rejected field: {field})" if field else ""
            return InvalidRequestError(
                f"{name}: the server rejected the request as invalid{rejected}: {message}",
                status=status, field=field, endpoint=url,
            )
        if status in RETRYABLE_STATUS or status >= 500:
            return TransientError(
                f"{name}: {message}", status=status,
                retry_after=retry_after_seconds(response.headers if response is not None
                                                else None),
            )
        return ModelError(f"{name}: {message}")

    def _safe(self, text: str) -> str:
        return redact(text, self._template.api_key)


_VALIDATION_TEXT = re.compile(
    r"validation error|invalid (?:request|value|type|argument|parameter)|unrecognized "
    r"(?:request )?argument|extra (?:inputs|fields) (?:are )?not permitted|field required|"
    r"not supported|unsupported",
    re.IGNORECASE,
)
_STRUCTURED_TEXT = re.compile(
    r"response_format|json_schema|guided_json|guided_decoding|structured.outputs?|output_config|"
    r"output_format|grammar",
    re.IGNORECASE,
)
_FIELD_NAMES = re.compile(
    r"\b(response_format|json_schema|max_tokens|max_completion_tokens|temperature|top_p|top_k|"
    r"stop|seed|messages|model|tools|tool_choice|grammar)\b"
)


def _error_object(body: Any) -> dict[str, Any]:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return error
    return {}


def _is_validation_error(body: Any, message: str) -> bool:
    """Whether a 5xx reply describes an invalid request (some servers answer those with 500)."""
    if isinstance(body, dict) and isinstance(body.get("detail"), list):
        return True  # FastAPI / pydantic validation errors
    kind = str(_error_object(body).get("type") or "").lower()
    if "invalid_request" in kind or "validation" in kind or "badrequest" in kind:
        return True
    return bool(_VALIDATION_TEXT.search(message))


def _rejected_field(body: Any, message: str) -> str | None:
    """The request field a server's error names, when it names one."""
    if isinstance(body, dict) and isinstance(body.get("detail"), list):
        for item in body["detail"]:
            location = item.get("loc") if isinstance(item, dict) else None
            if isinstance(location, list):
                parts = [str(p) for p in location if p != "body"]
                if parts:
                    return ".".join(parts)
    param = _error_object(body).get("param")
    if isinstance(param, str) and param:
        return param
    match = _FIELD_NAMES.search(message)
    return match.group(1) if match else None

"""The one protocol every model client speaks: :class:`ChatCompletionModel`.

Ops never talk to an SDK directly; they call ``await client.achat(messages, **completion_args)``
and get text back. ``messages`` is a list of ``{"role": "system" | "user" | "assistant",
"content": str}`` dicts.

:meth:`ChatCompletionModel.achat` is the request pipeline shared by every client: argument
and context-window checks → response cache lookup → budget reservation of the request's
estimate → concurrency and rate limits → ``_send`` with retries → usage recording (per client
and run-wide) → cache store. A client only implements ``_send``, which makes one attempt and
returns a :class:`Completion`.

Every client knows its context window (:attr:`ChatCompletionModel.context_window`), counts tokens
the way its model does (:meth:`ChatCompletionModel.count_message_tokens`) and knows how much of
the window a request reserves for the reply (:meth:`ChatCompletionModel.output_reserve`); the
pipeline refuses a request that doesn't fit with
:class:`~afnio.models.errors.ContextWindowError` before anything is sent.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from afnio._runtime import run
from afnio.models import tokens
from afnio.models.cache import CachedResponse, ResponseCache
from afnio.models.context_windows import context_window_for, unknown_context_window
from afnio.models.errors import (
    ContextWindowError,
    StructuredOutputUnsupportedError,
    TransientError,
)
from afnio.models.limits import Estimate, Limits
from afnio.models.options import PipelineOptions
from afnio.models.pricing import FREE_PROVIDERS, cost_usd, price_for
from afnio.models.usage import Usage, record_usage

__all__ = [
    "DEFAULT_OUTPUT_RESERVE",
    "ChatCompletionModel",
    "Completion",
    "client_from_config",
    "client_to_config",
    "openai_json_schema",
    "register_client_class",
]

DEFAULT_OUTPUT_RESERVE = 1024
"""Tokens reserved for the reply of a request that gives no ``max_tokens`` to a client without
a default cap of its own (OpenAI and OpenAI-compatible clients)."""

_OUTPUT_CAPS = ("max_tokens", "max_completion_tokens")

logger = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant")


@dataclass
class Completion:
    """One reply from a provider and the tokens it used.

    Attributes:
        text: The reply text.
        prompt_tokens: All input tokens of the request, *including* ``cached_tokens`` and
            ``cache_write_tokens`` (OpenAI reports it this way; an Anthropic client adds
            ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``).
        completion_tokens: Output tokens (reasoning tokens included).
        cached_tokens: Input tokens read from the provider's prompt cache.
        cache_write_tokens: Input tokens written to the provider's prompt cache.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0


def _checked_messages(messages: Any, client: str) -> list[dict[str, Any]]:
    """A copy of ``messages`` after checking its shape, or a TypeError/ValueError saying why."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(
            f"{client}.achat: messages must be a non-empty list of "
            f"{{'role': ..., 'content': ...}} dicts, got {messages!r:.80}"
        )
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(
                f"{client}.achat: messages[{index}] must be a dict, got {type(message).__name__}"
            )
        if message.get("role") not in _ROLES:
            raise ValueError(
                f"{client}.achat: messages[{index}]['role'] must be one of {', '.join(_ROLES)}, "
                f"got {message.get('role')!r}"
            )
        if not isinstance(message.get("content"), str):
            raise TypeError(
                f"{client}.achat: messages[{index}]['content'] must be a str, "
                f"got {type(message.get('content')).__name__}"
            )
        checked.append(dict(message))
    return checked


class ChatCompletionModel(abc.ABC):
    """Base class of chat-completion clients: the request pipeline around one ``_send``.

    Subclasses implement ``async _send(messages, **completion_args) -> Completion`` (one
    attempt; raise :class:`~afnio.models.errors.TransientError` for 429/5xx/timeouts) and pass
    the keyword options below through to ``super().__init__``. :meth:`achat` adds the cache,
    budget, limits, retries and usage accounting; :meth:`chat` is its synchronous twin.

    Args:
        model: The model name sent to the provider.
        **options: The pipeline options, declared once in
            :class:`~afnio.models.options.PipelineOptions` with their defaults:
            ``max_concurrency`` (requests in flight at once, process-wide), ``requests_per_minute``
            and ``tokens_per_minute`` (pacing), ``max_retries`` (8), ``retry_base_delay``
            (0.5 s) and ``retry_max_delay`` (30 s), ``budget_usd`` and ``budget_tokens``
            (refuse a request before sending when its estimate would pass them),
            ``context_window`` (see :attr:`context_window`) and ``cache`` (a
            :class:`~afnio.models.cache.ResponseCache`).

    Attributes:
        provider: The provider name, e.g. ``"openai"``, ``"anthropic"``, ``"local"``.
        model: The model name sent to the provider.
        options: The :class:`~afnio.models.options.PipelineOptions`.
        limits: The :class:`~afnio.models.limits.Limits` gating this client's requests.
        cache: The response cache or ``None``.

    Raises:
        TypeError: If an option is unknown (the closest name is suggested) or mistyped.
        ValueError: If an option is out of range, or ``budget_usd`` is set for a model with no
            known price (its spending could not be estimated).

    Example:
        >>> from afnio.testing import ScriptedModel
        >>> client = ScriptedModel(["4"], budget_tokens=1000)
        >>> client.chat([{"role": "user", "content": "2 + 2 = ?"}])
        '4'
        >>> client.get_usage()["requests"]
        1
    """

    provider: str = ""
    model: str = ""

    def __init__(self, model: str = "", **options: Any) -> None:
        name = type(self).__name__
        if not isinstance(model, str):
            raise TypeError(f"{name}: model must be a str, got {type(model).__name__}")
        self.model = model or type(self).model
        self.options = PipelineOptions.from_kwargs(name, options)
        if (
            self.options.budget_usd is not None
            and self.provider not in FREE_PROVIDERS
            and price_for(self.model) is None
        ):
            raise ValueError(
                f"{name}({self.model!r}): budget_usd needs the model's price to estimate each "
                f"request before sending, but afnio knows no price for {self.provider} model "
                f"{self.model!r}; add one with afnio.models.set_price({self.model!r}, input=..., "
                f"output=...) or cap tokens with budget_tokens="
            )
        self.limits = Limits(self.options)
        self.cache = self.options.cache
        self._context_window = self.options.context_window
        self._structured_output_on = True
        self._usage = Usage()
        self._usage_lock = threading.Lock()
        tokens.preload(self.model)  # in the background, so that no request waits for it

    @property
    def context_window(self) -> int:
        """The most tokens one request may hold, prompt plus reply.

        The ``context_window=`` the client was given; else the client's own (a local model's
        ``n_ctx``); else the window of the model name in ``context_windows.json`` (dated
        snapshots match their family); else 8192, with a warning the first time naming the
        model and how to set it.

        Example:
            >>> from afnio.testing import ScriptedModel
            >>> ScriptedModel(context_window=2048).context_window
            2048
        """
        if self._context_window is not None:
            return self._context_window
        own = self._own_context_window()
        if own is not None:
            return own
        listed = context_window_for(self.model)
        if listed is not None:
            return listed
        return unknown_context_window(repr(self), self.provider, self.model)

    def _own_context_window(self) -> int | None:
        """The window this kind of client knows by itself (``None``: look the model up)."""
        return None

    def _counts_exactly(self) -> bool:
        """Whether :func:`afnio.models.tokens.count_tokens` uses this model's own tokenizer."""
        return self.provider == "openai" and tokens.is_exact(self.model)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for this client's model, never fewer than the model would count.

        With the model's own tokenizer where afnio has it (tiktoken for OpenAI models, llama.cpp
        for a local model); otherwise the ``cl100k_base`` count times
        :data:`~afnio.models.tokens.ESTIMATE_MARGIN`, rounded up. Counts are memoized.

        Raises:
            TypeError: If ``text`` is not a str.

        Example:
            >>> from afnio.testing import ScriptedModel
            >>> ScriptedModel().count_tokens("hello world")
            2
        """
        count = tokens.count_tokens(text, self.model)
        return count if self._counts_exactly() else tokens.with_margin(count)

    def count_message_tokens(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """Prompt tokens of a chat request to this client's model, chat format included.

        Counted as :meth:`count_tokens` counts: exact with the model's own tokenizer (and chat
        template, for a local model), otherwise an estimate with a safety margin.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.

        Raises:
            TypeError: If a message is not a dict or its content isn't text.

        Example:
            >>> from afnio.testing import ScriptedModel
            >>> ScriptedModel().count_message_tokens([{"role": "user", "content": "hello world"}])
            9
        """
        count = tokens.count_message_tokens(messages, self.model)
        return count if self._counts_exactly() else tokens.with_margin(count)

    def prompt_fits(self, messages: Sequence[Mapping[str, Any]], limit: int) -> bool:
        """Whether the prompt of ``messages`` holds at most ``limit`` tokens.

        Decided without the tokenizer when even one token per UTF-8 byte (with the estimate
        margin) would fit — most prompts are far below a context window — and by
        :meth:`count_message_tokens` otherwise.

        Example:
            >>> from afnio.testing import ScriptedModel
            >>> ScriptedModel().prompt_fits([{"role": "user", "content": "hello world"}], 10)
            True
        """
        if type(self).count_message_tokens is ChatCompletionModel.count_message_tokens and (
            tokens.with_margin(tokens.message_bytes_bound(messages)) <= limit
        ):
            return True
        return self.count_message_tokens(messages) <= limit

    def structured_output_args(self, schema: Mapping[str, Any], name: str) -> dict[str, Any] | None:
        """Completion arguments that constrain a reply to ``schema`` on this backend, or ``None``.

        ``None`` means this client can't constrain replies (or can't for this schema, or its
        server rejected the format once, see below): the caller then asks for tagged text.
        Which arguments, per backend:

        ======================================  =============================================
        Client                                  Arguments
        ======================================  =============================================
        ``AsyncOpenAI`` (OpenAI)                ``response_format`` ``json_schema`` (strict
                                                when the schema allows it)
        ``AsyncOpenAI`` with ``base_url``       by its ``structured_output=`` option:
                                                ``"json_schema"`` (default, as OpenAI),
                                                ``"llama.cpp"`` (``{"type": "json_object",
                                                "schema": ...}``), ``"vllm"``
                                                (``guided_json``), ``None`` (no arguments)
        ``AsyncAnthropic``                      ``response_format``, sent as the Messages
                                                API's structured output
                                                (``output_config.format``)
        ``LocalModel``                          ``response_format``, applied as a llama.cpp
                                                grammar (``None`` if llama.cpp can't turn the
                                                schema into one)
        ``ScriptedModel``                       OpenAI's form if built with
                                                ``structured_output=True``, else ``None``
        ======================================  =============================================

        When a server answers a request carrying these arguments with an error saying the
        format is unsupported (e.g. llama.cpp's server answering 500 to OpenAI's
        ``json_schema``), the request raises
        :class:`~afnio.models.errors.StructuredOutputUnsupportedError` at once (no retries) and
        this client stops offering structured outputs: later calls return ``None``.

        Args:
            schema: A JSON schema (a dict).
            name: A name for it (OpenAI's ``json_schema.name``: letters, digits, ``_``, ``-``).

        Raises:
            TypeError: If ``schema`` is not a dict or ``name`` not a non-empty str.

        Example:
            >>> from afnio.testing import ScriptedModel
            >>> schema = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}}
            >>> ScriptedModel().structured_output_args(schema, "label") is None
            True
            >>> structured = ScriptedModel(structured_output=True)
            >>> sorted(structured.structured_output_args(schema, "label"))
            ['response_format']
        """
        if not isinstance(schema, Mapping):
            raise TypeError(f"{type(self).__name__}.structured_output_args: schema must be a "
                            f"dict, got {type(schema).__name__}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"{type(self).__name__}.structured_output_args: name must be a "
                            f"non-empty str, got {name!r}")
        if not self._structured_output_on:
            return None
        return self._structured_output_args(dict(schema), name)

    def _structured_output_args(self, schema: dict[str, Any], name: str) -> dict[str, Any] | None:
        """The backend's arguments for :meth:`structured_output_args` (``None``: it has none)."""
        return None

    def _default_output_cap(self) -> int:
        """Tokens reserved for a reply when the request gives no ``max_tokens``."""
        return DEFAULT_OUTPUT_RESERVE

    def output_reserve(self, completion_args: Mapping[str, Any]) -> int:
        """Tokens of the context window a request with these arguments reserves for the reply.

        The request's ``max_tokens`` or ``max_completion_tokens``; else the client's default
        cap (a local model's or an Anthropic client's ``max_tokens``; for OpenAI and
        OpenAI-compatible clients :data:`DEFAULT_OUTPUT_RESERVE`, 1024, which is not sent: the
        server may still reply longer when the window has room).

        Args:
            completion_args: The request's completion arguments.

        Raises:
            TypeError: If ``max_tokens`` / ``max_completion_tokens`` is not an int.
            ValueError: If it is < 1, or both are given.

        Example:
            >>> from afnio.testing import ScriptedModel
            >>> ScriptedModel().output_reserve({"max_tokens": 200})
            200
        """
        given = [name for name in _OUTPUT_CAPS if completion_args.get(name) is not None]
        who = f"{type(self).__name__}.achat"
        if len(given) > 1:
            raise ValueError(f"{who}: give max_tokens or max_completion_tokens, not both")
        if not given:
            return self._default_output_cap()
        name = given[0]
        cap = completion_args[name]
        if not isinstance(cap, int) or isinstance(cap, bool):
            raise TypeError(
                f"{who}: completion argument {name} must be a positive int, got {cap!r}"
            )
        if cap < 1:
            raise ValueError(f"{who}: completion argument {name} must be >= 1, got {cap!r}")
        return cap

    def _check_fits(self, messages: list[dict[str, Any]], reserve: int) -> int | None:
        """The request's prompt tokens, or ContextWindowError if it can't fit the window.

        ``None`` when nothing needs the count (no budget, no token rate) and the prompt surely
        fits: a request then never waits for a tokenizer."""
        window = self.context_window
        limits = self.limits
        if not (limits.budget.capped or limits.token_rate is not None) and self.prompt_fits(
            messages, window - reserve
        ):
            return None
        prompt = self.count_message_tokens(messages)
        if prompt + reserve > window:
            raise ContextWindowError(
                f"{self!r}: the request needs {prompt + reserve} tokens ({prompt} of prompt + "
                f"{reserve} reserved for the reply) but the model's context window holds "
                f"{window}; nothing was sent. Shorten the messages, lower max_tokens, or use a "
                f"larger window (context_window= if the model has one, n_ctx for a local model)",
                needed=prompt + reserve,
                available=window,
            )
        return prompt

    @abc.abstractmethod
    async def _send(self, messages: list[dict[str, Any]], **completion_args: Any) -> Completion:
        """Make one request to the provider (no retries, no limits: :meth:`achat` adds them).

        Raises:
            TransientError: For failures worth retrying (429, 5xx, timeouts, dropped
                connections), with the provider's ``Retry-After`` when it sent one.
        """

    async def achat(self, messages: list[dict[str, Any]], **completion_args: Any) -> str:
        """Send one chat request through the cache, budget, limits and retries.

        Args:
            messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
            **completion_args: Provider arguments, e.g. ``temperature``, ``max_tokens``.

        Returns:
            The reply text.

        Raises:
            TypeError, ValueError: If ``messages``, ``max_tokens`` or another completion
                argument is malformed or unknown (nothing is sent).
            ContextWindowError: If the prompt's tokens plus the output reserve
                (:meth:`output_reserve`) exceed :attr:`context_window` (nothing is sent).
            BudgetExceededError: If the request's estimate would pass this client's budget
                (nothing is sent).
            CacheMissError: If the cache is in ``replay`` mode and has no reply.
            InvalidRequestError: If the server says the request is invalid (not retried).
            StructuredOutputUnsupportedError: If the server rejected the structured-output
                arguments (not retried; :meth:`structured_output_args` returns ``None`` after).
            TransientError: If the request still failed after ``max_retries`` retries
                (including :class:`~afnio.models.errors.MalformedReplyError`).

        Example:
            >>> from afnio.testing import ScriptedModel
            >>> from afnio._runtime import run
            >>> run(ScriptedModel(["hi"]).achat([{"role": "user", "content": "hello"}]))
            'hi'
        """
        name = type(self).__name__
        messages = _checked_messages(messages, name)
        self._check_completion_args(completion_args)
        reserve = self.output_reserve(completion_args)
        prompt_tokens = self._check_fits(messages, reserve)
        cache = self.cache if self.cache is not None and self.cache.reads else None
        key = ""
        if cache is not None:
            key = cache.key(self.provider, self.model, messages, completion_args,
                            endpoint=self.endpoint)
            hit = await cache.aget(key)
            if hit is not None:
                self._record(Usage(cached_tokens=hit.prompt_tokens + hit.completion_tokens))
                return hit.text

        token_rate = self.limits.token_rate
        counted = prompt_tokens or 0  # None (not counted) only without a budget or token rate
        estimated = counted if token_rate is not None else 0
        estimate = Estimate(counted, reserve, self._estimated_cost(counted, reserve))

        async def send() -> Completion:
            try:
                return await self._send(messages, **completion_args)
            except asyncio.CancelledError:
                # Cancelled in flight: the provider may have received (and billed) the prompt.
                sent = self.count_message_tokens(messages) if prompt_tokens is None else counted
                self._record(Usage(requests=1, prompt_tokens=sent,
                                   cost_usd=self._estimated_cost(sent, 0)))
                raise

        with self.limits.reserved(estimate, spent=self._spent, client=self):
            try:
                completion = await self.limits.call(
                    send,
                    estimated_tokens=estimated,
                    spent=self._spent,
                    client=self,
                    on_retry=self._log_retry,
                )
            except StructuredOutputUnsupportedError:
                self._structured_output_on = False  # the caller asks again with tags
                raise
            if not isinstance(completion, Completion) or not isinstance(completion.text, str):
                raise TypeError(
                    f"{name}._send must return a Completion with str text, got {completion!r:.80}"
                )
            if token_rate is not None:
                token_rate.adjust(
                    completion.prompt_tokens + completion.completion_tokens - estimated
                )
            self._record(
                Usage(
                    requests=1,
                    prompt_tokens=completion.prompt_tokens,
                    completion_tokens=completion.completion_tokens,
                    cached_tokens=completion.cached_tokens,
                    cost_usd=cost_usd(
                        self.provider,
                        self.model,
                        prompt_tokens=completion.prompt_tokens,
                        completion_tokens=completion.completion_tokens,
                        cached_tokens=completion.cached_tokens,
                        cache_write_tokens=completion.cache_write_tokens,
                    ),
                )
            )
        if cache is not None:
            stored = CachedResponse(
                completion.text, completion.prompt_tokens, completion.completion_tokens
            )
            await cache.aput(key, stored, provider=self.provider, model=self.model)
        return completion.text

    def _estimated_cost(self, prompt_tokens: int, reply_tokens: int) -> float:
        """USD of a request before it is sent (0 without a USD budget or for a free model)."""
        if self.limits.budget.usd is None or self.provider in FREE_PROVIDERS:
            return 0.0
        return cost_usd(self.provider, self.model, prompt_tokens=prompt_tokens,
                        completion_tokens=reply_tokens)

    def _check_completion_args(self, completion_args: dict[str, Any]) -> None:
        """Refuse completion arguments this client can't send (before anything else happens).

        Raises:
            TypeError, ValueError: If an argument is unknown, misspelled or malformed.
        """
        return None  # the base class sends whatever _send accepts

    @property
    def endpoint(self) -> str | None:
        """Where requests go (a base URL), part of the response-cache key; ``None`` in process."""
        return None

    def chat(self, messages: list[dict[str, Any]], **completion_args: Any) -> str:
        """Synchronous twin of :meth:`achat` (safe from Jupyter and from threads)."""
        return run(self.achat(messages, **completion_args))

    def _log_retry(self, attempt: int, error: TransientError, delay: float) -> None:
        status = f"status {error.status}, " if error.status is not None else ""
        logger.warning(
            "%r: request failed (%s%s: %s); retry %d of %d in %.2fs",
            self, status, type(error).__name__, str(error) or repr(error), attempt,
            self.limits.max_retries, delay,
        )

    def _spent(self) -> Usage:
        with self._usage_lock:
            return Usage(**self._usage.as_dict())

    def _record(self, usage: Usage) -> None:
        with self._usage_lock:
            self._usage += usage
        record_usage(usage)

    def get_usage(self) -> dict[str, int | float]:
        """What this client used since it was made or :meth:`clear_usage` was called.

        Returns:
            ``{"requests", "prompt_tokens", "completion_tokens", "cached_tokens",
            "cost_usd"}`` (see :mod:`afnio.models.usage` for what each counts).
        """
        return self._spent().as_dict()

    def clear_usage(self) -> None:
        """Set this client's usage back to zero (its budget counts afresh from here)."""
        with self._usage_lock:
            self._usage = Usage()

    def get_config(self) -> dict[str, Any]:
        """The JSON-safe constructor arguments of this client — never an API key.

        Includes the pipeline options that differ from their defaults and the cache (as its
        path and mode), so :meth:`from_config` rebuilds a client that behaves the same.
        """
        return {"model": self.model, **self.options.non_defaults()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ChatCompletionModel:
        """Rebuild a client from :meth:`get_config` output (keys come from the environment).

        Everything in ``config`` is used, endpoints and cache paths included: give it only
        configs you trust (loading from files does so only when asked, see
        :func:`client_from_config`).
        """
        config = dict(config)
        if isinstance(config.get("cache"), dict):
            config["cache"] = ResponseCache(**config["cache"])
        return cls(**config)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"

    def __deepcopy__(self, memo: dict[int, Any]) -> ChatCompletionModel:
        # A client is a shared resource (connections, limits, usage), like a device in torch:
        # deep-copying a program that holds one shares it instead of duplicating it.
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle through the secret-free config: keys come back from the environment. (Pickle
        # names the class itself; a pickle runs code anyway, so no registry check applies.)
        return _rebuild, (type(self), self.get_config())


def openai_json_schema(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """OpenAI's ``response_format`` for ``schema``: strict when the schema allows strict mode.

    Strict mode needs every object to list all its properties as required and to forbid others
    (``"additionalProperties": false``); a schema that doesn't is sent non-strict.

    Example:
        >>> openai_json_schema({"type": "string"}, "answer")["json_schema"]["strict"]
        True
    """
    spec: dict[str, Any] = {"name": name, "schema": schema}
    spec["strict"] = _strict_compatible(schema)
    return {"type": "json_schema", "json_schema": spec}


def _strict_compatible(schema: Any) -> bool:
    if isinstance(schema, list):
        return all(_strict_compatible(item) for item in schema)
    if not isinstance(schema, dict):
        return True
    if schema.get("type") == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is not False:
            return False
        if sorted(schema.get("required", [])) != sorted(properties):
            return False
    return all(_strict_compatible(value) for key, value in schema.items()
               if key not in ("enum", "const", "default", "examples", "required"))


def _rebuild(cls: type[ChatCompletionModel], config: dict[str, Any]) -> ChatCompletionModel:
    """Unpickle a client (see ``ChatCompletionModel.__reduce__``)."""
    return cls.from_config(config)


_KNOWN_CLIENTS = {
    "afnio.models.openai.AsyncOpenAI": "afnio.models.openai",
    "afnio.models.openai.OpenAI": "afnio.models.openai",
    "afnio.models.anthropic.AsyncAnthropic": "afnio.models.anthropic",
    "afnio.models.anthropic.Anthropic": "afnio.models.anthropic",
    "afnio.models.local.LocalModel": "afnio.models.local",
    "afnio.models.pool.EndpointPool": "afnio.models.pool",
    "afnio.testing.scripted.ScriptedModel": "afnio.testing.scripted",
}
_registered_clients: dict[str, type[ChatCompletionModel]] = {}
_registry_lock = threading.Lock()


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_client_class(cls: type[ChatCompletionModel]) -> type[ChatCompletionModel]:
    """Let :func:`client_from_config` rebuild clients of ``cls``, your own client class.

    afnio's own clients are always known; any other class must be registered by your code
    before a description naming it can be rebuilt (a file can never make afnio import a module).
    Usable as a class decorator.

    Args:
        cls: A :class:`ChatCompletionModel` subclass.

    Returns:
        ``cls``.

    Raises:
        TypeError: If ``cls`` is not a ChatCompletionModel subclass.

    Example:
        >>> from afnio.testing import ScriptedModel
        >>> @register_client_class
        ... class Shouting(ScriptedModel):
        ...     pass
        >>> type(client_from_config(client_to_config(Shouting()))).__name__
        'Shouting'
    """
    if not (isinstance(cls, type) and issubclass(cls, ChatCompletionModel)):
        raise TypeError(f"register_client_class: {cls!r} is not a ChatCompletionModel subclass")
    with _registry_lock:
        _registered_clients[_class_path(cls)] = cls
    return cls


def client_to_config(client: ChatCompletionModel) -> dict[str, Any]:
    """Describe ``client`` as ``{"class": "module.Class", "config": {...}}``, without secrets.

    Example:
        >>> from afnio.testing import ScriptedModel
        >>> client_to_config(ScriptedModel(model="m"))
        {'class': 'afnio.testing.scripted.ScriptedModel', 'config': {'model': 'm', 'latency': 0.0}}
    """
    return {"class": _class_path(type(client)), "config": client.get_config()}


def client_from_config(description: Mapping[str, Any]) -> ChatCompletionModel:
    """Rebuild a client from :func:`client_to_config` output.

    The class must be one of afnio's own clients (``AsyncOpenAI``, ``OpenAI``, ``AsyncAnthropic``,
    ``Anthropic``, ``LocalModel``, ``EndpointPool``, ``ScriptedModel``) or registered with
    :func:`register_client_class`: nothing else is imported or constructed, whatever the description
    names. The config is used whole — endpoint (``base_url``), cache path, model file — so rebuild
    only descriptions you trust; ``afnio.load``, ``load_state_dict`` and the Trainer's resume call
    this only when asked to (``load_clients=True``).

    Raises:
        ValueError: If the description is malformed or names a class afnio doesn't know.

    Example:
        >>> from afnio.testing import ScriptedModel
        >>> client_from_config(client_to_config(ScriptedModel(model="m"))).model
        'm'
    """
    if not isinstance(description, Mapping):
        raise ValueError(f"a model client description must be a dict, got "
                         f"{type(description).__name__}")
    path, config = description.get("class"), description.get("config", {})
    if not isinstance(path, str) or not isinstance(config, Mapping):
        raise ValueError(
            "a model client description needs {'class': str, 'config': dict}, got "
            f"{dict(description)!r:.120}"
        )
    with _registry_lock:
        cls = _registered_clients.get(path)
    if cls is None and path in _KNOWN_CLIENTS:
        cls = getattr(importlib.import_module(_KNOWN_CLIENTS[path]), path.rpartition(".")[2])
    if cls is None:
        raise ValueError(
            f"model client class {path!r} is not one afnio knows; a description may name only "
            f"afnio's clients ({', '.join(name.rpartition('.')[2] for name in _KNOWN_CLIENTS)}) "
            "or a class your code registered with afnio.models.register_client_class (afnio "
            "never imports a module a file names)"
        )
    try:
        return cls.from_config(dict(config))
    except TypeError as error:
        raise ValueError(f"cannot rebuild a {path} from its config: {error}") from None

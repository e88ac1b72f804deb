"""The one protocol every model client speaks: :class:`ChatCompletionModel`.

Ops never talk to an SDK directly; they call ``await client.achat(messages, **completion_args)``
and get text back. ``messages`` is a list of ``{"role": "system" | "user" | "assistant",
"content": str}`` dicts.

:meth:`ChatCompletionModel.achat` is the request pipeline shared by every client: response
cache lookup → budget check → concurrency and rate limits → ``_send`` with retries → usage
recording (per client and run-wide) → cache store. A client only implements ``_send``, which
makes one attempt and returns a :class:`Completion`.

Every client knows its context window (:attr:`ChatCompletionModel.context_window`), counts tokens
the way its model does (:meth:`ChatCompletionModel.count_message_tokens`) and knows how much of
the window a request reserves for the reply (:meth:`ChatCompletionModel.output_reserve`); the
pipeline refuses a request that doesn't fit with
:class:`~afnio.models.errors.ContextWindowError` before anything is sent.
"""

from __future__ import annotations

import abc
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
from afnio.models.errors import ContextWindowError, TransientError
from afnio.models.limits import Limits
from afnio.models.pricing import cost_usd
from afnio.models.usage import Usage, record_usage

__all__ = [
    "DEFAULT_OUTPUT_RESERVE",
    "ChatCompletionModel",
    "Completion",
    "client_from_config",
    "client_to_config",
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
        max_concurrency: Requests in flight at once (per event loop); ``None`` = no cap.
        requests_per_minute: Pace requests to this rate; ``None`` = no pacing.
        tokens_per_minute: Pace tokens (prompt estimate, then actual) to this rate.
        max_retries: Retries of a request failing with a transient error (429, 5xx, timeout).
        retry_base_delay: Backoff before the first retry, in seconds (doubles, jittered).
        retry_max_delay: Longest backoff between retries (a ``Retry-After`` may ask longer).
        budget_usd: Refuse requests (before sending) once this client spent this many dollars.
        budget_tokens: Refuse requests once this client used this many tokens.
        cache: A :class:`~afnio.models.cache.ResponseCache`, or ``None`` for no cache.
        context_window: The model's context window in tokens (prompt plus reply); ``None``
            takes it from the client (a local model's ``n_ctx``), else from the table of known
            provider models, else assumes 8192 with a one-time warning.

    Attributes:
        provider: The provider name, e.g. ``"openai"``, ``"anthropic"``, ``"local"``.
        model: The model name sent to the provider.
        limits: The :class:`~afnio.models.limits.Limits` gating this client's requests.
        cache: The response cache or ``None``.

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

    def __init__(
        self,
        model: str = "",
        *,
        max_concurrency: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_retries: int = 3,
        retry_base_delay: float = 0.5,
        retry_max_delay: float = 30.0,
        budget_usd: float | None = None,
        budget_tokens: int | None = None,
        cache: ResponseCache | None = None,
        context_window: int | None = None,
    ) -> None:
        if not isinstance(model, str):
            raise TypeError(
                f"{type(self).__name__}: model must be a str, got {type(model).__name__}"
            )
        if cache is not None and not isinstance(cache, ResponseCache):
            raise TypeError(
                f"{type(self).__name__}: cache must be a ResponseCache or None, "
                f"got {type(cache).__name__}"
            )
        self.model = model or type(self).model
        self.limits = Limits(
            max_concurrency=max_concurrency,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            max_retries=max_retries,
            retry_base_delay=retry_base_delay,
            retry_max_delay=retry_max_delay,
            budget_usd=budget_usd,
            budget_tokens=budget_tokens,
        )
        if context_window is not None and (
            not isinstance(context_window, int) or isinstance(context_window, bool)
            or context_window < 1
        ):
            raise ValueError(
                f"{type(self).__name__}: context_window must be a positive int (tokens) or None, "
                f"got {context_window!r}"
            )
        self.cache = cache
        self._context_window = context_window
        self._usage = Usage()
        self._usage_lock = threading.Lock()

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

    def structured_output_args(self, schema: dict[str, Any], name: str) -> dict[str, Any] | None:
        """Completion arguments that constrain a reply to ``schema`` on this backend, or
        ``None`` when it has no structured outputs (callers then use their tag protocol)."""
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

    def _check_fits(self, messages: list[dict[str, Any]], reserve: int) -> int:
        """The request's prompt tokens, or ContextWindowError if it can't fit the window."""
        prompt = self.count_message_tokens(messages)
        window = self.context_window
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
            TypeError, ValueError: If ``messages`` or ``max_tokens`` is malformed (nothing is
                sent).
            ContextWindowError: If the prompt's tokens plus the output reserve
                (:meth:`output_reserve`) exceed :attr:`context_window` (nothing is sent).
            BudgetExceededError: If this client's budget is spent (nothing is sent).
            CacheMissError: If the cache is in ``replay`` mode and has no reply.
            TransientError: If the request still failed after ``max_retries`` retries.
        """
        name = type(self).__name__
        messages = _checked_messages(messages, name)
        prompt_tokens = self._check_fits(messages, self.output_reserve(completion_args))
        cache = self.cache if self.cache is not None and self.cache.reads else None
        key = ""
        if cache is not None:
            key = cache.key(self.provider, self.model, messages, completion_args)
            hit = await cache.aget(key)
            if hit is not None:
                self._record(Usage(cached_tokens=hit.prompt_tokens + hit.completion_tokens))
                return hit.text

        token_rate = self.limits.token_rate
        estimated = prompt_tokens if token_rate is not None else 0

        async def send() -> Completion:
            return await self._send(messages, **completion_args)

        completion = await self.limits.call(
            send,
            estimated_tokens=estimated,
            spent=self._spent,
            client=self,
            on_retry=self._log_retry,
        )
        if not isinstance(completion, Completion) or not isinstance(completion.text, str):
            raise TypeError(
                f"{name}._send must return a Completion with str text, got {completion!r:.80}"
            )
        if token_rate is not None:
            token_rate.adjust(completion.prompt_tokens + completion.completion_tokens - estimated)
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

    def chat(self, messages: list[dict[str, Any]], **completion_args: Any) -> str:
        """Synchronous twin of :meth:`achat` (safe from Jupyter and from threads)."""
        return run(self.achat(messages, **completion_args))

    def _log_retry(self, attempt: int, error: TransientError, delay: float) -> None:
        status = f"status {error.status}, " if error.status is not None else ""
        logger.warning(
            "%r: request failed (%s%s); retry %d of %d in %.2fs",
            self, status, type(error).__name__, attempt, self.limits.max_retries, delay,
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

        Includes the limit options that differ from their defaults and the cache (as its path
        and mode), so :meth:`from_config` rebuilds a client that behaves the same.
        """
        config: dict[str, Any] = {"model": self.model, **self.limits.get_config()}
        if self._context_window is not None:
            config["context_window"] = self._context_window
        if self.cache is not None:
            config["cache"] = self.cache.get_config()
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ChatCompletionModel:
        """Rebuild a client from :meth:`get_config` output (keys come from the environment)."""
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
        # Pickle through the secret-free config: keys come back from the environment.
        return client_from_config, (client_to_config(self),)


def client_to_config(client: ChatCompletionModel) -> dict[str, Any]:
    """Describe ``client`` as ``{"class": "module.Class", "config": {...}}``, without secrets."""
    cls = type(client)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "config": client.get_config()}


def client_from_config(description: dict[str, Any]) -> ChatCompletionModel:
    """Rebuild a client from :func:`client_to_config` output.

    Only subclasses of :class:`ChatCompletionModel` are accepted, so a crafted file can't make
    afnio instantiate an arbitrary class.

    Raises:
        ValueError: If the class can't be found or is not a ChatCompletionModel.
    """
    path = description.get("class", "")
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"cannot find model client class {path!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, ChatCompletionModel)):
        raise ValueError(f"{path!r} is not a ChatCompletionModel subclass")
    return cls.from_config(dict(description.get("config", {})))

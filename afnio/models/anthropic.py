"""Anthropic chat clients on the official ``anthropic`` SDK (the Messages API).

afnio's messages are OpenAI-shaped (``system`` / ``user`` / ``assistant`` roles); here system
messages move to the Messages API's ``system`` field. Retries, limits, budgets, caching and usage
belong to :class:`~afnio.models.model.ChatCompletionModel`; the SDK is built with
``max_retries=0``.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any

import anthropic

from afnio.models._sdk import PerLoop, json_schema_of, redact, retry_after_seconds
from afnio.models.errors import ModelError, TransientError
from afnio.models.model import ChatCompletionModel, Completion

__all__ = ["Anthropic", "AsyncAnthropic"]

DEFAULT_MAX_TOKENS = 1024
"""``max_tokens`` sent when the caller gives none (the Messages API requires one)."""

_RETRYABLE_STATUS = {408, 409, 429}
_NO_KEY_NEEDED = "no-key-needed"
_UNSUPPORTED = {
    "seed": "the Messages API has no seed",
    "frequency_penalty": "the Messages API has no frequency_penalty",
    "presence_penalty": "the Messages API has no presence_penalty",
    "logprobs": "the Messages API returns no logprobs",
}


class AsyncAnthropic(ChatCompletionModel):
    """A client for Anthropic's Messages API.

    Args:
        model: The model name, e.g. ``"claude-haiku-4-5"``.
        api_key: The API key; defaults to ``ANTHROPIC_API_KEY``. Kept only inside the SDK client,
            never in :meth:`get_config`, reprs or caches. With a ``base_url`` and no key at all,
            a placeholder is sent.
        base_url: Another endpoint speaking the Messages API (the SDK appends
            ``/v1/messages``).
        timeout: Seconds before one HTTP request is abandoned (and retried by afnio).
        max_tokens: ``max_tokens`` used when a request gives neither ``max_tokens`` nor
            ``max_completion_tokens``.
        **options: Pipeline options of :class:`~afnio.models.model.ChatCompletionModel`
            (``max_concurrency``, ``requests_per_minute``, ``tokens_per_minute``,
            ``max_retries``, ``budget_usd``, ``budget_tokens``, ``cache``).

    Completion arguments understood by :meth:`achat`: ``max_tokens`` (or its OpenAI name
    ``max_completion_tokens``), ``stop`` (sent as ``stop_sequences``), ``reasoning_effort``
    (sent as ``output_config.effort``), ``response_format`` (a JSON schema in any form
    :func:`~afnio.models._sdk.json_schema_of` accepts, sent as structured output
    ``output_config.format``), and every other argument of the SDK's ``messages.create``.
    Arguments the installed SDK doesn't list (``temperature``, ``top_p``, ``top_k``, ...) are
    sent in the request body as given; a model that rejects them answers with an HTTP 400,
    raised as a :class:`~afnio.models.errors.ModelError`. ``n`` must be 1; ``seed`` and the
    OpenAI penalties are refused with a ``ValueError`` rather than silently dropped.

    Example:
        >>> from afnio.testing import FakeProviderServer
        >>> with FakeProviderServer(reply=lambda body: body["system"]) as server:
        ...     client = AsyncAnthropic("claude-haiku-4-5", base_url=server.anthropic_base_url)
        ...     client.chat([{"role": "system", "content": "be brief"},
        ...                  {"role": "user", "content": "hi"}])
        'be brief'
    """

    provider = "anthropic"

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        **options: Any,
    ) -> None:
        name = type(self).__name__
        if not isinstance(model, str) or not model:
            raise ValueError(f"{name}: model must be a non-empty str, got {model!r}")
        if not timeout or timeout <= 0:
            raise ValueError(f"{name}: timeout must be > 0 seconds, got {timeout!r}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"{name}: max_tokens must be a positive int, got {max_tokens!r}")
        super().__init__(model=model, **options)
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            if base_url is None:
                raise ModelError(
                    f"{name}({model!r}): no Anthropic API key; pass api_key= or set "
                    "ANTHROPIC_API_KEY"
                )
            key = _NO_KEY_NEEDED
        self.base_url = base_url
        self.timeout = float(timeout)
        self.max_tokens = max_tokens
        # The key lives only in this SDK object; per-loop clients are copies of it.
        self._template = anthropic.AsyncAnthropic(
            api_key=key, base_url=base_url, timeout=self.timeout, max_retries=0
        )
        self._clients: PerLoop[anthropic.AsyncAnthropic] = PerLoop(self._new_sdk_client)

    def _new_sdk_client(self) -> anthropic.AsyncAnthropic:
        return self._template.copy(
            http_client=anthropic.DefaultAsyncHttpxClient(timeout=self.timeout)
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
        config.update(base_url=self.base_url, timeout=self.timeout, max_tokens=self.max_tokens)
        return config

    async def _send(self, messages: list[dict[str, Any]], **completion_args: Any) -> Completion:
        request = self._request(messages, completion_args)
        client = self._clients.get()
        try:
            response = await client.messages.create(model=self.model, **request)
        except anthropic.APIStatusError as exc:
            raise self._status_error(exc) from None
        except anthropic.APITimeoutError:
            raise TransientError(
                f"{self.provider} {self.model}: request timed out after {self.timeout}s"
            ) from None
        except anthropic.APIConnectionError as exc:
            raise TransientError(f"{self.provider} {self.model}: connection failed: "
                                 f"{self._safe(str(exc.__cause__ or exc))}") from None
        except (json.JSONDecodeError, anthropic.APIResponseValidationError) as exc:
            raise TransientError(f"{self.provider} {self.model}: the response body was not "
                                 f"valid JSON ({type(exc).__name__}: {exc})") from None
        texts = [block.text for block in response.content if block.type == "text"]
        if not texts:
            raise ModelError(
                f"{self.provider} {self.model}: the reply has no text "
                f"(stop_reason={response.stop_reason!r})"
            )
        usage = response.usage
        read = usage.cache_read_input_tokens or 0
        written = usage.cache_creation_input_tokens or 0
        # Anthropic's input_tokens excludes cache reads and writes; afnio's prompt_tokens is
        # the whole prompt, as OpenAI reports it.
        return Completion("".join(texts), usage.input_tokens + read + written,
                          usage.output_tokens, read, written)

    def _request(
        self, messages: list[dict[str, Any]], completion_args: dict[str, Any]
    ) -> dict[str, Any]:
        who = f"{type(self).__name__}.achat"
        args = dict(completion_args)
        n = args.pop("n", 1)
        if n not in (None, 1):
            raise ValueError(f"{who}: n={n!r} is not supported; the Messages API returns one "
                             "reply per request")
        if args.pop("stream", False):
            raise ValueError(f"{who}: stream=True is not supported; achat returns the whole text")
        for unsupported, why in _UNSUPPORTED.items():
            if unsupported in args:
                raise ValueError(f"{who}: completion argument {unsupported!r} is not supported "
                                 f"({why})")
        for forbidden in ("model", "messages"):
            if forbidden in args:
                raise ValueError(f"{who}: {forbidden!r} is set by the client, not a completion "
                                 "argument")
        if "max_completion_tokens" in args:
            if "max_tokens" in args:
                raise ValueError(f"{who}: give max_tokens or max_completion_tokens, not both")
            args["max_tokens"] = args.pop("max_completion_tokens")
        args.setdefault("max_tokens", self.max_tokens)
        if "stop" in args:
            stop = args.pop("stop")
            args["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop or [])
        output_config = dict(args.pop("output_config", None) or {})
        if "reasoning_effort" in args:
            output_config["effort"] = args.pop("reasoning_effort")
        if "response_format" in args:
            schema, _name = json_schema_of(args.pop("response_format"), who)
            if schema is not None:
                output_config["format"] = {"type": "json_schema", "schema": schema}
        if output_config:
            args["output_config"] = output_config
        # The SDK's create() no longer lists sampling arguments such as temperature; they (and
        # any other argument it doesn't know) go into the JSON body exactly as given.
        accepted = _create_arguments()
        extra_body = dict(args.pop("extra_body", None) or {})
        extra_body.update({name: args.pop(name) for name in list(args) if name not in accepted})
        if extra_body:
            args["extra_body"] = extra_body

        system_parts: list[str] = []
        turns: list[dict[str, Any]] = []
        for index, message in enumerate(messages):
            role = message.get("role")
            if role == "system":
                system_parts.append(message["content"])
            elif role in ("user", "assistant"):
                turns.append({"role": role, "content": message["content"]})
            else:
                raise ValueError(f"{who}: messages[{index}] has role {role!r}; expected "
                                 "'system', 'user' or 'assistant'")
        if not turns:
            raise ValueError(f"{who}: messages need at least one 'user' message besides system "
                             "messages")
        if system_parts:
            if "system" in args:
                raise ValueError(f"{who}: give system text as system messages or as the "
                                 "'system' argument, not both")
            args["system"] = "\n\n".join(system_parts)
        args["messages"] = turns
        return args

    def _status_error(self, exc: anthropic.APIStatusError) -> ModelError:
        status = exc.status_code
        name = f"{self.provider} {self.model}"
        message = self._safe(exc.api_message or exc.message)
        if status in _RETRYABLE_STATUS or status >= 500:
            return TransientError(f"{name}: HTTP {status}: {message}", status=status,
                                  retry_after=retry_after_seconds(exc.response.headers))
        if status in (401, 403):
            return ModelError(f"{name}: HTTP {status}: authentication failed; check the API key "
                              "(api_key= or ANTHROPIC_API_KEY)")
        return ModelError(f"{name}: HTTP {status}: {message}")

    def _safe(self, text: str) -> str:
        return redact(text, self._template.api_key)


@functools.cache
def _create_arguments() -> frozenset[str]:
    """Keyword arguments of the installed SDK's ``AsyncMessages.create``."""
    create = anthropic.resources.messages.AsyncMessages.create
    return frozenset(inspect.signature(create).parameters) - {"self"}


class Anthropic(AsyncAnthropic):
    """:class:`AsyncAnthropic` for code that calls :meth:`chat` synchronously.

    Both classes behave identically (both have ``chat`` and ``achat``); this name mirrors the
    SDK's ``anthropic.Anthropic``.

    Example:
        >>> from afnio.testing import FakeProviderServer
        >>> with FakeProviderServer() as server:
        ...     Anthropic("claude-haiku-4-5", base_url=server.anthropic_base_url).chat(
        ...         [{"role": "user", "content": "echo me"}])
        'echo me'
    """

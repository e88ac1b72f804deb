"""OpenAI chat-completion clients on the official ``openai`` SDK.

:class:`AsyncOpenAI` talks to OpenAI, or to any OpenAI-compatible server (vLLM, Ollama, the
llama.cpp server, ...) through ``base_url``. Retries, rate limits, budgets, caching and usage are
the job of :class:`~afnio.models.model.ChatCompletionModel`; the SDK is built with
``max_retries=0`` so every request afnio counts is one HTTP request.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any

import openai

from afnio.models._sdk import PerLoop, json_schema_of, redact, retry_after_seconds
from afnio.models.errors import ModelError, TransientError
from afnio.models.model import ChatCompletionModel, Completion
from afnio.models.tokens import count_message_tokens, count_tokens

__all__ = ["AsyncOpenAI", "OpenAI"]

_RETRYABLE_STATUS = {408, 409, 429}
_NO_KEY_NEEDED = "no-key-needed"


class AsyncOpenAI(ChatCompletionModel):
    """A client for OpenAI's chat completions API, or any server that speaks it.

    Args:
        model: The model name, e.g. ``"gpt-4.1-nano"``.
        api_key: The API key; defaults to ``OPENAI_API_KEY``. Kept only inside the SDK client,
            never in :meth:`get_config`, reprs or caches. With a ``base_url`` and no key at all,
            a placeholder is sent (local servers ignore it).
        base_url: An OpenAI-compatible endpoint, e.g. ``"http://127.0.0.1:8000/v1"``; the
            provider is then ``"openai-compatible"``.
        timeout: Seconds before one HTTP request is abandoned (and retried by afnio).
        organization: Optional OpenAI organization id.
        **options: Pipeline options of :class:`~afnio.models.model.ChatCompletionModel`
            (``max_concurrency``, ``requests_per_minute``, ``tokens_per_minute``,
            ``max_retries``, ``budget_usd``, ``budget_tokens``, ``cache``).

    Completion arguments understood by :meth:`achat`: ``temperature``, ``max_tokens``,
    ``max_completion_tokens``, ``reasoning_effort``, ``seed``, ``response_format`` (OpenAI's
    ``{"type": "json_schema", ...}`` / ``{"type": "json_object"}``, or a bare JSON schema, which
    is wrapped as a strict ``json_schema``), ``top_p``, ``stop`` and every other argument of the
    SDK's ``chat.completions.create``; arguments the SDK doesn't list (e.g. a vLLM server's
    ``top_k``) are sent in the request body as given. ``n`` must be 1 and ``stream`` is not
    supported.

    Example:
        >>> from afnio.testing import FakeProviderServer
        >>> with FakeProviderServer(reply=lambda body: "Paris") as server:
        ...     client = AsyncOpenAI("gpt-4.1-nano", base_url=server.openai_base_url)
        ...     client.chat([{"role": "user", "content": "Capital of France?"}])
        'Paris'
    """

    provider = "openai"

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 60.0,
        organization: str | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"{type(self).__name__}: model must be a non-empty str, got {model!r}")
        if not timeout or timeout <= 0:
            raise ValueError(f"{type(self).__name__}: timeout must be > 0 seconds, got {timeout!r}")
        super().__init__(model=model, **options)
        if base_url is not None:
            self.provider = "openai-compatible"
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if base_url is None:
                raise ModelError(
                    f"{type(self).__name__}({model!r}): no OpenAI API key; pass api_key= or set "
                    "OPENAI_API_KEY (or give base_url= for a server that needs no key)"
                )
            key = _NO_KEY_NEEDED
        self.base_url = base_url
        self.timeout = float(timeout)
        self.organization = organization
        # The key lives only in this SDK object; per-loop clients are copies of it.
        self._template = openai.AsyncOpenAI(
            api_key=key, base_url=base_url, organization=organization, timeout=self.timeout,
            max_retries=0,
        )
        self._clients: PerLoop[openai.AsyncOpenAI] = PerLoop(self._new_sdk_client)

    def _new_sdk_client(self) -> openai.AsyncOpenAI:
        return self._template.copy(
            http_client=openai.DefaultAsyncHttpxClient(timeout=self.timeout)
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
        if self.organization is not None:
            config["organization"] = self.organization
        return config

    async def _send(self, messages: list[dict[str, Any]], **completion_args: Any) -> Completion:
        args = self._request_args(completion_args)
        client = self._clients.get()
        try:
            response = await client.chat.completions.create(
                model=self.model, messages=messages, **args
            )
        except openai.APIStatusError as exc:
            raise self._status_error(exc) from None
        except openai.APITimeoutError:
            raise TransientError(
                f"{self.provider} {self.model}: request timed out after {self.timeout}s"
            ) from None
        except openai.APIConnectionError as exc:
            raise TransientError(f"{self.provider} {self.model}: connection failed: "
                                 f"{self._safe(str(exc.__cause__ or exc))}") from None
        except (json.JSONDecodeError, openai.APIResponseValidationError) as exc:
            raise TransientError(f"{self.provider} {self.model}: the response body was not "
                                 f"valid JSON ({type(exc).__name__}: {exc})") from None
        return self._completion(response, messages)

    def _request_args(self, completion_args: dict[str, Any]) -> dict[str, Any]:
        who = f"{type(self).__name__}.achat"
        args = dict(completion_args)
        n = args.pop("n", 1)
        if n not in (None, 1):
            raise ValueError(
                f"{who}: n={n!r} is not supported; afnio asks for one completion per request "
                "(send several requests instead)"
            )
        if args.get("stream"):
            raise ValueError(f"{who}: stream=True is not supported; achat returns the whole text")
        args.pop("stream", None)
        for forbidden in ("model", "messages"):
            if forbidden in args:
                raise ValueError(f"{who}: {forbidden!r} is set by the client, not a completion "
                                 "argument")
        if "response_format" in args:
            args["response_format"] = _openai_response_format(args["response_format"], who)
        # Arguments the SDK doesn't list (a compatible server's top_k, repetition_penalty, ...)
        # go into the JSON body as given.
        accepted = _create_arguments()
        extra_body = dict(args.pop("extra_body", None) or {})
        extra_body.update({name: args.pop(name) for name in list(args) if name not in accepted})
        if extra_body:
            args["extra_body"] = extra_body
        return args

    def _completion(self, response: Any, messages: list[dict[str, Any]]) -> Completion:
        if not getattr(response, "choices", None):
            raise TransientError(f"{self.provider} {self.model}: the response has no choices")
        message = response.choices[0].message
        if message.content is None:
            refusal = getattr(message, "refusal", None)
            reason = f"refused: {refusal}" if refusal else (
                f"no text content (finish_reason={response.choices[0].finish_reason!r})")
            raise ModelError(f"{self.provider} {self.model}: the reply has {reason}")
        text = message.content
        usage = response.usage
        if usage is None:
            # Some compatible servers omit usage; count locally (documented estimate).
            return Completion(text, count_message_tokens(messages), count_tokens(text))
        details = usage.prompt_tokens_details
        cached = (details.cached_tokens or 0) if details is not None else 0
        written = (getattr(details, "cache_write_tokens", None) or 0) if details is not None else 0
        return Completion(text, usage.prompt_tokens, usage.completion_tokens, cached, written)

    def _status_error(self, exc: openai.APIStatusError) -> ModelError:
        status = exc.status_code
        name = f"{self.provider} {self.model}"
        if status in _RETRYABLE_STATUS or status >= 500:
            return TransientError(
                f"{name}: HTTP {status}: {self._safe(_api_message(exc))}",
                status=status, retry_after=retry_after_seconds(exc.response.headers),
            )
        if status in (401, 403):
            return ModelError(
                f"{name}: HTTP {status}: authentication failed; check the API key (api_key= or "
                f"OPENAI_API_KEY){' and base_url ' + repr(self.base_url) if self.base_url else ''}"
            )
        return ModelError(f"{name}: HTTP {status}: {self._safe(_api_message(exc))}")

    def _safe(self, text: str) -> str:
        return redact(text, self._template.api_key)


class OpenAI(AsyncOpenAI):
    """:class:`AsyncOpenAI` for code that calls :meth:`chat` synchronously.

    The two classes behave identically (both have ``chat`` and ``achat``); this name mirrors the
    SDK's ``openai.OpenAI``.

    Example:
        >>> from afnio.testing import FakeProviderServer
        >>> with FakeProviderServer() as server:
        ...     OpenAI("gpt-4.1-nano", base_url=server.openai_base_url).chat(
        ...         [{"role": "user", "content": "echo me"}])
        'echo me'
    """


@functools.cache
def _create_arguments() -> frozenset[str]:
    """Keyword arguments of the installed SDK's ``chat.completions.create``."""
    create = openai.resources.chat.completions.AsyncCompletions.create
    return frozenset(inspect.signature(create).parameters) - {"self"}


def _api_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
    return exc.message


def _openai_response_format(response_format: Any, who: str) -> dict[str, Any]:
    if isinstance(response_format, dict) and response_format.get("type") in (
        "text", "json_object", "json_schema"
    ):
        json_schema_of(response_format, who)  # validates the shape
        return response_format
    schema, name = json_schema_of(response_format, who)
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}

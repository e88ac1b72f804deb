"""Anthropic chat clients on the official ``anthropic`` SDK (the Messages API).

afnio's messages are OpenAI-shaped (``system`` / ``user`` / ``assistant`` roles); here system
messages move to the Messages API's ``system`` field. Retries, limits, budgets, caching and usage
belong to :class:`~afnio.models.model.ChatCompletionModel`; the SDK is built with
``max_retries=0``.
"""

from __future__ import annotations

from typing import Any

import anthropic

from afnio.models._sdk import (
    SdkChatModel,
    check_model_and_timeout,
    check_one_whole_reply,
    create_arguments,
    json_schema_of,
    move_unknown_to_extra_body,
    refuse_client_set_arguments,
    rename_max_completion_tokens,
)
from afnio.models.errors import ModelError
from afnio.models.model import Completion

__all__ = ["Anthropic", "AsyncAnthropic"]

DEFAULT_MAX_TOKENS = 1024
"""``max_tokens`` sent when the caller gives none (the Messages API requires one)."""

_UNSUPPORTED = {
    "seed": "the Messages API has no seed",
    "frequency_penalty": "the Messages API has no frequency_penalty",
    "presence_penalty": "the Messages API has no presence_penalty",
    "logprobs": "the Messages API returns no logprobs",
}


class AsyncAnthropic(SdkChatModel):
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
    _sdk = anthropic
    _api_key_env = "ANTHROPIC_API_KEY"
    _vendor = "Anthropic"

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
        # Checked here too so that a bad model or timeout is reported before a bad max_tokens.
        check_model_and_timeout(name, model, timeout)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"{name}: max_tokens must be a positive int, got {max_tokens!r}")
        super().__init__(model, api_key=api_key, base_url=base_url, timeout=timeout, **options)
        self.max_tokens = max_tokens

    def _new_sdk_template(self, api_key: str) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            api_key=api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0
        )

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments without the API key (it comes from the environment again)."""
        config = super().get_config()
        config.update(max_tokens=self.max_tokens)
        return config

    def _default_output_cap(self) -> int:
        return self.max_tokens

    async def _send(self, messages: list[dict[str, Any]], **completion_args: Any) -> Completion:
        request = self._request(messages, completion_args)
        response = await self._call_sdk(
            lambda client: client.messages.create(model=self.model, **request)
        )
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
        check_one_whole_reply(args, who, "the Messages API returns one reply per request")
        for unsupported, why in _UNSUPPORTED.items():
            if unsupported in args:
                raise ValueError(f"{who}: completion argument {unsupported!r} is not supported "
                                 f"({why})")
        refuse_client_set_arguments(args, who)
        rename_max_completion_tokens(args, who)
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
        move_unknown_to_extra_body(
            args, create_arguments(anthropic.resources.messages.AsyncMessages.create)
        )

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

    def _api_message(self, exc: anthropic.APIStatusError) -> str:
        return exc.api_message or exc.message


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

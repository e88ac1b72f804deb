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
    refuse_client_set_arguments,
    rename_max_completion_tokens,
    sort_arguments,
)
from afnio.models.errors import ModelError
from afnio.models.model import Completion

__all__ = ["Anthropic", "AsyncAnthropic"]

DEFAULT_MAX_TOKENS = 1024
"""``max_tokens`` sent when the caller gives none (the Messages API requires one)."""

SAMPLING_ARGUMENTS = frozenset({"temperature", "top_p", "top_k"})
"""Messages API arguments the installed SDK's ``create`` no longer lists; sent in the body."""

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
    ``output_config.format``), ``temperature``, ``top_p``, ``top_k`` (sent in the request body:
    the installed SDK no longer lists them; a model that rejects them answers with an HTTP 400,
    raised as an :class:`~afnio.models.errors.InvalidRequestError`) and every other argument of
    the SDK's ``messages.create``. Any other name is refused with a ``ValueError`` suggesting
    the closest one; send it explicitly inside ``extra_body={...}``. ``n`` must be 1; ``seed``
    and the OpenAI penalties are refused with a ``ValueError`` rather than silently dropped.

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

    def _structured_output_args(self, schema: dict[str, Any], name: str) -> dict[str, Any] | None:
        # Sent as the Messages API's structured output, output_config.format (see _request_args).
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": name, "schema": schema}}}

    async def _send(self, messages: list[dict[str, Any]], **completion_args: Any) -> Completion:
        request = self._request(messages, completion_args)
        structured = "output_config.format" if "format" in request.get("output_config", {}) else (
            None)
        data = await self._call_sdk(
            lambda client: client.messages.with_raw_response.create(model=self.model, **request),
            structured=structured,
        )
        return self._completion(data, messages)

    def _check_completion_args(self, completion_args: dict[str, Any]) -> None:
        self._request_args(completion_args)

    def _completion(self, data: dict[str, Any], messages: list[dict[str, Any]]) -> Completion:
        blocks = data.get("content")
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise self._malformed(data, "has no content blocks")
        texts = [block.get("text") for block in blocks if block.get("type") == "text"]
        if not all(isinstance(text, str) for text in texts):
            raise self._malformed(data, "has a text block without text")
        if not texts:
            raise ModelError(
                f"{self._where()}: the reply has no text (stop_reason="
                f"{data.get('stop_reason')!r})"
            )
        text = "".join(texts)
        usage = data.get("usage")
        if usage is None:
            return Completion(text, self.count_message_tokens(messages), self.count_tokens(text))
        fields = usage if isinstance(usage, dict) else {}
        input_tokens, output_tokens = fields.get("input_tokens"), fields.get("output_tokens")
        if not all(_is_count(v) for v in (input_tokens, output_tokens)):
            raise self._malformed(data, "has usage without input_tokens/output_tokens")
        read = fields.get("cache_read_input_tokens") or 0
        written = fields.get("cache_creation_input_tokens") or 0
        if not (_is_count(read) and _is_count(written)):
            raise self._malformed(data, "has malformed cache token counts")
        # Anthropic's input_tokens excludes cache reads and writes; afnio's prompt_tokens is
        # the whole prompt, as OpenAI reports it.
        return Completion(text, input_tokens + read + written, output_tokens, read, written)

    def _request_args(self, completion_args: dict[str, Any]) -> dict[str, Any]:
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
        sort_arguments(
            args,
            create_arguments(anthropic.resources.messages.AsyncMessages.create),
            who,
            body_extras=SAMPLING_ARGUMENTS,
        )
        return args

    def _request(
        self, messages: list[dict[str, Any]], completion_args: dict[str, Any]
    ) -> dict[str, Any]:
        who = f"{type(self).__name__}.achat"
        args = self._request_args(completion_args)
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


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

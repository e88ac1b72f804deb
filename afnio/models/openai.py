"""OpenAI chat-completion clients on the official ``openai`` SDK.

:class:`AsyncOpenAI` talks to OpenAI, or to any OpenAI-compatible server (vLLM, Ollama, the
llama.cpp server, ...) through ``base_url``. Retries, rate limits, budgets, caching and usage are
the job of :class:`~afnio.models.model.ChatCompletionModel`; the SDK is built with
``max_retries=0`` so every request afnio counts is one HTTP request.
"""

from __future__ import annotations

from typing import Any

import openai

from afnio.models._sdk import (
    COMPATIBLE_SERVER_ARGUMENTS,
    SdkChatModel,
    check_one_whole_reply,
    create_arguments,
    json_schema_of,
    refuse_client_set_arguments,
    sort_arguments,
)
from afnio.models.errors import ModelError
from afnio.models.model import Completion, openai_json_schema

STRUCTURED_OUTPUT_FLAVOURS = ("json_schema", "llama.cpp", "vllm")
"""What ``structured_output=`` may name (or ``None``): how a server takes a JSON schema."""

__all__ = ["AsyncOpenAI", "OpenAI"]


class AsyncOpenAI(SdkChatModel):
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
        structured_output: How :meth:`structured_output_args` asks this server for JSON that
            follows a schema: ``"json_schema"`` (OpenAI's ``response_format``, the default:
            OpenAI, vLLM and recent llama.cpp servers take it), ``"llama.cpp"``
            (``{"type": "json_object", "schema": ...}``, what ``llama_cpp.server`` takes),
            ``"vllm"`` (``guided_json``) or ``None`` (no structured outputs: callers use tags).
            Not probed: a server that rejects the format once turns it off for the client.
        **options: Pipeline options of :class:`~afnio.models.model.ChatCompletionModel`
            (``max_concurrency``, ``requests_per_minute``, ``tokens_per_minute``,
            ``max_retries``, ``budget_usd``, ``budget_tokens``, ``cache``).

    Completion arguments understood by :meth:`achat`: ``temperature``, ``max_tokens``,
    ``max_completion_tokens``, ``reasoning_effort``, ``seed``, ``response_format`` (OpenAI's
    ``{"type": "json_schema", ...}`` / ``{"type": "json_object"}``, or a bare JSON schema, which
    is wrapped as a strict ``json_schema``), ``top_p``, ``stop`` and every other argument of the
    SDK's ``chat.completions.create``. A name the OpenAI API doesn't define is refused with a
    ``ValueError`` suggesting the closest one (``tempreture`` → ``temperature``), except, for
    an OpenAI-compatible server (``base_url``), the documented extras of vLLM, llama.cpp's
    server and Ollama (:data:`~afnio.models._sdk.COMPATIBLE_SERVER_ARGUMENTS`: ``top_k``,
    ``min_p``, ``repetition_penalty``, ``guided_json``, ...), which go into the request body.
    Anything else is sent only explicitly, inside ``extra_body={...}``. ``n`` must be 1 and
    ``stream`` is not supported.

    Example:
        >>> from afnio.testing import FakeProviderServer
        >>> with FakeProviderServer(reply=lambda body: "Paris") as server:
        ...     client = AsyncOpenAI("gpt-4.1-nano", base_url=server.openai_base_url)
        ...     client.chat([{"role": "user", "content": "Capital of France?"}])
        'Paris'
    """

    provider = "openai"
    _sdk = openai
    _api_key_env = "OPENAI_API_KEY"
    _vendor = "OpenAI"
    _missing_key_hint = " (or give base_url= for a server that needs no key)"

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 60.0,
        organization: str | None = None,
        structured_output: str | None = "json_schema",
        **options: Any,
    ) -> None:
        if structured_output is not None and structured_output not in STRUCTURED_OUTPUT_FLAVOURS:
            raise ValueError(
                f"{type(self).__name__}: structured_output must be one of "
                f"{', '.join(map(repr, STRUCTURED_OUTPUT_FLAVOURS))} or None, got "
                f"{structured_output!r}"
            )
        if base_url is None and structured_output not in ("json_schema", None):
            raise ValueError(
                f"{type(self).__name__}: structured_output={structured_output!r} is for an "
                "OpenAI-compatible server (give its base_url); OpenAI takes 'json_schema'"
            )
        self.structured_output = structured_output
        self.organization = organization
        if base_url is not None:
            self.provider = "openai-compatible"
        super().__init__(model, api_key=api_key, base_url=base_url, timeout=timeout, **options)

    def _new_sdk_template(self, api_key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=api_key, base_url=self.base_url, organization=self.organization,
            timeout=self.timeout, max_retries=0,
        )

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments without the API key (it comes from the environment again)."""
        config = super().get_config()
        if self.organization is not None:
            config["organization"] = self.organization
        if self.structured_output != "json_schema":
            config["structured_output"] = self.structured_output
        return config

    def _structured_output_args(self, schema: dict[str, Any], name: str) -> dict[str, Any] | None:
        if self.structured_output == "json_schema":
            return {"response_format": openai_json_schema(schema, name)}
        if self.structured_output == "llama.cpp":
            return {"response_format": {"type": "json_object", "schema": schema}}
        if self.structured_output == "vllm":
            return {"guided_json": schema}
        return None

    async def _send(self, messages: list[dict[str, Any]], **completion_args: Any) -> Completion:
        args = self._request_args(completion_args)
        structured = None
        if "response_format" in completion_args or "guided_json" in completion_args:
            structured = "guided_json" if "guided_json" in completion_args else (
                f"response_format {args['response_format'].get('type')!r}")
        data = await self._call_sdk(
            lambda client: client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, **args
            ),
            structured=structured,
        )
        return self._completion(data, messages)

    def _check_completion_args(self, completion_args: dict[str, Any]) -> None:
        self._request_args(completion_args)

    def _request_args(self, completion_args: dict[str, Any]) -> dict[str, Any]:
        who = f"{type(self).__name__}.achat"
        args = dict(completion_args)
        check_one_whole_reply(
            args, who, "afnio asks for one completion per request (send several requests instead)"
        )
        refuse_client_set_arguments(args, who)
        if "response_format" in args:
            args["response_format"] = _openai_response_format(args["response_format"], who)
        compatible = self.provider == "openai-compatible"
        sort_arguments(
            args,
            create_arguments(openai.resources.chat.completions.AsyncCompletions.create),
            who,
            body_extras=COMPATIBLE_SERVER_ARGUMENTS if compatible else frozenset(),
            extras_name="the compatible servers afnio knows (vLLM, llama.cpp, Ollama)"
            if compatible else "",
        )
        return args

    def _completion(self, data: dict[str, Any], messages: list[dict[str, Any]]) -> Completion:
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._malformed(data, "has no choices")
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict) or "content" not in message:
            raise self._malformed(data, "has no choices[0].message.content")
        text = message["content"]
        if text is None:
            refusal = message.get("refusal")
            reason = f"refused: {refusal}" if refusal else (
                f"no text content (finish_reason={choice.get('finish_reason')!r})")
            raise ModelError(f"{self._where()}: the reply has {reason}")
        if not isinstance(text, str):
            raise self._malformed(data, "has a message content that is not text")
        usage = data.get("usage")
        if usage is None:
            # Some compatible servers omit usage; count locally (the client's own estimate).
            return Completion(text, self.count_message_tokens(messages), self.count_tokens(text))
        prompt = _count(usage, "prompt_tokens")
        completion = _count(usage, "completion_tokens")
        if prompt is None or completion is None:
            raise self._malformed(data, "has usage without prompt_tokens/completion_tokens")
        details = usage.get("prompt_tokens_details")
        details = details if isinstance(details, dict) else {}
        cached = _count(details, "cached_tokens") or 0
        written = _count(details, "cache_write_tokens") or 0
        return Completion(text, prompt, completion, cached, written)

    def _api_message(self, exc: openai.APIStatusError) -> str:
        body = exc.body
        if isinstance(body, dict):
            error = body.get("error", body)
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                return error["message"]
        return exc.message

    def _auth_hint(self) -> str:
        return f" and base_url {self.base_url!r}" if self.base_url else ""


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


def _openai_response_format(response_format: Any, who: str) -> dict[str, Any]:
    if isinstance(response_format, dict) and response_format.get("type") in (
        "text", "json_object", "json_schema"
    ):
        json_schema_of(response_format, who)  # validates the shape
        return response_format
    schema, name = json_schema_of(response_format, who)
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _count(fields: Any, name: str) -> int | None:
    """``fields[name]`` if it is a non-negative int, else ``None``."""
    value = fields.get(name) if isinstance(fields, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None

"""ScriptedModel: an in-process model client whose replies you write."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from afnio.models.model import ChatCompletionModel, Completion, openai_json_schema
from afnio.models.tokens import count_message_tokens, count_tokens
from afnio.testing.latency import LatencyModel

__all__ = ["SCRIPTED_CONTEXT_WINDOW", "ScriptedModel"]

SCRIPTED_CONTEXT_WINDOW = 1_000_000
"""The context window of a :class:`ScriptedModel` given no ``context_window=``."""

_DEFAULT_MAX_TOKENS = 64

Reply = Callable[..., Any]


class ScriptedModel(ChatCompletionModel):
    """A model client for tests: replies come from a function or a list, every request is kept.

    It runs the same request pipeline as the real clients (cache, budget, concurrency and rate
    limits, retries, usage, the context-window check), so those can be tested offline. Tokens
    are counted with :func:`~afnio.models.tokens.count_message_tokens` /
    :func:`~afnio.models.tokens.count_tokens` (``cl100k_base``), which is this model's own
    tokenizer: its counts are exact, with no safety margin. Requests cost nothing.

    Args:
        replies: A function ``f(messages, **completion_args) -> str`` (may be ``async``; may
            raise :class:`~afnio.models.errors.TransientError` to simulate a failure that gets
            retried), or a list of strings returned in turn (cycled when exhausted), or ``None``
            to echo the last user message.
        latency: Seconds each request takes (an ``asyncio.sleep``, so requests overlap), or a
            :class:`~afnio.testing.LatencyModel` whose duration grows with the request's
            prompt and reply tokens (counted as :meth:`count_message_tokens` counts them; the
            reply is computed first, then the whole duration passes), or that model's fields
            as a dict.
        model: The model name to report.
        max_tokens: Tokens a request reserves for its reply when it gives no ``max_tokens``
            (see :meth:`~afnio.models.model.ChatCompletionModel.output_reserve`).
        structured_output: Whether :meth:`structured_output_args` offers OpenAI-style
            ``response_format`` arguments (as a backend with structured outputs does) or
            ``None`` (as one without). A reply function may raise
            :class:`~afnio.models.errors.StructuredOutputUnsupportedError` to act as a server
            rejecting the format; the client then stops offering it, as real clients do.
        **options: The request-pipeline options of :class:`ChatCompletionModel`
            (``max_concurrency``, ``budget_usd``, ``cache``, ...). ``context_window`` defaults
            to :data:`SCRIPTED_CONTEXT_WINDOW`; give a small one to test that requests fit.

    Attributes:
        requests: ``(messages, completion_args)`` of every request actually sent, in the order
            they started (retried attempts included; cache hits and refused requests are not).
        in_flight: Requests being answered right now.
        max_in_flight: The largest number of requests that were in flight at once.

    Example:
        >>> model = ScriptedModel(["positive"])
        >>> model.chat([{"role": "user", "content": "I love it"}])
        'positive'
        >>> len(model.requests)
        1
    """

    provider = "scripted"

    def __init__(
        self,
        replies: Reply | Sequence[str] | None = None,
        latency: float = 0.0,
        model: str = "scripted",
        max_tokens: int = _DEFAULT_MAX_TOKENS,
        structured_output: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        if not isinstance(structured_output, bool):
            raise TypeError(f"ScriptedModel: structured_output must be a bool, got "
                            f"{structured_output!r}")
        self.structured_output = structured_output
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(
                f"ScriptedModel: max_tokens must be a positive int, got {max_tokens!r}"
            )
        self.max_tokens = max_tokens
        if isinstance(replies, str) or not (
            replies is None or callable(replies) or isinstance(replies, Sequence)
        ):
            raise TypeError(
                f"ScriptedModel: replies must be a function, a list of str or None, "
                f"got {replies!r:.80}"
            )
        self._latency = LatencyModel.of(latency)
        self._sleep = asyncio.sleep  # how latency passes (a test may record it instead)
        self.latency = latency
        self._replies = replies
        self._index = 0
        self.requests: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def calls(self) -> int:
        """How many requests were made."""
        return len(self.requests)

    def reset(self) -> None:
        """Forget recorded requests and in-flight statistics."""
        self.requests.clear()
        self.max_in_flight = 0

    async def _send(self, messages: list[dict[str, Any]], **completion_args: Any) -> Completion:
        self.requests.append(([dict(m) for m in messages], dict(completion_args)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        latency = self._latency
        try:
            if latency.base and not latency.per_token:
                await self._sleep(latency.base)
            reply = self._next_reply(messages, completion_args)
            if inspect.isawaitable(reply):
                reply = await reply
            if not isinstance(reply, str):
                raise TypeError(f"ScriptedModel reply must be a str, got {type(reply).__name__}")
            completion = Completion(
                text=reply,
                prompt_tokens=count_message_tokens(messages, self.model),
                completion_tokens=count_tokens(reply, self.model),
            )
            if latency.per_token:
                # The whole modelled duration, now that the reply's length is known.
                key = LatencyModel.request_key(str(m.get("content", "")) for m in messages)
                await self._sleep(latency.seconds(
                    completion.prompt_tokens, completion.completion_tokens, key
                ))
        finally:
            self.in_flight -= 1
        return completion

    def _next_reply(self, messages: list[dict[str, Any]], completion_args: dict[str, Any]) -> Any:
        if self._replies is None:
            users = [m["content"] for m in messages if m.get("role") == "user"]
            return users[-1] if users else ""
        if callable(self._replies):
            return self._replies(messages, **completion_args)
        replies = list(self._replies)
        if not replies:
            raise ValueError("ScriptedModel was given an empty list of replies")
        reply = replies[self._index % len(replies)]
        self._index += 1
        return reply

    def _own_context_window(self) -> int:
        return SCRIPTED_CONTEXT_WINDOW

    def _structured_output_args(self, schema: dict[str, Any], name: str) -> dict[str, Any] | None:
        if not self.structured_output:
            return None
        return {"response_format": openai_json_schema(schema, name)}

    def _counts_exactly(self) -> bool:
        return True

    def _default_output_cap(self) -> int:
        return self.max_tokens

    def get_config(self) -> dict[str, Any]:
        latency = self.latency
        config = {**super().get_config(),
                  "latency": latency.as_dict() if isinstance(latency, LatencyModel) else latency}
        if self.max_tokens != _DEFAULT_MAX_TOKENS:
            config["max_tokens"] = self.max_tokens
        if self.structured_output:
            config["structured_output"] = True
        return config

"""ScriptedModel: an in-process model client whose replies you write."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from afnio.models.model import ChatCompletionModel

__all__ = ["ScriptedModel"]

Reply = Callable[..., Any]


class ScriptedModel(ChatCompletionModel):
    """A model client for tests: replies come from a function or a list, every request is kept.

    Args:
        replies: A function ``f(messages, **completion_args) -> str`` (may be ``async``), or a
            list of strings returned in turn (cycled when exhausted), or ``None`` to echo the last
            user message.
        latency: Seconds each request takes (an ``asyncio.sleep``, so requests overlap).
        model: The model name to report.

    Attributes:
        requests: ``(messages, completion_args)`` of every request, in the order they started.
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
        self, replies: Reply | Sequence[str] | None = None, latency: float = 0.0,
        model: str = "scripted",
    ) -> None:
        self.model = model
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

    async def achat(self, messages: list[dict[str, Any]], **completion_args: Any) -> str:
        self.requests.append(([dict(m) for m in messages], dict(completion_args)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            reply = self._next_reply(messages, completion_args)
            if inspect.isawaitable(reply):
                reply = await reply
        finally:
            self.in_flight -= 1
        if not isinstance(reply, str):
            raise TypeError(f"ScriptedModel reply must be a str, got {type(reply).__name__}")
        return reply

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

    def get_config(self) -> dict[str, Any]:
        return {"model": self.model, "latency": self.latency}

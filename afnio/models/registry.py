"""Which model answers backward calls: the global backward model client."""

from __future__ import annotations

from typing import Any

from afnio.models.model import ChatCompletionModel

__all__ = [
    "get_backward_model_client",
    "get_backward_model_completion_args",
    "set_backward_model_client",
]

_backward_client: ChatCompletionModel | None = None
_backward_completion_args: dict[str, Any] = {}


def set_backward_model_client(
    model_path: str | ChatCompletionModel,
    client_args: dict[str, Any] | None = None,
    completion_args: dict[str, Any] | None = None,
) -> None:
    """Set the client that computes textual gradients when an op has none of its own.

    Args:
        model_path: A client instance, or a ``"provider/model"`` path.
        client_args: Constructor arguments for the client built from a path.
        completion_args: Arguments sent with every backward request (e.g. ``temperature``).
    """
    global _backward_client, _backward_completion_args
    if isinstance(model_path, ChatCompletionModel):
        client = model_path
    else:
        client = get_client(model_path, **(client_args or {}))
    _backward_client = client
    _backward_completion_args = dict(completion_args or {})


def get_backward_model_client() -> ChatCompletionModel | None:
    """The global backward model client, or ``None`` when none was set."""
    return _backward_client


def get_backward_model_completion_args() -> dict[str, Any]:
    """The completion arguments sent with every backward request."""
    return dict(_backward_completion_args)

"""Module wrapper of the language-model call: :class:`ChatCompletion`.

Example:
    >>> import afnio
    >>> from afnio.cognitive import ChatCompletion
    >>> from afnio.testing import ScriptedModel
    >>> chat = ChatCompletion(ScriptedModel(["Paris"]), temperature=0)
    >>> question = afnio.Variable("Capital of France?", role="question")
    >>> chat([{"role": "user", "content": [question]}]).data
    'Paris'
    >>> list(chat.state_dict())
    ['forward_model_client', 'completion_args']
"""

from __future__ import annotations

from typing import Any

from afnio._variable import Variable
from afnio.cognitive import functional as F
from afnio.cognitive.modules.module import Module
from afnio.models.model import ChatCompletionModel

__all__ = ["ChatCompletion"]


class ChatCompletion(Module):
    """A chat-model call as a module: holds the client and the completion arguments.

    Args:
        forward_model_client: The model that answers (registered as ``forward_model_client``).
        backward_model_client: The model that writes gradients for this call (registered as
            ``backward_model_client``); default: the global backward model client.
        backward_completion_args: Completion arguments of the gradient requests.
        **completion_args: Sent with every request (registered as ``completion_args``).

    Raises:
        TypeError: If a client is not a ChatCompletionModel.
    """

    def __init__(
        self,
        forward_model_client: ChatCompletionModel,
        *,
        backward_model_client: ChatCompletionModel | None = None,
        backward_completion_args: dict[str, Any] | None = None,
        **completion_args: Any,
    ) -> None:
        super().__init__()
        self.register_model("forward_model_client", _checked(forward_model_client, "forward"))
        if backward_model_client is not None:
            self.register_model(
                "backward_model_client", _checked(backward_model_client, "backward")
            )
        self.register_completion_config("completion_args", dict(completion_args))
        if backward_completion_args is not None:
            self.register_completion_config(
                "backward_completion_args", dict(backward_completion_args)
            )

    def forward(
        self,
        messages: list[dict[str, Any]],
        inputs: dict[str, Any] | None = None,
        **completion_args: Any,
    ) -> Variable:
        """Send ``messages`` (placeholders filled from ``inputs``); call arguments override the
        module's completion arguments."""
        arguments = {**(self.completion_args or {}), **completion_args}
        if self._models.get("backward_model_client") is not None:
            arguments.setdefault("backward_model_client", self.backward_model_client)
        if self._completion_configs.get("backward_completion_args") is not None:
            arguments.setdefault("backward_completion_args", self.backward_completion_args)
        return F.chat_completion(self.forward_model_client, messages, inputs, **arguments)

    def extra_repr(self) -> str:
        client = self.forward_model_client
        described = "None" if client is None else f"{client.provider}/{client.model}"
        return f"model={described!r}, completion_args={self.completion_args}"


def _checked(client: Any, which: str) -> ChatCompletionModel:
    if not isinstance(client, ChatCompletionModel):
        raise TypeError(
            f"ChatCompletion: argument '{which}_model_client' must be a ChatCompletionModel, got "
            f"{type(client).__name__}"
        )
    return client

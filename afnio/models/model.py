"""The one protocol every model client speaks: :class:`ChatCompletionModel`.

Ops never talk to an SDK directly; they call ``await client.achat(messages, **completion_args)``
and get text back. ``messages`` is a list of ``{"role": "system" | "user" | "assistant",
"content": str}`` dicts.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any

from afnio._runtime import run

__all__ = ["ChatCompletionModel", "client_from_config", "client_to_config"]


class ChatCompletionModel(abc.ABC):
    """Base class of chat-completion clients.

    Subclasses implement :meth:`achat`; :meth:`chat` is its synchronous twin. Every request
    records usage (tokens and USD cost) on the client and in the run-wide tracker.

    Attributes:
        provider: The provider name, e.g. ``"openai"``, ``"anthropic"``, ``"local"``.
        model: The model name sent to the provider.
    """

    provider: str = ""
    model: str = ""

    @abc.abstractmethod
    async def achat(self, messages: list[dict[str, Any]], **completion_args: Any) -> str:
        """Send one chat request and return the reply text."""

    def chat(self, messages: list[dict[str, Any]], **completion_args: Any) -> str:
        """Synchronous twin of :meth:`achat` (safe from Jupyter and from threads)."""
        return run(self.achat(messages, **completion_args))

    def get_config(self) -> dict[str, Any]:
        """The JSON-safe constructor arguments of this client — never an API key."""
        return {"model": self.model}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ChatCompletionModel:
        """Rebuild a client from :meth:`get_config` output (keys come from the environment)."""
        return cls(**config)


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

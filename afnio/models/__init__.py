"""Model clients: one protocol (:class:`ChatCompletionModel`) over every provider.

Build a client from a path with :func:`get_client` (``"openai/gpt-4.1-nano"``,
``"anthropic/claude-haiku-4-5"``, ``"local/smollm2"``,
``"openai-compatible/<model>@<base_url>"``; several comma-separated URLs make an
:class:`EndpointPool`) or from its class. Every client shares the request
pipeline of :class:`ChatCompletionModel`: response cache, budget, concurrency and rate limits,
retries, usage/cost accounting (:func:`get_usage`, :func:`track_usage`), and a check that each
request fits the model's context window (:class:`ContextWindowError`).

The SDK client classes (``OpenAI``, ``AsyncOpenAI``, ``Anthropic``, ``AsyncAnthropic``,
``LocalModel``, ``EndpointPool``) are imported on first access, so ``import afnio`` doesn't load
the SDKs.
"""

from __future__ import annotations

import importlib
from typing import Any

from afnio.models.cache import CACHE_MODES, ResponseCache
from afnio.models.context_windows import DEFAULT_CONTEXT_WINDOW, context_window_for
from afnio.models.errors import (
    BudgetExceededError,
    CacheMissError,
    ContextWindowError,
    InvalidRequestError,
    MalformedReplyError,
    ModelError,
    StructuredOutputUnsupportedError,
    TransientError,
)
from afnio.models.model import (
    DEFAULT_OUTPUT_RESERVE,
    ChatCompletionModel,
    Completion,
    client_from_config,
    client_to_config,
    register_client_class,
)
from afnio.models.options import PipelineOptions
from afnio.models.pricing import cost_usd, price_for, set_price
from afnio.models.registry import (
    get_backward_model_client,
    get_backward_model_completion_args,
    get_client,
    set_backward_model_client,
)
from afnio.models.tokens import count_message_tokens, count_tokens
from afnio.models.usage import Usage, get_usage, reset_usage, track_usage

_LAZY_CLIENTS = {
    "OpenAI": "afnio.models.openai",
    "AsyncOpenAI": "afnio.models.openai",
    "Anthropic": "afnio.models.anthropic",
    "AsyncAnthropic": "afnio.models.anthropic",
    "LocalModel": "afnio.models.local",
    "EndpointPool": "afnio.models.pool",
    "PoolEndpoint": "afnio.models.pool",
}

__all__ = [
    "CACHE_MODES",
    "DEFAULT_CONTEXT_WINDOW",
    "DEFAULT_OUTPUT_RESERVE",
    "BudgetExceededError",
    "CacheMissError",
    "ChatCompletionModel",
    "Completion",
    "ContextWindowError",
    "InvalidRequestError",
    "MalformedReplyError",
    "ModelError",
    "PipelineOptions",
    "ResponseCache",
    "StructuredOutputUnsupportedError",
    "TransientError",
    "Usage",
    "client_from_config",
    "client_to_config",
    "context_window_for",
    "cost_usd",
    "count_message_tokens",
    "count_tokens",
    "get_backward_model_client",
    "get_backward_model_completion_args",
    "get_client",
    "get_usage",
    "price_for",
    "register_client_class",
    "reset_usage",
    "set_backward_model_client",
    "set_price",
    "track_usage",
    *_LAZY_CLIENTS,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLIENTS:
        return getattr(importlib.import_module(_LAZY_CLIENTS[name]), name)
    raise AttributeError(f"module 'afnio.models' has no attribute {name!r}")

"""USD prices of models, from ``model_prices.json``.

Prices are USD per million tokens. A dated snapshot or ``-latest`` alias is priced as its base
model (``"gpt-4.1-nano-2025-04-14"`` → ``"gpt-4.1-nano"``,
``"claude-sonnet-4-20250514"`` → ``"claude-sonnet-4"``) unless the file lists it itself. A model
that isn't listed costs 0, with a warning the first time it is seen; models of the ``local`` and
``scripted`` providers are free and never warn. Add or override a price with :func:`set_price`.

Example:
    >>> cost_usd("openai", "gpt-4.1-nano-2025-04-14", prompt_tokens=1_000_000, completion_tokens=0)
    0.1
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from dataclasses import dataclass
from importlib import resources

__all__ = ["FREE_PROVIDERS", "ModelPrice", "cost_usd", "price_for", "set_price"]

FREE_PROVIDERS = frozenset({"local", "scripted"})
"""Providers whose models run on your own machine and cost nothing."""

_SNAPSHOT_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens of one model.

    Attributes:
        input: Uncached prompt tokens.
        output: Completion tokens.
        cached_input: Prompt tokens read from the provider's prompt cache.
        cache_write: Prompt tokens written to the provider's prompt cache (Anthropic).
    """

    input: float
    output: float
    cached_input: float
    cache_write: float


_lock = threading.Lock()
_prices: dict[str, ModelPrice] | None = None
_warned: set[tuple[str, str]] = set()


def _load() -> dict[str, ModelPrice]:
    global _prices
    with _lock:
        if _prices is None:
            text = resources.files("afnio.models").joinpath("model_prices.json").read_text()
            _prices = {
                name: ModelPrice(
                    input=row["input"],
                    output=row["output"],
                    cached_input=row.get("cached_input", row["input"]),
                    cache_write=row.get("cache_write", row["input"]),
                )
                for name, row in json.loads(text)["models"].items()
            }
        return _prices


def price_for(model: str) -> ModelPrice | None:
    """The price of ``model`` (or of the base model of a dated snapshot), or None if unlisted.

    Example:
        >>> price_for("claude-3-5-haiku-20241022").output
        4.0
    """
    prices = _load()
    if model in prices:
        return prices[model]
    return prices.get(_SNAPSHOT_SUFFIX.sub("", model))


def set_price(
    model: str,
    *,
    input: float,
    output: float,
    cached_input: float | None = None,
    cache_write: float | None = None,
) -> None:
    """Add or replace the price of ``model`` (USD per million tokens) for this process.

    Args:
        model: The model name as the client sends it (or its undated base name).
        input: Price of uncached prompt tokens.
        output: Price of completion tokens.
        cached_input: Price of cache-read prompt tokens (default: ``input``).
        cache_write: Price of cache-write prompt tokens (default: ``input``).

    Raises:
        ValueError: If a price is negative.

    Example:
        >>> set_price("my-finetune", input=1.0, output=2.0)
        >>> cost_usd("openai", "my-finetune", prompt_tokens=500_000, completion_tokens=500_000)
        1.5
    """
    price = ModelPrice(
        input=input,
        output=output,
        cached_input=input if cached_input is None else cached_input,
        cache_write=input if cache_write is None else cache_write,
    )
    for field_name, value in vars(price).items():
        if value < 0:
            raise ValueError(f"set_price: {field_name} price of {model!r} is negative ({value})")
    prices = _load()
    with _lock:
        prices[model] = price


def cost_usd(
    provider: str,
    model: str,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> float:
    """What one request cost, in US dollars.

    Args:
        provider: The client's provider (``local`` and ``scripted`` are free).
        model: The model name the request went to.
        prompt_tokens: All prompt tokens, cached and cache-write ones included.
        completion_tokens: Completion tokens.
        cached_tokens: Prompt tokens read from the provider's cache.
        cache_write_tokens: Prompt tokens written to the provider's cache.

    Returns:
        The cost; 0 for a free provider or an unlisted model (which warns once).
    """
    if provider in FREE_PROVIDERS:
        return 0.0
    price = price_for(model)
    if price is None:
        with _lock:
            first_time = (provider, model) not in _warned
            _warned.add((provider, model))
        if first_time:
            warnings.warn(
                f"no price known for {provider} model {model!r}: its requests are counted as "
                f"costing $0 (add one with afnio.models.pricing.set_price)",
                UserWarning,
                stacklevel=2,
            )
        return 0.0
    uncached = max(prompt_tokens - cached_tokens - cache_write_tokens, 0)
    total = (
        uncached * price.input
        + cached_tokens * price.cached_input
        + cache_write_tokens * price.cache_write
        + completion_tokens * price.output
    )
    return total / 1_000_000

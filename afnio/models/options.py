"""The request-pipeline options every model client accepts, declared once.

:class:`PipelineOptions` is the single declaration of those options, their defaults and their
checks. :class:`~afnio.models.model.ChatCompletionModel` builds one from its keyword arguments,
:class:`~afnio.models.limits.Limits` reads its limits from it, and ``get_config`` saves the
options that differ from their defaults.

Example:
    >>> options = PipelineOptions(max_concurrency=4, budget_tokens=10_000)
    >>> options.max_retries, options.non_defaults()
    (8, {'max_concurrency': 4, 'budget_tokens': 10000})
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from afnio.models.cache import ResponseCache

__all__ = ["PipelineOptions"]


@dataclass(frozen=True)
class PipelineOptions:
    """Options of the request pipeline shared by every client, with their defaults.

    Attributes:
        max_concurrency: Requests of this client in flight at once, across every thread and
            event loop of the process; ``None`` = no cap.
        requests_per_minute: Pace requests to this rate; ``None`` = no pacing.
        tokens_per_minute: Pace tokens (the estimate, corrected by actual usage) to this rate.
        max_retries: Retries of a request failing with a transient error (429, 5xx, timeouts,
            dropped connections, malformed replies). 8 retries keep a 64-sample training step
            alive through 30 % injected faults (see ``benchmarks/fault_tolerance.py``).
        retry_base_delay: Backoff before the first retry, in seconds (doubles, jittered).
        retry_max_delay: Longest backoff between retries (a ``Retry-After`` may ask longer).
        budget_usd: Refuse a request (before sending) whose estimated cost would take this
            client's spending past this many dollars.
        budget_tokens: Refuse a request whose estimated tokens would take this client past
            this many tokens.
        context_window: The model's context window in tokens; ``None`` finds it (see
            :attr:`~afnio.models.model.ChatCompletionModel.context_window`).
        cache: A :class:`~afnio.models.cache.ResponseCache`, or ``None`` for no cache.

    Raises:
        TypeError: If an option has the wrong type.
        ValueError: If an option is out of range.
    """

    max_concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_retries: int = 8
    retry_base_delay: float = 0.5
    retry_max_delay: float = 30.0
    budget_usd: float | None = None
    budget_tokens: int | None = None
    context_window: int | None = None
    cache: ResponseCache | None = None

    def __post_init__(self) -> None:
        _check("max_concurrency", self.max_concurrency, int, minimum=1)
        _check("requests_per_minute", self.requests_per_minute, float, above=0)
        _check("tokens_per_minute", self.tokens_per_minute, float, above=0)
        _check("max_retries", self.max_retries, int, minimum=0, optional=False)
        _check("retry_base_delay", self.retry_base_delay, float, minimum=0, optional=False)
        _check("retry_max_delay", self.retry_max_delay, float, minimum=0, optional=False)
        _check("budget_usd", self.budget_usd, float, minimum=0)
        _check("budget_tokens", self.budget_tokens, int, minimum=0)
        _check("context_window", self.context_window, int, minimum=1)
        if self.cache is not None and not isinstance(self.cache, ResponseCache):
            raise TypeError(
                f"model client option cache must be a ResponseCache or None, "
                f"got {type(self.cache).__name__}"
            )

    @classmethod
    def from_kwargs(cls, who: str, options: Mapping[str, Any]) -> PipelineOptions:
        """Build the options from a client's keyword arguments, refusing unknown names.

        Args:
            who: The client class, for the error message.
            options: The keyword arguments.

        Raises:
            TypeError: If a name is not an option (the message suggests the closest one), or a
                value has the wrong type.
            ValueError: If a value is out of range.

        Example:
            >>> PipelineOptions.from_kwargs("Demo", {"max_retry": 2})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            TypeError: Demo got an unexpected keyword argument 'max_retry' (did you mean ...
        """
        names = [f.name for f in fields(cls)]
        for name in options:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else (
                    f"; the pipeline options are {', '.join(names)}")
                raise TypeError(f"{who} got an unexpected keyword argument {name!r}{hint}")
        return cls(**options)

    def non_defaults(self) -> dict[str, Any]:
        """The options that differ from their defaults, JSON-safe (the cache as its config)."""
        changed: dict[str, Any] = {}
        for option in fields(self):
            value = getattr(self, option.name)
            if value != option.default:
                changed[option.name] = value.get_config() if option.name == "cache" else value
        return changed


def _check(
    name: str,
    value: Any,
    kind: type,
    *,
    minimum: float | None = None,
    above: float | None = None,
    optional: bool = True,
) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        expected = "an int" if kind is int else "a number"
        raise TypeError(f"model client option {name} must be {expected}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"model client option {name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"model client option {name} must be >= {minimum}, got {value!r}")
    if above is not None and value <= above:
        raise ValueError(f"model client option {name} must be > {above}, got {value!r}")

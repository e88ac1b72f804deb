"""Request limits a client enforces on itself: concurrency, pacing, retries and budgets.

:class:`Limits` bundles them for one client; the request pipeline of
:class:`~afnio.models.model.ChatCompletionModel` sends every attempt through
:meth:`Limits.call`. The pieces are usable on their own:

- :class:`ConcurrencyLimit`: at most ``n`` requests in flight (per running event loop, because
  asyncio semaphores belong to one loop).
- :class:`RateLimit`: pacing to a number of requests or tokens per minute (thread-safe and
  loop-independent: it only computes how long to sleep).
- :func:`backoff_delay`: jittered exponential backoff that honours ``Retry-After``.
- :class:`Budget`: refuses a request before it is sent once the USD or token budget is spent.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from afnio.models.errors import BudgetExceededError, TransientError
from afnio.models.usage import Usage

__all__ = ["Budget", "ConcurrencyLimit", "Limits", "RateLimit", "backoff_delay"]

T = TypeVar("T")


class ConcurrencyLimit:
    """At most ``max_concurrency`` requests in flight at once, on each running event loop.

    Args:
        max_concurrency: The cap; ``None`` means no cap.

    Example:
        >>> limit = ConcurrencyLimit(2)
        >>> async def one():
        ...     async with limit.slot():
        ...         return "done"
        >>> asyncio.run(one())
        'done'
    """

    def __init__(self, max_concurrency: int | None) -> None:
        self.max_concurrency = max_concurrency
        self._lock = threading.Lock()
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
        self._semaphores = weakref.WeakKeyDictionary()

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        with self._lock:
            semaphore = self._semaphores.get(loop)
            if semaphore is None:
                semaphore = asyncio.Semaphore(self.max_concurrency)
                self._semaphores[loop] = semaphore
            return semaphore

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the slots for the duration of the block (waits while all are taken)."""
        if self.max_concurrency is None:
            yield
            return
        async with self._semaphore():
            yield


class RateLimit:
    """Paces spending of some unit (requests or tokens) to ``per_minute`` on average.

    A token bucket holding one second's worth (at least one unit): a reservation takes from the
    bucket and, when that leaves it in debt, the caller must wait until the debt is repaid. So
    consecutive callers are spaced out in the order they reserved, and one request larger than
    the bucket still goes through after a proportionate wait.

    Args:
        per_minute: The average rate allowed.
        clock: A monotonic clock in seconds (replaceable in tests).

    Example:
        >>> now = [0.0]
        >>> limit = RateLimit(60, clock=lambda: now[0])
        >>> limit.reserve(1), limit.reserve(1), limit.reserve(1)
        (0.0, 1.0, 2.0)
    """

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._per_second = per_minute / 60
        self._capacity = max(self._per_second, 1.0)
        self._clock = clock
        self._lock = threading.Lock()
        self._level = self._capacity
        self._updated = clock()

    def reserve(self, amount: float) -> float:
        """Take ``amount`` units now; return how many seconds to wait before using them."""
        with self._lock:
            now = self._clock()
            refill = (now - self._updated) * self._per_second
            self._level = min(self._capacity, self._level + refill)
            self._updated = now
            self._level -= amount
            return max(0.0, -self._level / self._per_second)

    def adjust(self, amount: float) -> None:
        """Correct an earlier reservation by ``amount`` units (negative gives units back)."""
        with self._lock:
            self._level = min(self._capacity, self._level - amount)


def backoff_delay(
    attempt: int,
    *,
    base: float = 0.5,
    cap: float = 30.0,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt + 1``.

    Without ``retry_after``: ``base * 2**attempt`` capped at ``cap``, jittered to between half
    and all of it (so clients that failed together don't retry together). With ``retry_after``
    (the provider's ``Retry-After``): at least that long, plus up to 10% jitter.

    Args:
        attempt: How many attempts already failed, minus one (0 for the first retry).
        base: Delay of the first retry before jitter.
        cap: Longest delay before jitter.
        retry_after: Seconds the provider asked for, if it did.
        rng: Source of jitter (default: the ``random`` module).

    Example:
        >>> 0.25 <= backoff_delay(0, base=0.5) <= 0.5
        True
        >>> 2.0 <= backoff_delay(3, retry_after=2.0) <= 2.2
        True
    """
    uniform = (rng or random).uniform
    if retry_after is not None:
        wait = max(retry_after, 0.0)
        return wait * uniform(1.0, 1.1)
    delay = min(cap, base * 2**attempt)
    return uniform(delay / 2, delay)


class Budget:
    """A spending cap in US dollars and/or tokens.

    Args:
        usd: Dollars that may be spent; ``None`` for no dollar cap.
        tokens: Prompt plus completion tokens that may be used; ``None`` for no token cap.

    Example:
        >>> Budget(usd=1.0).check(Usage(cost_usd=0.5), client="ScriptedModel(model='m')")
        >>> Budget(tokens=10).check(Usage(prompt_tokens=10), client="m")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        afnio.models.errors.BudgetExceededError: m: token budget of 10 is spent (10 tokens ...
    """

    def __init__(self, usd: float | None = None, tokens: int | None = None) -> None:
        self.usd = usd
        self.tokens = tokens

    def check(self, spent: Usage, *, client: object) -> None:
        """Raise :class:`BudgetExceededError` if ``spent`` has used up the budget.

        Args:
            spent: What the client has used so far.
            client: The client (or its name), shown with ``str()`` in the error.
        """
        if self.usd is not None and spent.cost_usd >= self.usd:
            raise BudgetExceededError(
                f"{client}: USD budget of ${self.usd:g} is spent (${spent.cost_usd:.6g} used); "
                f"request refused before sending"
            )
        if self.tokens is not None and spent.total_tokens >= self.tokens:
            raise BudgetExceededError(
                f"{client}: token budget of {self.tokens} is spent ({spent.total_tokens} tokens "
                f"used); request refused before sending"
            )


def _check_option(
    name: str, value: Any, kind: type, minimum: float, allow_none: bool,
    strictly_positive: bool = False,
) -> None:
    if value is None and allow_none:
        return
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise TypeError(f"model client option {name} must be an int, got {value!r}")
    if not numeric:
        raise TypeError(f"model client option {name} must be a number, got {value!r}")
    if value <= minimum if strictly_positive else value < minimum:
        bound = f"> {minimum}" if strictly_positive else f">= {minimum}"
        raise ValueError(f"model client option {name} must be {bound}, got {value!r}")


class Limits:
    """Everything that gates a client's requests, in one place.

    Args:
        max_concurrency: Requests in flight at once (per event loop); ``None`` = no cap.
        requests_per_minute: Pace requests to this rate; ``None`` = no pacing.
        tokens_per_minute: Pace prompt + completion tokens to this rate; ``None`` = no pacing.
        max_retries: Retries of a request that failed with a :class:`TransientError`.
        retry_base_delay: Delay before the first retry (doubling each retry, jittered).
        retry_max_delay: Longest backoff between retries (``Retry-After`` may ask for longer).
        budget_usd: Refuse requests once this many dollars are spent; ``None`` = no cap.
        budget_tokens: Refuse requests once this many tokens are used; ``None`` = no cap.

    Raises:
        TypeError, ValueError: If an option has the wrong type or is out of range.
    """

    def __init__(
        self,
        *,
        max_concurrency: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_retries: int = 3,
        retry_base_delay: float = 0.5,
        retry_max_delay: float = 30.0,
        budget_usd: float | None = None,
        budget_tokens: int | None = None,
    ) -> None:
        _check_option("max_concurrency", max_concurrency, int, 1, True)
        _check_option("requests_per_minute", requests_per_minute, float, 0, True, True)
        _check_option("tokens_per_minute", tokens_per_minute, float, 0, True, True)
        _check_option("max_retries", max_retries, int, 0, False)
        _check_option("retry_base_delay", retry_base_delay, float, 0, False)
        _check_option("retry_max_delay", retry_max_delay, float, 0, False)
        _check_option("budget_usd", budget_usd, float, 0, True)
        _check_option("budget_tokens", budget_tokens, int, 0, True)
        self.max_concurrency = max_concurrency
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.max_retries = max_retries
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self.budget = Budget(usd=budget_usd, tokens=budget_tokens)
        self.concurrency = ConcurrencyLimit(max_concurrency)
        self.request_rate = None if requests_per_minute is None else RateLimit(requests_per_minute)
        self.token_rate = None if tokens_per_minute is None else RateLimit(tokens_per_minute)

    def get_config(self) -> dict[str, Any]:
        """The options that differ from their defaults (JSON-safe)."""
        options = {
            "max_concurrency": (self.max_concurrency, None),
            "requests_per_minute": (self.requests_per_minute, None),
            "tokens_per_minute": (self.tokens_per_minute, None),
            "max_retries": (self.max_retries, 3),
            "retry_base_delay": (self.retry_base_delay, 0.5),
            "retry_max_delay": (self.retry_max_delay, 30.0),
            "budget_usd": (self.budget.usd, None),
            "budget_tokens": (self.budget.tokens, None),
        }
        return {name: value for name, (value, default) in options.items() if value != default}

    async def _pace(self, estimated_tokens: int) -> None:
        delay = 0.0
        if self.request_rate is not None:
            delay = max(delay, self.request_rate.reserve(1))
        if self.token_rate is not None:
            delay = max(delay, self.token_rate.reserve(estimated_tokens))
        if delay > 0:
            await asyncio.sleep(delay)

    async def call(
        self,
        send: Callable[[], Awaitable[T]],
        *,
        estimated_tokens: int,
        spent: Callable[[], Usage],
        client: object,
        on_retry: Callable[[int, TransientError, float], None] | None = None,
    ) -> T:
        """Run ``send`` under the limits, retrying transient failures.

        Before each attempt the budget is checked (after waiting for a slot and for pacing, so
        requests that queued while the budget ran out are refused too).

        Args:
            send: Makes one attempt.
            estimated_tokens: Tokens the request is expected to use, for token pacing.
            spent: Returns what the client has used so far, for the budget.
            client: The client (or its name), shown with ``str()`` in errors.
            on_retry: Called with (attempt number, error, delay) before each backoff sleep.

        Returns:
            What ``send`` returned.

        Raises:
            BudgetExceededError: If the budget is spent (nothing is sent).
            TransientError: The last failure, once ``max_retries`` retries failed too.
        """
        capped = self.budget.usd is not None or self.budget.tokens is not None
        if capped:
            self.budget.check(spent(), client=client)
        attempt = 0
        while True:
            async with self.concurrency.slot():
                await self._pace(estimated_tokens)
                if capped:
                    self.budget.check(spent(), client=client)
                try:
                    return await send()
                except TransientError as error:
                    if attempt >= self.max_retries:
                        raise
                    delay = backoff_delay(
                        attempt,
                        base=self.retry_base_delay,
                        cap=self.retry_max_delay,
                        retry_after=error.retry_after,
                    )
                    if on_retry is not None:
                        on_retry(attempt + 1, error, delay)
            attempt += 1
            await asyncio.sleep(delay)

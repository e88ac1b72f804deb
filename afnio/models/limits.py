"""Request limits a client enforces on itself: concurrency, pacing, retries and budgets.

:class:`Limits` bundles them for one client; the request pipeline of
:class:`~afnio.models.model.ChatCompletionModel` sends every attempt through
:meth:`Limits.call`. The pieces are usable on their own:

- :class:`ConcurrencyLimit`: at most ``n`` requests in flight, process-wide (any thread, any
  event loop).
- :class:`RateLimit`: pacing to a number of requests or tokens per minute (thread-safe and
  loop-independent: it only computes how long to sleep).
- :func:`backoff_delay`: jittered exponential backoff that honours ``Retry-After``.
- :class:`Budget`: refuses a request before it is sent when its :class:`Estimate` would take
  the spending (plus what requests in flight reserved) past the USD or token budget.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from afnio.models.errors import BudgetExceededError, TransientError
from afnio.models.options import PipelineOptions
from afnio.models.usage import Usage

__all__ = ["Budget", "ConcurrencyLimit", "Estimate", "Limits", "RateLimit", "backoff_delay"]

T = TypeVar("T")


class ConcurrencyLimit:
    """At most ``max_concurrency`` requests in flight at once, across the whole process.

    One cap per client per process: requests awaited on afnio's runtime loop, on a private
    ``asyncio.run`` loop and on other threads' loops all share the same slots. The count is kept
    under a thread lock; a request that finds every slot taken waits on a future of its own
    loop, which the request releasing a slot completes (thread-safely, on that loop). Waiters
    are served first come, first served; one cancelled while waiting gives its turn on.

    Args:
        max_concurrency: The cap; ``None`` means no cap.

    Example:
        >>> limit = ConcurrencyLimit(2)
        >>> async def one():
        ...     async with limit.slot():
        ...         return limit.in_use
        >>> asyncio.run(one())
        1
    """

    def __init__(self, max_concurrency: int | None) -> None:
        self.max_concurrency = max_concurrency
        self._lock = threading.Lock()
        self._in_use = 0
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        """Slots held right now."""
        with self._lock:
            return self._in_use

    async def _acquire(self) -> None:
        assert self.max_concurrency is not None
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._in_use < self.max_concurrency and not self._waiters:
                self._in_use += 1
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            with self._lock:
                try:
                    self._waiters.remove((loop, waiter))
                    queued = True
                except ValueError:
                    queued = False  # a releaser already passed its slot to this waiter
            if not queued and waiter.done() and not waiter.cancelled():
                # The slot arrived, then the task was cancelled before it resumed: give it back.
                # (A slot still on its way finds the waiter cancelled and passes itself on.)
                self._release()
            raise

    def _release(self) -> None:
        with self._lock:
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                try:
                    # The slot passes straight to the waiter: _in_use stays the same.
                    loop.call_soon_threadsafe(_hand_over, waiter, self)
                    return
                except RuntimeError:  # its loop is closed: that waiter is gone
                    continue
            self._in_use -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the slots for the duration of the block (waits while all are taken)."""
        if self.max_concurrency is None:
            yield
            return
        await self._acquire()
        try:
            yield
        finally:
            self._release()


def _hand_over(waiter: asyncio.Future[None], limit: ConcurrencyLimit) -> None:
    """On the waiter's loop: give it the slot, or pass the slot on if it was cancelled."""
    if waiter.cancelled():
        limit._release()
    else:
        waiter.set_result(None)


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


@dataclass(frozen=True)
class Estimate:
    """What a request is expected to cost, before it is sent.

    Attributes:
        prompt_tokens: The prompt's tokens, counted offline.
        reply_tokens: The output reserve (the request's ``max_tokens`` or the client's cap).
        usd: The prompt at the input price plus the reserve at the output price.
    """

    prompt_tokens: int
    reply_tokens: int
    usd: float = 0.0

    @property
    def tokens(self) -> int:
        """Prompt plus reply tokens."""
        return self.prompt_tokens + self.reply_tokens


class Budget:
    """A spending cap in US dollars and/or tokens that refuses requests before they are sent.

    Each request first reserves its :class:`Estimate` (:meth:`reserve`): it is refused when what
    was spent, plus what requests in flight reserved, plus its own estimate would pass the cap.
    So a batch of concurrent requests can't overshoot together. The reservation is held until
    the request's real usage is recorded, then given back (:meth:`release`).

    Args:
        usd: Dollars that may be spent; ``None`` for no dollar cap.
        tokens: Prompt plus completion tokens that may be used; ``None`` for no token cap.

    Example:
        >>> budget = Budget(tokens=100)
        >>> budget.reserve(Usage(), Estimate(14, 64), client="m")
        >>> budget.reserve(Usage(), Estimate(14, 64), client="m")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        afnio.models.errors.BudgetExceededError: m: the token budget of 100 would be passed...
    """

    def __init__(self, usd: float | None = None, tokens: int | None = None) -> None:
        self.usd = usd
        self.tokens = tokens
        self._lock = threading.Lock()
        self._reserved_tokens = 0
        self._reserved_usd = 0.0

    @property
    def capped(self) -> bool:
        """Whether there is any cap."""
        return self.usd is not None or self.tokens is not None

    @property
    def reserved(self) -> tuple[int, float]:
        """``(tokens, usd)`` reserved by requests not yet finished."""
        with self._lock:
            return self._reserved_tokens, self._reserved_usd

    def _refusal(self, spent: Usage, estimate: Estimate | None, client: object) -> str | None:
        request = (
            f" + {estimate.tokens} estimated for this request ({estimate.prompt_tokens} of "
            f"prompt + up to {estimate.reply_tokens} of reply)" if estimate else ""
        )
        extra_tokens = estimate.tokens if estimate else 0
        if self.tokens is not None:
            total = spent.total_tokens + self._reserved_tokens + extra_tokens
            if total > self.tokens:
                return (
                    f"{client}: the token budget of {self.tokens} would be passed: "
                    f"{spent.total_tokens} used + {self._reserved_tokens} reserved by requests "
                    f"in flight{request} = {total}; request refused before sending"
                )
        extra_usd = estimate.usd if estimate else 0.0
        if self.usd is not None:
            total_usd = spent.cost_usd + self._reserved_usd + extra_usd
            if total_usd > self.usd:
                estimated = f" + ${extra_usd:.6g} estimated for this request" if estimate else ""
                return (
                    f"{client}: the USD budget of ${self.usd:g} would be passed: "
                    f"${spent.cost_usd:.6g} spent + ${self._reserved_usd:.6g} reserved by "
                    f"requests in flight{estimated}; request refused before sending"
                )
        return None

    def reserve(self, spent: Usage, estimate: Estimate, *, client: object) -> None:
        """Reserve ``estimate`` for a request, or refuse it.

        Args:
            spent: What the client has used so far.
            estimate: The request's estimate.
            client: The client (or its name), shown with ``str()`` in the error.

        Raises:
            BudgetExceededError: If ``spent`` + reservations + ``estimate`` pass a cap (nothing
                is reserved then).
        """
        with self._lock:
            refusal = self._refusal(spent, estimate, client)
            if refusal is not None:
                raise BudgetExceededError(refusal)
            self._reserved_tokens += estimate.tokens
            self._reserved_usd += estimate.usd

    def check(self, spent: Usage, *, client: object) -> None:
        """Refuse to go on if what was spent plus every reservation already passes a cap.

        Called before each attempt of a reserved request: requests that finished meanwhile
        may have used more than they reserved.

        Raises:
            BudgetExceededError: If a cap is passed.
        """
        with self._lock:
            refusal = self._refusal(spent, None, client)
        if refusal is not None:
            raise BudgetExceededError(refusal)

    def release(self, estimate: Estimate) -> None:
        """Give back a reservation (after the request's real usage was recorded, or it failed)."""
        with self._lock:
            self._reserved_tokens -= estimate.tokens
            self._reserved_usd -= estimate.usd


class Limits:
    """Everything that gates a client's requests, in one place.

    Args:
        options: The client's :class:`~afnio.models.options.PipelineOptions` (only the limit
            options are used here).
        **option_values: Instead of ``options``: the option values themselves, with the
            defaults of :class:`~afnio.models.options.PipelineOptions`.

    Raises:
        TypeError, ValueError: If an option has the wrong type or is out of range.

    Example:
        >>> Limits(max_concurrency=4).concurrency.max_concurrency
        4
    """

    _LIMIT_OPTIONS = (
        "max_concurrency", "requests_per_minute", "tokens_per_minute", "max_retries",
        "retry_base_delay", "retry_max_delay", "budget_usd", "budget_tokens",
    )

    def __init__(self, options: PipelineOptions | None = None, **option_values: Any) -> None:
        if options is None:
            options = PipelineOptions.from_kwargs("Limits", option_values)
        elif option_values:
            raise TypeError("Limits: give options or option values, not both")
        self.options = options
        self.max_concurrency = options.max_concurrency
        self.requests_per_minute = options.requests_per_minute
        self.tokens_per_minute = options.tokens_per_minute
        self.max_retries = options.max_retries
        self.retry_base_delay = options.retry_base_delay
        self.retry_max_delay = options.retry_max_delay
        self.budget = Budget(usd=options.budget_usd, tokens=options.budget_tokens)
        self.concurrency = ConcurrencyLimit(options.max_concurrency)
        self.request_rate = (
            None if options.requests_per_minute is None else RateLimit(options.requests_per_minute)
        )
        self.token_rate = (
            None if options.tokens_per_minute is None else RateLimit(options.tokens_per_minute)
        )

    def get_config(self) -> dict[str, Any]:
        """The limit options that differ from their defaults (JSON-safe)."""
        changed = self.options.non_defaults()
        return {name: changed[name] for name in self._LIMIT_OPTIONS if name in changed}

    @contextmanager
    def reserved(
        self, estimate: Estimate, *, spent: Callable[[], Usage], client: object
    ) -> Iterator[None]:
        """Hold a budget reservation of ``estimate`` for the block (nothing without a budget).

        Record the request's real usage inside the block, so that spending and reservations
        never both miss it.

        Raises:
            BudgetExceededError: If the request would pass the budget (the block doesn't run).
        """
        if not self.budget.capped:
            yield
            return
        self.budget.reserve(spent(), estimate, client=client)
        try:
            yield
        finally:
            self.budget.release(estimate)

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

        Before each attempt (after waiting for a slot and for pacing) the budget is checked
        again: requests that finished meanwhile may have spent more than they reserved.

        Args:
            send: Makes one attempt.
            estimated_tokens: Tokens the request is expected to use, for token pacing.
            spent: Returns what the client has used so far, for the budget.
            client: The client (or its name), shown with ``str()`` in errors.
            on_retry: Called with (attempt number, error, delay) before each backoff sleep.

        Returns:
            What ``send`` returned.

        Raises:
            BudgetExceededError: If the budget is passed (nothing more is sent).
            TransientError: The last failure, once ``max_retries`` retries failed too.
        """
        attempt = 0
        while True:
            async with self.concurrency.slot():
                await self._pace(estimated_tokens)
                if self.budget.capped:
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

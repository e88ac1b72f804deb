"""Turnstile: decide, in a test, the order in which concurrent calls finish.

Ordering bugs hide when calls happen to finish in the order they started. A :class:`Turnstile`
holds every call that reaches it until the whole wave of concurrent calls is waiting, then lets
them through **one at a time** in an order you choose — reversed, rotated, a seeded shuffle, or a
permutation drawn by Hypothesis — each one finishing before the next is let go. No sleeps and no
clock decide anything, so a test that drives a bug with it fails on every run.

A wave is complete when the expected number of calls is waiting (``expected=``, known from the
test's structure: a batch of 8 makes 8 forward calls), or, without ``expected``, when no new call
has arrived while the event loop went round ``settle`` times. That idle rule is deterministic as
long as the calls come from coroutines on one event loop (afnio's runtime loop runs every async
``Function.backward``, ``GradComponent.abackward`` and model request); work done in other threads
(a synchronous ``GradComponent.backward``) needs ``expected``.

Use it with :class:`~afnio.testing.ScriptedModel` by wrapping the reply function
(:meth:`Turnstile.wrap`), or await :meth:`Turnstile.wait` (or ``async with turnstile.turn():``)
inside an async ``Function.backward``.

Example:
    >>> import afnio
    >>> from afnio.autodiff.lm_ops import ChatCompletion
    >>> from afnio.testing import ScriptedModel, Turnstile
    >>> gate = Turnstile("reverse", expected=3)
    >>> model = ScriptedModel(gate.wrap(lambda messages, **kw: messages[-1]["content"] + "!"))
    >>> out = ChatCompletion.apply(model, [{"role": "user", "content": ["{q}"]}],
    ...                            inputs={"q": ["a", "b", "c"]})
    >>> out.data                      # results keep their elements' places...
    ['a!', 'b!', 'c!']
    >>> gate.arrivals, gate.releases  # ...although the last call to arrive finished first
    ([0, 1, 2], [2, 1, 0])
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ORDER_NAMES", "Turnstile", "TurnstileTimeout", "completion_orders"]

ORDER_NAMES = ("reverse", "rotate", "forward")
"""The named orders: last arrival first; second arrival first and the first one last; as they
arrived."""

Order = str | int | Callable[[list[Hashable]], Sequence[int]]


class TurnstileTimeout(RuntimeError):
    """A wave of calls never became complete (fewer calls arrived than ``expected``)."""


@dataclass
class _Ticket:
    key: Hashable
    go: asyncio.Future
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False


class Turnstile:
    """Holds concurrent calls until their wave is complete, then releases them in a chosen order.

    Args:
        order: ``"reverse"``, ``"rotate"`` or ``"forward"`` (see :data:`ORDER_NAMES`); an ``int``
            seed for a seeded shuffle of every wave; or a function ``order(keys) -> permutation``
            that gets the waiting calls' keys in arrival order and returns the indices to release,
            first to last (a Hypothesis-drawn permutation, say).
        expected: How many calls make up each wave: an ``int`` for every wave, or a sequence of
            sizes for the first waves in turn (later waves use the idle rule). ``None``: every
            wave ends when the loop has gone idle.
        settle: Event-loop iterations with no new arrival that end a wave under the idle rule;
            also how many iterations the released call's caller gets to take in its result before
            the next call is released.
        timeout: Seconds to wait for an ``expected`` wave before failing the waiting calls with
            :class:`TurnstileTimeout` (a guard against a wrong count, never part of a result).

    Attributes:
        arrivals: The keys of the calls in the order they reached the turnstile.
        releases: The keys in the order the calls were let through.

    Raises:
        ValueError: For an unknown order name, a negative size or a bad permutation.

    Example:
        >>> import asyncio
        >>> gate = Turnstile("rotate")
        >>> async def job(name, done):
        ...     await gate.wait(name)
        ...     done.append(name)
        >>> async def main():
        ...     done = []
        ...     await asyncio.gather(*(job(name, done) for name in "abcd"))
        ...     return done
        >>> asyncio.run(main())
        ['b', 'c', 'd', 'a']
    """

    def __init__(
        self,
        order: Order = "reverse",
        *,
        expected: int | Sequence[int] | None = None,
        settle: int = 64,
        timeout: float = 60.0,
    ) -> None:
        if isinstance(order, str) and order not in ORDER_NAMES:
            raise ValueError(
                f"Turnstile: unknown order {order!r}; expected one of {', '.join(ORDER_NAMES)}, "
                "an int seed or a function"
            )
        if isinstance(order, bool) or not isinstance(order, (str, int)) and not callable(order):
            raise ValueError(
                f"Turnstile: order must be a name, an int seed or a function, got {order!r}"
            )
        sizes = [] if expected is None else [expected] if isinstance(expected, int) else expected
        sizes = list(sizes)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(f"Turnstile: expected wave sizes must be ints >= 1, got {expected!r}")
        if settle < 1:
            raise ValueError(f"Turnstile: settle must be >= 1, got {settle!r}")
        self.order = order
        self._repeat = isinstance(expected, int)
        self._sizes = sizes
        self.settle = settle
        self.timeout = timeout
        self._random = random.Random(order) if isinstance(order, int) else None
        self.arrivals: list[Hashable] = []
        self.releases: list[Hashable] = []
        self._waiting: list[_Ticket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._releaser: asyncio.Task | None = None

    # ------------------------------------------------------------------ public API
    @property
    def reordered(self) -> bool:
        """Whether some call was released out of its arrival order."""
        return self.releases != self.arrivals[: len(self.releases)]

    async def wait(self, key: Hashable = None) -> None:
        """Block until this call's turn (the call counts as finished once it resumes).

        Args:
            key: Names the call in :attr:`arrivals` and :attr:`releases` (default: its arrival
                number).
        """
        async with self.turn(key):
            pass

    @contextlib.asynccontextmanager
    async def turn(self, key: Hashable = None) -> AsyncIterator[None]:
        """``async with turnstile.turn():`` — enter at this call's turn; the next call is
        released only after the block exits (and ``settle`` more loop iterations)."""
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                "Turnstile: every call must come from the same event loop (this one arrived on "
                "another loop); use one turnstile per loop"
            )
        ticket = _Ticket(len(self.arrivals) if key is None else key, loop.create_future())
        self.arrivals.append(ticket.key)
        self._waiting.append(ticket)
        if self._releaser is None or self._releaser.done():
            self._releaser = loop.create_task(self._release())
        try:
            await ticket.go
            yield
        finally:
            ticket.gone = True
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            ticket.finished.set()

    def wrap(self, reply: Callable[..., Any], key: Callable[..., Hashable] | None = None):
        """An async reply function for :class:`~afnio.testing.ScriptedModel` that passes the
        turnstile, then answers with ``reply`` (sync or async).

        Args:
            reply: ``reply(messages, **completion_args)``.
            key: ``key(messages, **completion_args)`` names each call (default: arrival number).

        Example:
            >>> from afnio.testing import ScriptedModel
            >>> model = ScriptedModel(Turnstile().wrap(lambda messages, **kw: "ok"))
            >>> model.chat([{"role": "user", "content": "hi"}])
            'ok'
        """

        async def gated(messages: list[dict[str, Any]], **completion_args: Any) -> Any:
            name = key(messages, **completion_args) if key is not None else None
            async with self.turn(name):
                result = reply(messages, **completion_args)
                if inspect.isawaitable(result):
                    result = await result
                return result

        return gated

    # ------------------------------------------------------------------ releasing
    def _permutation(self, keys: list[Hashable]) -> list[int]:
        n = len(keys)
        if self.order == "forward":
            return list(range(n))
        if self.order == "reverse":
            return list(range(n - 1, -1, -1))
        if self.order == "rotate":
            return [*range(1, n), 0] if n else []
        if self._random is not None:
            indices = list(range(n))
            self._random.shuffle(indices)
            return indices
        chosen = [int(i) for i in self.order(list(keys))]
        if sorted(chosen) != list(range(n)):
            raise ValueError(
                f"Turnstile: the order function returned {chosen!r} for {n} waiting calls; it "
                f"must return a permutation of range({n})"
            )
        return chosen

    async def _ticks(self, count: int) -> None:
        for _ in range(count):
            await asyncio.sleep(0)

    async def _wave(self) -> bool:
        """Wait until the current wave is complete; False if it timed out (callers failed)."""
        size = self._sizes[0] if self._sizes else None
        if size is not None:
            if not self._repeat:
                self._sizes.pop(0)
            deadline = time.monotonic() + self.timeout
            while len(self._waiting) < size:
                if time.monotonic() > deadline:
                    error = TurnstileTimeout(
                        f"Turnstile: waited {self.timeout} s for a wave of {size} calls; only "
                        f"{len(self._waiting)} arrived (arrivals so far: {self.arrivals!r})"
                    )
                    for ticket in self._waiting:
                        if not ticket.go.done():
                            ticket.go.set_exception(error)
                    self._waiting.clear()
                    return False
                await asyncio.sleep(0)
            return True
        idle, seen = 0, len(self.arrivals)
        while idle < self.settle:
            await asyncio.sleep(0)
            if len(self.arrivals) != seen:
                idle, seen = 0, len(self.arrivals)
            else:
                idle += 1
        return True

    async def _release(self) -> None:
        while self._waiting:
            if not await self._wave():
                continue
            batch = [ticket for ticket in self._waiting if not ticket.gone]
            self._waiting.clear()
            try:
                permutation = self._permutation([ticket.key for ticket in batch])
            except ValueError as exc:  # a bad order function: every waiting call fails with it
                for ticket in batch:
                    if not ticket.go.done():
                        ticket.go.set_exception(exc)
                continue
            for index in permutation:
                ticket = batch[index]
                if ticket.gone or ticket.go.done():
                    continue
                ticket.go.set_result(None)
                self.releases.append(ticket.key)
                await ticket.finished.wait()
                await self._ticks(self.settle)


def completion_orders() -> Any:
    """A Hypothesis strategy of turnstile orders: the named ones, then seeded shuffles.

    Hypothesis must be installed (it is in afnio's ``dev`` extra). Under a derandomized profile
    the named orders are always among the examples, so an order bug is found on every run.

    Example:
        >>> from hypothesis import given
        >>> @given(completion_orders())
        ... def test_something(order):
        ...     Turnstile(order)
    """
    from hypothesis import strategies as st

    return st.one_of(st.sampled_from(ORDER_NAMES), st.integers(0, 2**32 - 1))

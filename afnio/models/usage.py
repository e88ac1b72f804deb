"""Token and cost accounting: per client, run-wide, and for a block of code.

Every request a client completes adds a :class:`Usage` to that client and to the run-wide
tracker. Read the run-wide total with :func:`get_usage`, start it afresh with
:func:`reset_usage`, or measure one block with :func:`track_usage`.

Counting rules:

- ``requests``: requests answered by the provider. Failed attempts that were retried and
  response-cache hits are not requests.
- ``prompt_tokens`` / ``completion_tokens``: tokens of those requests, as the provider billed
  them (``prompt_tokens`` includes any prompt tokens the provider served from its own cache).
- ``cached_tokens``: tokens that were not computed afresh: prompt tokens the provider served
  from its prompt cache, plus every prompt and completion token of afnio response-cache hits.
- ``cost_usd``: the price of those requests (a response-cache hit costs 0).

Example:
    >>> from afnio.testing import ScriptedModel
    >>> with track_usage() as used:
    ...     _ = ScriptedModel(["ok"]).chat([{"role": "user", "content": "hi"}])
    >>> used.requests
    1
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

__all__ = ["Usage", "get_usage", "record_usage", "reset_usage", "track_usage"]


@dataclass
class Usage:
    """Requests, tokens and USD cost; instances add up with ``+`` and ``+=``.

    Attributes:
        requests: Requests answered by the provider.
        prompt_tokens: Input tokens of those requests.
        completion_tokens: Output tokens of those requests.
        cached_tokens: Tokens served from a cache (provider prompt cache or afnio's cache).
        cost_usd: What those requests cost, in US dollars.

    Example:
        >>> Usage(requests=1, prompt_tokens=10) + Usage(requests=2, cost_usd=0.5)
        Usage(requests=3, prompt_tokens=10, completion_tokens=0, cached_tokens=0, cost_usd=0.5)
    """

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        total = Usage(**asdict(self))
        total += other
        return total

    def __iadd__(self, other: Usage) -> Usage:
        # Field by field, spelled out: this runs several times per request.
        if not isinstance(other, Usage):
            return NotImplemented
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.cost_usd += other.cost_usd
        return self

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens sent to and received from the provider."""
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int | float]:
        """The counters as a plain dict (``requests``, ``prompt_tokens``, ..., ``cost_usd``)."""
        return asdict(self)


_lock = threading.Lock()
_total = Usage()
_open_trackers: list[Usage] = []


def record_usage(usage: Usage) -> None:
    """Add ``usage`` to the run-wide total and to every open :func:`track_usage` block.

    Clients call this for you; call it yourself only for spending that bypasses a client.

    Args:
        usage: What one request (or cache hit) used.
    """
    with _lock:
        _total.__iadd__(usage)
        for tracker in _open_trackers:
            tracker.__iadd__(usage)


def get_usage() -> Usage:
    """A snapshot of everything every client used since start-up or :func:`reset_usage`.

    Returns:
        A copy; later requests don't change it.
    """
    with _lock:
        return Usage(**_total.as_dict())


def reset_usage() -> None:
    """Set the run-wide total back to zero (per-client usage and open blocks are unaffected)."""
    global _total
    with _lock:
        _total = Usage()


@contextmanager
def track_usage() -> Iterator[Usage]:
    """Measure what all clients use while the block runs.

    Yields:
        A live :class:`Usage` that grows with every request recorded anywhere in the process
        (any thread, any event loop) until the block exits; then it stays as it was. Blocks may
        nest: each sees what happened inside it.

    Example:
        >>> with track_usage() as used:
        ...     pass
        >>> used.cost_usd
        0.0
    """
    tracker = Usage()
    with _lock:
        _open_trackers.append(tracker)
    try:
        yield tracker
    finally:
        with _lock:
            # By identity: two trackers that counted the same amounts compare equal.
            _open_trackers[:] = [t for t in _open_trackers if t is not tracker]

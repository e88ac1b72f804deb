"""Errors raised by model clients.

Every error a client raises on purpose is a :class:`ModelError`, so callers can catch the whole
family at once and still tell the cases apart.
"""

from __future__ import annotations

__all__ = [
    "StructuredOutputUnsupportedError",
    "BudgetExceededError",
    "CacheMissError",
    "ContextWindowError",
    "ModelError",
    "TransientError",
]


class ModelError(Exception):
    """Base class of the errors raised by afnio's model clients."""


class TransientError(ModelError):
    """A failure worth retrying: rate limited (429), server error (5xx), timeout, cut connection.

    Clients raise it from ``_send``; the request pipeline retries it with jittered exponential
    backoff and re-raises it once the retries are used up.

    Args:
        message: What went wrong.
        status: The HTTP status, when there was one.
        retry_after: Seconds the provider asked us to wait (its ``Retry-After`` header), if any.

    Example:
        >>> err = TransientError("rate limited", status=429, retry_after=2.0)
        >>> err.status, err.retry_after
        (429, 2.0)
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class BudgetExceededError(ModelError):
    """A client's USD or token budget is spent; the request was refused before it was sent."""


class CacheMissError(ModelError):
    """A response cache in ``replay`` mode has no answer for a request (nothing was sent)."""


class ContextWindowError(ModelError):
    """A request does not fit its model's context window; it was refused before sending.

    ``needed`` counts the prompt's tokens plus the output reserved for the reply (the request's
    ``max_tokens``, or the client's default cap); ``available`` is the model's context window.

    Args:
        message: What did not fit, naming who asked (the client, or the op and the variable's
            role) and how to make it fit.
        needed: Tokens the request needs, prompt plus output reserve.
        available: Tokens the model's context window holds.

    Example:
        >>> err = ContextWindowError("prompt too long", needed=5000, available=4096)
        >>> err.needed - err.available
        904
    """

    def __init__(self, message: str, *, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


class StructuredOutputUnsupportedError(ModelError):
    """The backend turned down a structured-output request (a JSON schema); the caller may ask
    again with its tag protocol. Never retried as transient."""

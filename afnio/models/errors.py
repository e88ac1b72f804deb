"""Errors raised by model clients.

Every error a client raises on purpose is a :class:`ModelError`, so callers can catch the whole
family at once and still tell the cases apart.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceededError",
    "CacheMissError",
    "ContextWindowError",
    "InvalidRequestError",
    "MalformedReplyError",
    "ModelError",
    "StructuredOutputUnsupportedError",
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


class MalformedReplyError(TransientError):
    """A reply that can't be read: not UTF-8, not JSON, an HTML page, or missing fields.

    Retried like any transient failure (a proxy's error page or a cut body rarely repeats).
    The message names the endpoint and the HTTP status.

    Args:
        message: What was wrong with the reply, and where it came from.
        status: The HTTP status of the reply (usually 200).
        endpoint: The URL that answered.

    Example:
        >>> err = MalformedReplyError("not JSON", status=200, endpoint="http://h/v1")
        >>> isinstance(err, TransientError), err.endpoint
        (True, 'http://h/v1')
    """

    def __init__(self, message: str, *, status: int | None = None,
                 endpoint: str | None = None) -> None:
        super().__init__(message, status=status)
        self.endpoint = endpoint


class InvalidRequestError(ModelError):
    """The server says the request itself is invalid (HTTP 400/422, or a validation 500).

    Not retried: the same request would fail the same way. The message names the endpoint and,
    when the server said which, the rejected field.

    Args:
        message: The server's explanation, with the endpoint.
        status: The HTTP status.
        field: The rejected request field (e.g. ``"response_format"``), when known.
        endpoint: The URL that answered.

    Example:
        >>> InvalidRequestError("bad", status=400, field="temperature").field
        'temperature'
    """

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None,
                 endpoint: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.endpoint = endpoint


class StructuredOutputUnsupportedError(InvalidRequestError):
    """The backend rejected the structured-output format the client asked for.

    Raised without retrying; the client then stops offering structured outputs (its
    ``structured_output_args`` returns ``None``), so the caller can ask again with its tag
    protocol.

    Example:
        >>> issubclass(StructuredOutputUnsupportedError, ModelError)
        True
    """


class BudgetExceededError(ModelError):
    """A request would pass its client's USD or token budget; it was refused before sending."""


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


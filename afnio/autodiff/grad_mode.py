"""Switches for graph recording: ``no_grad``, ``enable_grad``, ``set_grad_enabled``.

The mode lives in a :class:`contextvars.ContextVar`, so it is isolated per thread *and* per
asyncio task, and it follows a call into the runtime loop. Each switch works as a context
manager and as a decorator (of plain or ``async`` functions); as in torch 2.x, ``no_grad``,
``enable_grad`` and ``inference_mode`` also decorate bare, without parentheses.

Example:
    >>> import afnio
    >>> x = afnio.Variable("hi", requires_grad=True)
    >>> with afnio.no_grad():
    ...     y = x + "!"
    >>> y.requires_grad
    False
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["enable_grad", "inference_mode", "is_grad_enabled", "no_grad", "set_grad_enabled"]

F = TypeVar("F", bound=Callable[..., Any])

_grad_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "afnio_grad_enabled", default=True
)


def is_grad_enabled() -> bool:
    """Return True when operations currently record a graph."""
    return _grad_enabled.get()


class _GradMode:
    """Base for the switches: a re-entrant context manager that is also a decorator.

    ``enabled=None`` leaves the current mode as it is.
    """

    def __init__(self, enabled: bool | None) -> None:
        self._enabled = enabled
        self._tokens: list[contextvars.Token | None] = []

    def __enter__(self) -> None:
        self._tokens.append(None if self._enabled is None else _grad_enabled.set(self._enabled))

    def __exit__(self, *exc: object) -> None:
        token = self._tokens.pop()
        if token is not None:
            _grad_enabled.reset(token)

    def __call__(self, func: F) -> F:
        enabled = self._enabled
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with _GradMode(enabled):
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with _GradMode(enabled):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


def _decorate_bare(cls: type[_GradMode], func: Any, expected: str = "no argument") -> Any:
    """``@cls`` without parentheses: decorate ``func`` with a fresh ``cls()``."""
    if not callable(func):
        raise TypeError(
            f"{cls.__name__}: expected {expected} or a function to decorate, "
            f"got {type(func).__name__}"
        )
    return cls()(func)


class no_grad(_GradMode):  # noqa: N801 - torch's spelling
    """Disable graph recording inside a block or a decorated function.

    Usable as ``with no_grad():``, ``@no_grad()`` or bare ``@no_grad``.

    Args:
        orig_func: Set only by the bare decorator form: the function being decorated.

    Example:
        >>> import afnio
        >>> @afnio.no_grad
        ... def evaluate():
        ...     return afnio.is_grad_enabled()
        >>> evaluate()
        False
    """

    def __new__(cls, orig_func: Callable[..., Any] | None = None) -> Any:
        if orig_func is None:
            return super().__new__(cls)
        return _decorate_bare(cls, orig_func)

    def __init__(self, orig_func: Callable[..., Any] | None = None) -> None:
        super().__init__(False)


class enable_grad(_GradMode):  # noqa: N801
    """Enable graph recording inside a block, even within ``no_grad``.

    Usable as ``with enable_grad():``, ``@enable_grad()`` or bare ``@enable_grad``.

    Args:
        orig_func: Set only by the bare decorator form: the function being decorated.

    Example:
        >>> import afnio
        >>> with afnio.no_grad():
        ...     with afnio.enable_grad():
        ...         afnio.is_grad_enabled()
        True
    """

    def __new__(cls, orig_func: Callable[..., Any] | None = None) -> Any:
        if orig_func is None:
            return super().__new__(cls)
        return _decorate_bare(cls, orig_func)

    def __init__(self, orig_func: Callable[..., Any] | None = None) -> None:
        super().__init__(True)


class set_grad_enabled(_GradMode):  # noqa: N801
    """Set graph recording on or off.

    Like ``torch.set_grad_enabled``: called as a function it applies at once (for the current
    thread or task); used as a context manager or decorator, the previous mode comes back on exit.

    Args:
        mode: ``True`` to record, ``False`` not to.

    Example:
        >>> import afnio
        >>> with afnio.set_grad_enabled(False):
        ...     afnio.is_grad_enabled()
        False
        >>> afnio.is_grad_enabled()
        True
    """

    def __init__(self, mode: bool) -> None:
        super().__init__(bool(mode))
        self._initial_token = _grad_enabled.set(bool(mode))

    def __enter__(self) -> None:
        self._tokens.append(None)

    def __exit__(self, *exc: object) -> None:
        self._tokens.pop()
        self._restore()

    def _restore(self) -> None:
        if self._initial_token is not None:
            _grad_enabled.reset(self._initial_token)
            self._initial_token = None

    def __call__(self, func: F) -> F:
        self._restore()
        return super().__call__(func)


class inference_mode(_GradMode):  # noqa: N801
    """Like :class:`no_grad`: nothing run inside records a graph.

    Usable as ``with inference_mode():``, ``@inference_mode()``, ``@inference_mode(False)`` or
    bare ``@inference_mode``.

    Args:
        mode: ``True`` (default) disables recording; ``False`` leaves the mode unchanged. The
            bare decorator form passes the decorated function here instead.

    Raises:
        TypeError: If ``mode`` is neither a bool nor a function.

    Example:
        >>> import afnio
        >>> @afnio.inference_mode
        ... async def predict():
        ...     return afnio.is_grad_enabled()
        >>> import asyncio
        >>> asyncio.run(predict())
        False
    """

    def __new__(cls, mode: bool | Callable[..., Any] = True) -> Any:
        if isinstance(mode, bool):
            return super().__new__(cls)
        return _decorate_bare(cls, mode, "a bool mode")

    def __init__(self, mode: bool | Callable[..., Any] = True) -> None:
        super().__init__(False if mode else None)

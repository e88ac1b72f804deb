"""How afnio asks models for feedback: one settings object, process-wide with local overrides.

:class:`Settings` holds the backward model client and its completion arguments, the gradient
token cap, the feedback length bound and the number of repair retries. Read the current values
with :func:`get_settings`; change them for the whole process with :func:`set_settings` (what
``afnio.set_backward_model_client`` does), or for a block of code with :func:`settings`, whose
overrides live in a :class:`contextvars.ContextVar` and so stay local to the thread or asyncio
task that set them (and follow afnio's own calls into its runtime loop).

Every differentiable op captures the settings in force when its forward runs, so changing the
backward client between forward and backward does not change which model writes the gradients
of a graph already built.

Example:
    >>> import afnio
    >>> from afnio.testing import ScriptedModel
    >>> critic = ScriptedModel(["<FEEDBACK>Be brief.</FEEDBACK>"])
    >>> with afnio.settings(backward_model_client=critic, max_feedback_sentences=2):
    ...     afnio.get_settings().max_feedback_sentences
    2
    >>> afnio.get_settings().max_feedback_sentences
    4
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from afnio.models.model import ChatCompletionModel

__all__ = ["Settings", "get_settings", "set_settings", "settings"]


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        kind = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"afnio settings: {name} must be {kind}, got {value!r}")


def _is_client(value: Any) -> bool:
    from afnio.models.model import ChatCompletionModel  # models sits above: import on use

    return isinstance(value, ChatCompletionModel)


@dataclass(frozen=True)
class Settings:
    """The settings of every request afnio composes to ask a model for feedback or a rewrite.

    Attributes:
        backward_model_client: The client that writes textual gradients when an op or
            GradComponent has none of its own (``None``: not set).
        backward_completion_args: Completion arguments sent with every gradient request.
        gradient_token_budget: A cap (tokens) on one gradient prompt, below the model's context
            window; ``None`` means the window itself is the limit.
        max_feedback_sentences: The length bound every feedback prompt asks for.
        reply_retries: Repair requests sent after a reply that can't be read.
    """

    backward_model_client: ChatCompletionModel | None = None
    backward_completion_args: Mapping[str, Any] = field(default_factory=dict)
    gradient_token_budget: int | None = None
    max_feedback_sentences: int = 4
    reply_retries: int = 2

    def __post_init__(self) -> None:
        client = self.backward_model_client
        if client is not None and not _is_client(client):
            raise TypeError(
                "afnio settings: backward_model_client must be a ChatCompletionModel or None, "
                f"got {type(client).__name__}"
            )
        if not isinstance(self.backward_completion_args, Mapping):
            raise TypeError(
                "afnio settings: backward_completion_args must be a dict, got "
                f"{type(self.backward_completion_args).__name__}"
            )
        # A read-only copy: nobody can change the arguments a captured graph will use.
        object.__setattr__(
            self, "backward_completion_args", MappingProxyType(dict(self.backward_completion_args))
        )
        _positive_int("gradient_token_budget", self.gradient_token_budget, allow_none=True)
        _positive_int("max_feedback_sentences", self.max_feedback_sentences)
        if (
            isinstance(self.reply_retries, bool)
            or not isinstance(self.reply_retries, int)
            or self.reply_retries < 0
        ):
            raise ValueError(
                f"afnio settings: reply_retries must be an int >= 0, got {self.reply_retries!r}"
            )


_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))
_lock = threading.Lock()
_process = Settings()
_overrides: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "afnio_settings", default=MappingProxyType({})
)


def _checked(changes: Mapping[str, Any], who: str) -> dict[str, Any]:
    unknown = sorted(set(changes) - _FIELDS)
    if unknown:
        raise TypeError(f"{who}: unknown setting(s) {unknown}; known: {sorted(_FIELDS)}")
    return dict(changes)


def get_settings() -> Settings:
    """The settings in force here: the process-wide ones with this context's overrides."""
    overrides = _overrides.get()
    return dataclasses.replace(_process, **overrides) if overrides else _process


def set_settings(**changes: Any) -> None:
    """Change settings for the whole process (overrides made with :func:`settings` still win).

    Raises:
        TypeError, ValueError: For an unknown setting or an invalid value; nothing changes then.
    """
    global _process
    changes = _checked(changes, "set_settings")
    with _lock:
        _process = dataclasses.replace(_process, **changes)


@contextlib.contextmanager
def settings(**changes: Any) -> Iterator[Settings]:
    """Override settings inside a ``with`` block (local to this thread or task).

    Yields:
        The settings in force inside the block.

    Raises:
        TypeError, ValueError: For an unknown setting or an invalid value.
    """
    changes = _checked(changes, "settings")
    merged = {**_overrides.get(), **changes}
    current = dataclasses.replace(_process, **merged)  # validates before anything changes
    token = _overrides.set(MappingProxyType(merged))
    try:
        yield current
    finally:
        _overrides.reset(token)

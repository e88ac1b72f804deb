"""Per-parameter-group options, declared once as a frozen dataclass per optimizer.

:class:`GroupOptions` gives such a dataclass what every optimizer needs of it: its defaults (the
optimizer's ``defaults`` dict), the split of an optimizer's keyword arguments into options and the
rest (a near-miss of an option name is refused, so a typo never becomes a completion argument),
and the options of one parameter group.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class SketchOptions(GroupOptions):
    ...     owner = "Sketch"
    ...     max_steps: int = 1
    >>> SketchOptions.split({"max_steps": 2, "temperature": 0})
    ({'max_steps': 2}, {'temperature': 0})
    >>> SketchOptions.split({"max_stepz": 2})
    Traceback (most recent call last):
    ...
    TypeError: Sketch: unknown option 'max_stepz'; did you mean 'max_steps'?
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

OptionsT = TypeVar("OptionsT", bound="GroupOptions")


class GroupOptions:
    """Mixin for the frozen dataclass holding one optimizer's per-group options.

    Attributes:
        owner: The optimizer's name, for error messages.
        collects_completion_args: Keywords that are not options become the ``completion_args``
            option (merged over an explicit ``completion_args=``) instead of being returned.
    """

    owner = "optimizer"
    collects_completion_args = False

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [field.name for field in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every option that has a default, with it."""
        return {
            field.name: field.default_factory()
            if field.default_factory is not dataclasses.MISSING
            else field.default
            for field in dataclasses.fields(cls)
            if field.default is not dataclasses.MISSING
            or field.default_factory is not dataclasses.MISSING
        }

    @classmethod
    def split(cls, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split keyword arguments into ``(options, the rest)``.

        With ``collects_completion_args``, the rest is ``{"completion_args": {...}}`` (or empty).

        Raises:
            TypeError: For a keyword one letter or two away from an option name.
        """
        names = cls.names()
        options = {key: value for key, value in kwargs.items() if key in names}
        rest = {key: value for key, value in kwargs.items() if key not in names}
        for key in rest:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.85)
            if close:
                raise TypeError(f"{cls.owner}: unknown option {key!r}; did you mean {close[0]!r}?")
        if not cls.collects_completion_args:
            return options, rest
        completion_args = {**options.pop("completion_args", {}), **rest}
        return options, {"completion_args": completion_args} if completion_args else {}

    @classmethod
    def from_group(cls: type[OptionsT], group: Mapping[str, Any]) -> OptionsT:
        """The options of a parameter group dict (keys that are not options are ignored)."""
        return cls(**{name: group[name] for name in cls.names() if name in group})


def optimizer_defaults(
    option_classes: Sequence[type[GroupOptions]], options: Mapping[str, Any], **fixed: Any
) -> dict[str, Any]:
    """An optimizer's ``defaults``: every option's default, then ``options`` (split by each class
    in turn, so put the one that collects completion arguments last), then ``fixed``; checked.

    Raises:
        TypeError, ValueError: For a misspelled or invalid option.
    """
    defaults: dict[str, Any] = {}
    rest = dict(options)
    chosen: dict[str, Any] = {}
    for cls in option_classes:
        defaults.update(cls.defaults())
        picked, rest = cls.split(rest)
        chosen.update(picked)
    defaults = {**defaults, **chosen, **rest, **fixed}
    check_group(option_classes, defaults, {})
    return defaults


def check_group(
    option_classes: Sequence[type[GroupOptions]],
    defaults: Mapping[str, Any],
    param_group: Mapping[str, Any],
) -> None:
    """Check the options a parameter group ends up with (its own over ``defaults``).

    Raises:
        TypeError, ValueError: For an invalid option.
    """
    merged = {**defaults, **param_group}
    for cls in option_classes:
        cls.from_group(merged)

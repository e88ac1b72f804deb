"""Module wrappers of the basic operations: :class:`Add`, :class:`Sum` and :class:`Split`.

Example:
    >>> import afnio
    >>> from afnio.cognitive import Add
    >>> Add()(afnio.Variable("Hi "), afnio.Variable("Ann")).data
    'Hi Ann'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from afnio._variable import Variable
from afnio.cognitive import functional as F
from afnio.cognitive.modules.module import Module

__all__ = ["Add", "Split", "Sum"]


class Add(Module):
    """``x + y`` as a module (see :func:`afnio.cognitive.functional.add`)."""

    def forward(self, x: Any, y: Any) -> Variable:
        return F.add(x, y)


class Sum(Module):
    """Sum a list of Variables as a module (see :func:`afnio.cognitive.functional.sum`)."""

    def forward(self, variables: Sequence[Variable]) -> Variable:
        return F.sum(variables)


class Split(Module):
    """Split text as a module (see :func:`afnio.cognitive.functional.split`).

    Args:
        sep: The separator (``None``: runs of whitespace).
        maxsplit: At most this many splits (``-1``: no limit).
    """

    def __init__(self, sep: str | None = None, maxsplit: int = -1) -> None:
        super().__init__()
        self.sep = sep
        self.maxsplit = maxsplit

    def forward(self, x: Variable) -> tuple[Variable, ...]:
        return F.split(x, self.sep, self.maxsplit)

    def extra_repr(self) -> str:
        return f"sep={self.sep!r}, maxsplit={self.maxsplit}"

"""Parameter: a Variable that a Module owns and an optimizer updates."""

from __future__ import annotations

import copy
import enum
from typing import Any

from afnio._variable import Variable

__all__ = ["Parameter", "ParameterType"]


class ParameterType(enum.Enum):
    """What kind of value a Parameter holds (AdalFlow-style metadata, shown in prompts)."""

    PROMPT = "prompt"
    DEMOS = "demos"
    HYPERPARAM = "hyperparam"
    INPUT = "input"
    OUTPUT = "output"
    NONE = "none"


class Parameter(Variable):
    """A trainable Variable: ``requires_grad=True`` unless told otherwise.

    Assigning a Parameter as an attribute of a :class:`~afnio.cognitive.Module` registers it, so it
    shows up in ``module.parameters()`` and ``state_dict()``.

    Args:
        data: The initial value (text, a number, or a batch of them).
        role: What the value is ("system prompt for sentiment classification").
        requires_grad: Whether the optimizer should update it.
        role_desc: AdalFlow-style alias of ``role``.
        requires_opt: AdalFlow-style alias of ``requires_grad``.
        param_type: A :class:`ParameterType`, kept as metadata.
        name: AdalFlow-style display name, kept as metadata.

    Example:
        >>> p = Parameter("You are a helpful assistant.", role="system prompt")
        >>> p.requires_grad
        True
    """

    def __init__(
        self,
        data: Any = "",
        role: str = "",
        requires_grad: bool = True,
        *,
        role_desc: str | None = None,
        requires_opt: bool | None = None,
        param_type: ParameterType | str = ParameterType.NONE,
        name: str | None = None,
    ) -> None:
        if role_desc is not None:
            role = role_desc
        if requires_opt is not None:
            requires_grad = requires_opt
        super().__init__(data, role=role, requires_grad=requires_grad)
        self.param_type = ParameterType(param_type) if isinstance(param_type, str) else param_type
        self.name = name

    @property
    def role_desc(self) -> str:
        """AdalFlow-style alias of ``role``."""
        return self.role

    @property
    def requires_opt(self) -> bool:
        """AdalFlow-style alias of ``requires_grad``."""
        return self.requires_grad

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()

    def __deepcopy__(self, memo: dict) -> Parameter:
        if id(self) in memo:
            return memo[id(self)]
        result = Parameter(
            copy.deepcopy(self.data, memo),
            role=self.role,
            requires_grad=self.requires_grad,
            param_type=self.param_type,
            name=self.name,
        )
        result.grad = [copy.deepcopy(g, memo) for g in self.grad]
        memo[id(self)] = result
        return result

"""Basic differentiable operations: :class:`Add`, :class:`Sum` and :class:`Split`, plus the
batch plumbing behind indexing (:class:`Select`, :class:`Slice`, :class:`Unbind`) and
:class:`Clone`.

Add, Sum and Split are element-wise over batches, and a scalar broadcasts against a batch. Their
textual backward passes feedback through: a part of a concatenation gets the feedback on the
whole, a string that was split gets the feedback on each of its parts, labelled by part. The
indexing ops put each element's feedback back at its position in the batch (``""`` elsewhere).

Example:
    >>> import afnio
    >>> from afnio.autodiff.basic_ops import Split
    >>> x = afnio.Variable("a,b", role="csv line", requires_grad=True)
    >>> first, second = Split.apply(x, ",")
    >>> (first.data, second.data)
    ('a', 'b')
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from afnio._variable import Variable
from afnio.autodiff.function import Function, FunctionCtx
from afnio.autodiff.graph import gradient_role, reduce_to_scalar

__all__ = [
    "Add",
    "Clone",
    "Select",
    "Slice",
    "Split",
    "Sum",
    "Unbind",
    "add_data",
    "broadcast_elements",
    "broadcast_size",
]


def _as_variable(value: Any, op: str, argument: str) -> Variable:
    if isinstance(value, Variable):
        return value
    try:
        return Variable(value, role="constant")
    except TypeError as exc:
        raise TypeError(f"{op}: argument {argument!r}: {exc}") from None


def broadcast_size(op: str, variables: Sequence[Variable]) -> int | None:
    """The common batch size of ``variables`` (``None`` if all are scalars).

    Raises:
        ValueError: If two batches differ in length; names both roles and lengths.
    """
    size: int | None = None
    first: Variable | None = None
    for variable in variables:
        if variable.batch_size is None:
            continue
        if size is None:
            size, first = variable.batch_size, variable
        elif variable.batch_size != size:
            raise ValueError(
                f"{op}: batch sizes differ: {first.role!r} has {size} elements but "
                f"{variable.role!r} has {variable.batch_size}"
            )
    return size


def broadcast_elements(variable: Variable, size: int | None) -> list:
    """The data of ``variable`` as one element per sample of a call of batch size ``size``
    (``None``: a scalar call, one element); a scalar repeats across the batch.

    Example:
        >>> broadcast_elements(Variable("a"), 2)
        ['a', 'a']
    """
    if size is None:
        return [variable.data]
    return variable.data if variable.is_batched else [variable.data] * size


def _kind(variable: Variable) -> str:
    sample = variable.data[0] if variable.is_batched and variable.data else variable.data
    return "str" if isinstance(sample, str) else "number"


def _check_same_kind(op: str, variables: Sequence[Variable]) -> str:
    kinds = {_kind(v) for v in variables if not (v.is_batched and not v.data)}
    if len(kinds) > 1:
        described = ", ".join(f"{v.role!r} ({_kind(v)})" for v in variables)
        raise TypeError(f"{op}: cannot combine text and numbers: {described}")
    return kinds.pop() if kinds else "str"


def _name(variable: Variable, fallback: str, limit: int = 60) -> str:
    """An input's role for use inside an output's role, kept short so chains stay small."""
    role = variable.role or fallback
    return role if len(role) <= limit else role[: limit - 3] + "..."


def _pack(values: list, size: int | None) -> Any:
    return values[0] if size is None else values


def _gradient_for(variable: Variable, grad_output: Variable) -> Variable:
    """The output gradient reshaped for an input that may have been broadcast."""
    if variable.batch_size is None and grad_output.batch_size is not None:
        return Variable(reduce_to_scalar(grad_output), role=gradient_role(variable.role))
    return grad_output


def add_data(x: Any, y: Any, op: str = "Add") -> Any:
    """Element-wise sum of two Variables' data: numbers add, strings concatenate.

    Raises:
        TypeError: When mixing text and numbers.
        ValueError: When two batches differ in length.
    """
    return _add(op, _as_variable(x, op, "x"), _as_variable(y, op, "y"))[0]


def _add(op: str, x: Variable, y: Variable) -> tuple[Any, str]:
    """The element-wise sum's data and the kind (``"str"`` or ``"number"``) of what was added."""
    size = broadcast_size(op, [x, y])
    kind = _check_same_kind(op, [x, y])
    values = [a + b for a, b in zip(broadcast_elements(x, size), broadcast_elements(y, size))]
    return _pack(values, size), kind


class Add(Function):
    """``x + y``: numbers add, strings concatenate, batches element-wise with broadcasting.

    Example:
        >>> import afnio
        >>> a = afnio.Variable(["Hi ", "Bye "], role="openers", requires_grad=True)
        >>> Add.apply(a, afnio.Variable("Ann", role="name")).data
        ['Hi Ann', 'Bye Ann']
    """

    inline_backward = True

    @staticmethod
    def forward(ctx: FunctionCtx, x: Any, y: Any) -> Variable:
        x, y = _as_variable(x, "Add", "x"), _as_variable(y, "Add", "y")
        data, kind = _add("Add", x, y)
        joined = "concatenation" if kind == "str" else "sum"
        ctx.save_for_backward(x, y)
        return Variable(data, role=f"{joined} of {_name(x, 'x')} and {_name(y, 'y')}")

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: Variable) -> tuple[Variable | None, ...]:
        return tuple(
            _gradient_for(variable, grad_output) if needed else None
            for variable, needed in zip(ctx.saved_variables, ctx.needs_input_grad)
        )


def _join_texts(texts: Sequence[str], roles: Sequence[str]) -> str:
    return "\n\n".join(
        f"[{role or f'item {i}'}]\n{text}" for i, (text, role) in enumerate(zip(texts, roles))
    )


class Sum(Function):
    """Sum a list of Variables: numbers add; strings are joined, each under a ``[role]`` header.

    Example:
        >>> import afnio
        >>> a = afnio.Variable("Be brief.", role="style rule")
        >>> b = afnio.Variable("Answer in French.", role="language rule")
        >>> print(Sum.apply([a, b]).data)
        [style rule]
        Be brief.
        <BLANKLINE>
        [language rule]
        Answer in French.
    """

    inline_backward = True

    @staticmethod
    def forward(ctx: FunctionCtx, variables: Sequence[Variable]) -> Variable:
        if not isinstance(variables, (list, tuple)) or not variables:
            raise TypeError("Sum: argument 'variables' must be a non-empty list of Variables")
        items = [_as_variable(v, "Sum", f"variables[{i}]") for i, v in enumerate(variables)]
        size = broadcast_size("Sum", items)
        kind = _check_same_kind("Sum", items)
        columns = list(zip(*(broadcast_elements(v, size) for v in items)))
        roles = [v.role for v in items]
        if kind == "str":
            values = [_join_texts(column, roles) for column in columns]
        else:
            values = [sum(column) for column in columns]
        ctx.save_for_backward(*items)
        role = "sum of " + ", ".join(_name(v, f"item {i}") for i, v in enumerate(items))
        return Variable(_pack(values, size), role=role if len(role) <= 200 else role[:197] + "...")

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: Variable) -> tuple[list[Variable | None]]:
        if not ctx.needs_input_grad[0]:
            return (None,)
        return (
            [
                _gradient_for(v, grad_output) if v.requires_grad else None
                for v in ctx.saved_variables
            ],
        )


class Split(Function):
    """Split text like ``str.split`` into a tuple of Variables (element-wise for batches).

    Every element of a batch must split into the same number of parts. The input's gradient
    collects the parts' feedback in part order, each labelled with its part number.

    Args:
        x: The text (or batch of texts) to split.
        sep: The separator (``None``: runs of whitespace).
        maxsplit: At most this many splits (``-1``: no limit).
    """

    inline_backward = True

    @staticmethod
    def forward(ctx: FunctionCtx, x: Variable, sep: str | None = None, maxsplit: int = -1):
        x = _as_variable(x, "Split", "x")
        if _kind(x) != "str":
            raise TypeError(f"Split: argument 'x' (role {x.role!r}) must hold text, got numbers")
        texts = x.data if x.is_batched else [x.data]
        pieces = [text.split(sep, maxsplit) for text in texts]
        counts = sorted({len(parts) for parts in pieces})
        if len(counts) > 1:
            raise ValueError(
                f"Split: elements of batch {x.role!r} split into different numbers of parts "
                f"({counts}); every element must give the same number"
            )
        ctx.save_for_backward(x)
        count = counts[0] if counts else 0
        return tuple(
            Variable(
                [parts[i] for parts in pieces] if x.is_batched else pieces[0][i],
                role=f"part {i} of {_name(x, 'text')}",
            )
            for i in range(count)
        )

    @staticmethod
    def backward(ctx: FunctionCtx, *grad_outputs: Variable) -> Variable | None:
        if not ctx.needs_input_grad[0]:
            return None
        (x,) = ctx.saved_variables
        size = x.batch_size
        rows = [broadcast_elements(grad, size) for grad in grad_outputs]
        merged = [
            "\n\n".join(f"[part {i}] {text}" for i, text in enumerate(column) if text)
            for column in (zip(*rows) if rows else [()] * (size or 1))
        ]
        return Variable(_pack(merged, size), role=gradient_role(x.role))


# --------------------------------------------------------------------------- indexing and copies
def _batch_input(op: str, x: Any) -> Variable:
    """``x`` checked to be a batched Variable (what indexing ops work on)."""
    if not isinstance(x, Variable):
        raise TypeError(f"{op}: argument 'x' must be a Variable, got {type(x).__name__}")
    if not x.is_batched:
        raise IndexError(
            f"{op}: the Variable with role {x.role!r} is a scalar; only a batch can be indexed"
        )
    return x


def _scatter(ctx: FunctionCtx, grad_pieces: Sequence[tuple[int, Any]]) -> Variable:
    """The batch gradient of the indexed input (``ctx.role``, ``ctx.size``): each
    ``(position, feedback)`` placed at its position, ``""`` elsewhere."""
    texts = [""] * ctx.size
    for position, feedback in grad_pieces:
        if isinstance(feedback, Variable):
            feedback = feedback.data
        if feedback is not None:
            texts[position] = feedback if isinstance(feedback, str) else str(feedback)
    return Variable(texts, role=gradient_role(ctx.role))


def _remember_input(ctx: FunctionCtx, x: Variable) -> None:
    ctx.role, ctx.size = x.role, x.batch_size


class Select(Function):
    """``x[index]``: element ``index`` of a batch, as a scalar (like torch's ``select``).

    Negative indices count from the end. The batch's gradient holds the element's feedback at
    ``index`` and ``""`` elsewhere.

    Args:
        x: A batched Variable.
        index: An integer (anything ``operator.index`` accepts, not a bool).

    Raises:
        IndexError: For a scalar ``x`` or an index out of range.
        TypeError: For an index that is not an integer.

    Example:
        >>> import afnio
        >>> x = afnio.Variable(["cat", "dog"], role="labels", requires_grad=True)
        >>> y = Select.apply(x, -1)
        >>> y.backward("should be cow")
        >>> y.data, x.grad[0].data
        ('dog', ['', 'should be cow'])
    """

    inline_backward = True

    @staticmethod
    def forward(ctx: FunctionCtx, x: Variable, index: int) -> Variable:
        x = _batch_input("Select", x)
        if isinstance(index, bool):
            raise TypeError(
                f"Select: index for Variable with role {x.role!r} must be an int, got bool"
            )
        try:
            position = operator.index(index)
        except TypeError:
            raise TypeError(
                f"Select: Variable indices must be integers or slices, got "
                f"{type(index).__name__} (Variable with role {x.role!r})"
            ) from None
        size = x.batch_size
        if not -size <= position < size:
            raise IndexError(
                f"Select: index {position} is out of range for the Variable with role "
                f"{x.role!r} of batch size {size}"
            )
        position %= size
        ctx.position = position
        _remember_input(ctx, x)
        return Variable(x.data[position], role=f"element {position} of {_name(x, 'batch')}")

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: Variable) -> tuple[Variable | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return _scatter(ctx, [(ctx.position, grad_output)]), None


def _slice_text(index: slice) -> str:
    parts = ["" if part is None else str(part) for part in (index.start, index.stop, index.step)]
    return ":".join(parts if index.step is not None else parts[:2])


class Slice(Function):
    """``x[start:stop:step]``: a sub-batch (like torch's ``slice``), in slice order.

    The batch's gradient holds each selected element's feedback at its original position and
    ``""`` elsewhere.

    Args:
        x: A batched Variable.
        index: A ``slice`` (negative bounds and steps as in Python).

    Raises:
        IndexError: For a scalar ``x``.
        TypeError: If ``index`` is not a slice.

    Example:
        >>> import afnio
        >>> x = afnio.Variable(["a", "b", "c"], role="drafts", requires_grad=True)
        >>> y = Slice.apply(x, slice(None, None, -2))
        >>> y.backward(afnio.Variable(["about c", "about a"]))
        >>> y.data, x.grad[0].data
        (['c', 'a'], ['about a', '', 'about c'])
    """

    inline_backward = True

    @staticmethod
    def forward(ctx: FunctionCtx, x: Variable, index: slice) -> Variable:
        x = _batch_input("Slice", x)
        if not isinstance(index, slice):
            raise TypeError(f"Slice: argument 'index' must be a slice, got {type(index).__name__}")
        positions = range(x.batch_size)[index]
        ctx.positions = positions
        _remember_input(ctx, x)
        role = f"elements [{_slice_text(index)}] of {_name(x, 'batch')}"
        return Variable([x.data[p] for p in positions], role=role)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: Variable) -> tuple[Variable | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return _scatter(ctx, list(zip(ctx.positions, grad_output.data))), None


class Unbind(Function):
    """Split a batch into a tuple of its elements (like ``torch.unbind``); iterating a batched
    Variable uses it, so ``a, b = batch`` records one node.

    The batch's gradient gathers each element's feedback at its position.

    Raises:
        IndexError: For a scalar ``x``.

    Example:
        >>> import afnio
        >>> x = afnio.Variable(["a", "b"], role="drafts", requires_grad=True)
        >>> first, second = x
        >>> afnio.autodiff.backward([first, second], ["too short", ""])
        >>> first.grad_fn.name(), x.grad[0].data
        ('UnbindBackward', ['too short', ''])
    """

    inline_backward = True

    @staticmethod
    def forward(ctx: FunctionCtx, x: Variable) -> tuple[Variable, ...]:
        x = _batch_input("Unbind", x)
        _remember_input(ctx, x)
        name = _name(x, "batch")
        return tuple(
            Variable(item, role=f"element {i} of {name}") for i, item in enumerate(x.data)
        )

    @staticmethod
    def backward(ctx: FunctionCtx, *grad_outputs: Variable | None) -> Variable | None:
        if not ctx.needs_input_grad[0]:
            return None
        return _scatter(ctx, list(enumerate(grad_outputs)))


class Clone(Function):
    """A copy of ``x`` that stays in the graph (``torch.clone``): same data and role, and the
    gradient flows back unchanged.

    Example:
        >>> import afnio
        >>> x = afnio.Variable("hi", role="greeting", requires_grad=True)
        >>> y = Clone.apply(x)
        >>> y.backward("warmer")
        >>> y.grad_fn.name(), x.grad[0].data
        ('CloneBackward', 'warmer')
    """

    inline_backward = True

    @staticmethod
    def forward(ctx: FunctionCtx, x: Variable) -> Variable:
        if not isinstance(x, Variable):
            raise TypeError(f"Clone: argument 'x' must be a Variable, got {type(x).__name__}")
        return Variable(x.data, role=x.role)  # a batch is copied

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: Variable) -> Variable | None:
        return grad_output if ctx.needs_input_grad[0] else None

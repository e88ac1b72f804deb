"""The Variable: afnio's tensor, whose data is text or numbers.

A Variable holds a **scalar** (``str``, ``int`` or ``float``) or a **batch** (a ``list`` whose
elements are all ``str`` or all numbers). Operations on Variables build a graph when any input
``requires_grad``; ``backward()`` walks it and leaves *textual gradients* — feedback strings shaped
like the Variable — in the ``grad`` list of every leaf.

Example:
    >>> from afnio import Variable
    >>> prompt = Variable("Classify the sentiment.", role="system prompt", requires_grad=True)
    >>> question = Variable(["Great!", "Awful."], role="user message")
    >>> full = prompt + question
    >>> full.data
    ['Classify the sentiment.Great!', 'Classify the sentiment.Awful.']
    >>> full.grad_fn.name()
    'AddBackward'
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from afnio._hooks import RemovableHandle, add_hook, check_callable

if TYPE_CHECKING:
    from afnio.autodiff.graph import Node

__all__ = ["Variable", "validate_data", "batch_size_of"]

Scalar = str | int | float
Data = str | int | float | list

_REPR_LIMIT = 60


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return "str"
    if isinstance(value, (int, float)):
        return "number"
    return None


def validate_data(data: Any, role: str = "") -> Data:
    """Check that ``data`` is a valid Variable payload and normalise it.

    Args:
        data: A scalar (``str``, ``int``, ``float``) or a list/tuple of all-``str`` or all-number
            elements.
        role: The role of the Variable being built, quoted in errors.

    Returns:
        The data, with a tuple turned into a list (lists are copied).

    Raises:
        TypeError: For ``None``, ``bool``, dicts, other objects, or a batch mixing strings and
            numbers; the message names the offending value's type.
    """
    where = f" for Variable with role {role!r}" if role else ""
    if isinstance(data, (list, tuple)):
        kinds = {_kind(item) for item in data}
        if None in kinds:
            bad = next(item for item in data if _kind(item) is None)
            raise TypeError(
                f"Variable data{where}: batch elements must be str, int or float, "
                f"got an element of type {type(bad).__name__}"
            )
        if len(kinds) > 1:
            raise TypeError(
                f"Variable data{where}: a batch must be all str or all numbers, got a mix of "
                f"{sorted({type(item).__name__ for item in data})}"
            )
        return list(data)
    if _kind(data) is None:
        raise TypeError(
            f"Variable data{where} must be str, int, float or a list of them, "
            f"got {type(data).__name__}"
        )
    return data


def batch_size_of(data: Any) -> int | None:
    """Return the batch size of ``data`` (``None`` for a scalar)."""
    return len(data) if isinstance(data, list) else None


def _shorten(value: Any, limit: int = _REPR_LIMIT) -> str:
    text = repr(value)
    return (
        text if len(text) <= limit else text[: limit - 5] + "...'" + ("]" if text[0] == "[" else "")
    )


class Variable:
    """A node of text or numbers in an afnio program.

    Args:
        data: A scalar (``str``, ``int``, ``float``) or a batch (list or tuple of all-``str`` or
            all-number elements). Defaults to the empty string.
        role: What the value *is* ("system prompt for sentiment classification"). Backward
            prompts quote it.
        requires_grad: Whether gradients should be collected for this Variable.

    Attributes:
        data: The payload.
        role: The role description.
        requires_grad: Whether this Variable takes part in gradient computation.
        grad: Gradients received (a list of Variables shaped like this one). Non-leaves keep
            gradients only after :meth:`retain_grad`. Never ``None``: assigning ``None`` (as
            torch code does to drop gradients) stores a new empty list.
        grad_fn: The graph node that produced this Variable, or ``None`` for a leaf.
        output_nr: Which output of ``grad_fn`` this Variable is.

    Example:
        >>> v = Variable(["a", "b"], role="answers")
        >>> v.batch_size
        2
        >>> v
        Variable(data=['a', 'b'], role='answers', requires_grad=False)
    """

    def __init__(self, data: Any = "", role: str = "", requires_grad: bool = False) -> None:
        if not isinstance(role, str):
            raise TypeError(f"Variable role must be a str, got {type(role).__name__}")
        self._data = validate_data(data, role)
        self.role = role
        self._requires_grad = _flag(requires_grad, role)
        self._grad: list[Variable] = []
        self.grad_fn: Node | None = None
        self.output_nr = 0
        self._retains_grad = False
        self._grad_accumulator = None
        self._hooks: OrderedDict[int, Callable] | None = None

    # ----------------------------------------------------------------- data and shape
    @property
    def data(self) -> Data:
        """The scalar or batch payload. Assigning validates the new value."""
        return self._data

    @data.setter
    def data(self, value: Any) -> None:
        self._data = validate_data(value, self.role)

    @property
    def batch_size(self) -> int | None:
        """The number of elements for a batch, ``None`` for a scalar."""
        return batch_size_of(self._data)

    @property
    def is_batched(self) -> bool:
        """Whether the data is a batch (a list)."""
        return isinstance(self._data, list)

    def __bool__(self) -> bool:
        # Without this, truth testing would fall back to __len__, which scalars don't have.
        return True

    def __len__(self) -> int:
        if not self.is_batched:
            raise TypeError(f"len() of a scalar Variable (role {self.role!r}) is not defined")
        return len(self._data)

    def is_floating_point(self) -> bool:
        """Return True when the data is a float, or a non-empty batch containing a float."""
        if self.is_batched:
            return any(isinstance(item, float) for item in self._data)
        return isinstance(self._data, float)

    def to(self, dtype: type) -> Variable:
        """Return a copy whose data is converted to ``dtype`` (``str``, ``int`` or ``float``).

        Like ``torch.Tensor.to``, the result keeps ``requires_grad`` but is a new leaf; when the
        data already has that type, ``self`` is returned.

        Args:
            dtype: The target element type.

        Raises:
            TypeError: If ``dtype`` is not ``str``, ``int`` or ``float``.
            ValueError: If an element can't be converted.
        """
        if dtype not in (str, int, float):
            raise TypeError(f"Variable.to: dtype must be str, int or float, got {dtype!r}")
        items = self._data if self.is_batched else [self._data]
        if all(type(item) is dtype for item in items):
            return self
        try:
            converted = [dtype(item) for item in items]
        except ValueError as exc:
            raise ValueError(
                f"Variable.to: cannot convert data of Variable with role {self.role!r} "
                f"to {dtype.__name__}: {exc}"
            ) from exc
        data = converted if self.is_batched else converted[0]
        return Variable(data, role=self.role, requires_grad=self.requires_grad)

    def __getitem__(self, index: int | slice) -> Variable:
        """``v[i]`` / ``v[a:b:c]`` on a batch, as a differentiable op (like torch's indexing).

        An integer gives the scalar element (``SelectBackward``), a slice a batch
        (``SliceBackward``); negative indices count from the end. The gradient flows back to
        the selected positions only: the batch's gradient is ``""`` everywhere else.

        Raises:
            IndexError: For a scalar Variable, or an integer out of range.
            TypeError: For an index that is neither an integer nor a slice.

        Example:
            >>> v = Variable(["a", "b", "c"], role="answers", requires_grad=True)
            >>> v[-1].data, v[:2].data, v[1].grad_fn.name()
            ('c', ['a', 'b'], 'SelectBackward')
        """
        from afnio.autodiff.basic_ops import Select, Slice

        if isinstance(index, slice):
            return Slice.apply(self, index)
        return Select.apply(self, index)

    def __iter__(self) -> Iterator[Variable]:
        """Iterate over a batch's elements, each a differentiable scalar (like torch's
        ``unbind``: one ``UnbindBackward`` node for all of them).

        Raises:
            TypeError: For a scalar Variable.

        Example:
            >>> first, second = Variable(["a", "b"], role="answers", requires_grad=True)
            >>> first.data, first.grad_fn.name()
            ('a', 'UnbindBackward')
        """
        from afnio.autodiff.basic_ops import Unbind

        if not self.is_batched:
            raise TypeError(
                f"iteration over a scalar Variable (role {self.role!r}); only batches can be "
                "iterated"
            )
        return iter(Unbind.apply(self))

    def __contains__(self, item: Any) -> bool:
        """``item in v``: whether a batch has an element equal to ``item`` (or its data).

        Raises:
            TypeError: For a scalar Variable (use ``item in v.data`` for a substring test).

        Example:
            >>> "cat" in Variable(["cat", "dog"], role="labels")
            True
        """
        if not self.is_batched:
            raise TypeError(
                f"'in' on a scalar Variable (role {self.role!r}) is ambiguous; use "
                "`item in variable.data` for a substring test"
            )
        value = item.data if isinstance(item, Variable) else item
        return value in self._data

    # ----------------------------------------------------------------- autograd state
    @property
    def grad(self) -> list[Variable]:
        """The gradients received, in the order the engine delivered them.

        Assigning ``None`` stores a new empty list (torch code writes ``p.grad = None`` to drop
        gradients); assigning a list keeps that list.

        Raises:
            TypeError: When assigning something other than ``None`` or a list of Variables.

        Example:
            >>> p = Variable("Be brief.", role="system prompt", requires_grad=True)
            >>> p.append_grad(Variable("too curt"))
            >>> p.grad = None
            >>> p.grad
            []
        """
        return self._grad

    @grad.setter
    def grad(self, value: list[Variable] | None) -> None:
        if value is None:
            self._grad = []
            return
        if not isinstance(value, list) or not all(isinstance(g, Variable) for g in value):
            raise TypeError(
                f"Variable.grad of Variable with role {self.role!r} must be None or a list of "
                f"Variables, got {type(value).__name__}"
            )
        self._grad = value

    @property
    def requires_grad(self) -> bool:
        """Whether gradients are tracked for this Variable."""
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self.requires_grad_(value)

    @property
    def is_leaf(self) -> bool:
        """True for Variables not produced by a graph-recording operation."""
        return self.grad_fn is None

    @property
    def retains_grad(self) -> bool:
        """Whether a non-leaf keeps its gradients in ``grad`` (see :meth:`retain_grad`)."""
        return self._retains_grad

    def requires_grad_(self, requires_grad: bool = True) -> Variable:
        """Set ``requires_grad`` in place and return ``self``.

        Raises:
            TypeError: If ``requires_grad`` is not a bool.
            RuntimeError: When turning off gradients of a non-leaf, as in PyTorch.
        """
        requires_grad = _flag(requires_grad, self.role)
        if not self.is_leaf and not requires_grad:
            raise RuntimeError(
                f"you can only change requires_grad flags of leaf variables; Variable with role "
                f"{self.role!r} is the output of {self.grad_fn.name()}. Use detach() instead."
            )
        self._requires_grad = requires_grad
        return self

    def retain_grad(self) -> None:
        """Keep the gradients of this non-leaf in ``grad`` after ``backward`` (no-op on leaves).

        Raises:
            RuntimeError: If the Variable does not require grad.
        """
        if not self.requires_grad:
            raise RuntimeError(
                f"can't retain_grad on Variable with role {self.role!r}: it has requires_grad=False"
            )
        if not self.is_leaf:
            self._retains_grad = True
            self.grad_fn.retain_output(self.output_nr, self)

    def register_hook(self, hook: Callable[[Variable], Variable | None]) -> RemovableHandle:
        """Register ``hook(gradient) -> Variable | None``, called on each gradient of this
        Variable during backward and :func:`afnio.autodiff.grad`.

        As in torch: on a leaf the hook sees each gradient before it is appended to ``grad``
        (afnio appends each incoming gradient separately, so the hook runs once per gradient);
        on a non-leaf it sees the combined gradient before it flows on into ``grad_fn`` (and
        before :meth:`retain_grad` stores it). Returning a Variable replaces the gradient for
        everything downstream; returning ``None`` keeps it. Several hooks run in registration
        order, each seeing the previous one's result. Leaf hooks run after the whole graph has
        run, in the deterministic order gradients are appended; a hook that raises aborts the
        backward before any ``grad`` is touched.

        Args:
            hook: Called with the gradient Variable; returns a replacement shaped like this
                Variable, or ``None``.

        Returns:
            A handle whose ``remove()`` unregisters the hook (also a context manager).

        Raises:
            RuntimeError: If this Variable does not require grad.
            TypeError: If ``hook`` is not callable.

        Example:
            >>> x = Variable("hi", role="greeting", requires_grad=True)
            >>> handle = x.register_hook(lambda g: Variable(g.data.upper(), role=g.role))
            >>> (x + "!").backward(Variable("warmer"))
            >>> handle.remove()
            >>> x.grad[0].data
            'WARMER'
        """
        check_callable(hook, f"register_hook on Variable with role {self.role!r}")
        if not self.requires_grad:
            raise RuntimeError(
                f"cannot register a hook on a Variable that doesn't require gradient (role "
                f"{self.role!r})"
            )
        if self.grad_fn is not None:
            return self.grad_fn.register_variable_hook(self.output_nr, hook)
        if self._hooks is None:
            self._hooks = OrderedDict()
        return add_hook(self._hooks, hook)

    def append_grad(self, gradient: Variable) -> None:
        """Append one gradient to ``grad``, checking that its shape matches this Variable.

        Args:
            gradient: A Variable shaped like ``self`` (scalar for a scalar, same batch size for a
                batch).

        Raises:
            TypeError: If ``gradient`` is not a Variable.
            ValueError: If its shape differs from this Variable's.
        """
        check_gradient_shape(self, gradient, "append_grad")
        self.grad.append(gradient)

    def backward(
        self,
        gradient: Variable | str | list | None = None,
        retain_graph: bool | None = None,
        inputs: Variable | Sequence[Variable] | None = None,
    ) -> None:
        """Compute textual gradients of the graph that produced this Variable.

        Args:
            gradient: The feedback on this Variable itself. When omitted, the Variable's own data
                is its feedback — an evaluator's explanation *is* the loss, just as ``dL/dL = 1``.
            retain_graph: Keep the graph's saved state so ``backward`` can run through it again.
            inputs: Accumulate gradients only into these Variables.

        Raises:
            RuntimeError: If the Variable does not require grad, or the graph was freed.
        """
        from afnio.autodiff.engine import backward

        backward(self, gradient, retain_graph=retain_graph, inputs=inputs)

    async def abackward(
        self,
        gradient: Variable | str | list | None = None,
        retain_graph: bool | None = None,
        inputs: Variable | Sequence[Variable] | None = None,
    ) -> None:
        """Awaitable twin of :meth:`backward`, for code already running on an event loop."""
        from afnio.autodiff.engine import abackward

        await abackward(self, gradient, retain_graph=retain_graph, inputs=inputs)

    def detach(self) -> Variable:
        """Return a new leaf with the same data and role that is cut off from the graph."""
        return Variable(self._data, role=self.role, requires_grad=False)  # a batch is copied

    def clone(self) -> Variable:
        """Return a copy that stays in the graph (``CloneBackward``), as ``torch.Tensor.clone``.

        The copy has the same data and role; its gradient flows back to ``self`` unchanged.
        Without grad mode, or when ``self`` needs no gradient, the copy is a plain leaf.

        Example:
            >>> x = Variable(["a", "b"], role="drafts", requires_grad=True)
            >>> y = x.clone()
            >>> y.data, y.grad_fn.name(), y.data is x.data
            (['a', 'b'], 'CloneBackward', False)
        """
        from afnio.autodiff.basic_ops import Clone

        return Clone.apply(self)

    def detach_(self) -> Variable:
        """Cut this Variable off from its graph in place and return it."""
        self.grad_fn = None
        self.output_nr = 0
        self._requires_grad = False
        return self

    def copy_(self, src: Variable | Any) -> Variable:
        """Copy ``src``'s data into this Variable in place (role and graph links are kept).

        Args:
            src: A Variable or raw data of the same shape (a scalar broadcasts into a batch).

        Raises:
            RuntimeError: If this is a leaf that requires grad and grad mode is on (as in
                PyTorch: wrap optimizer updates in ``no_grad()``).
            ValueError: If ``src`` is a batch and this Variable is a scalar or a batch of a
                different size.
        """
        from afnio.autodiff.grad_mode import is_grad_enabled

        if self.is_leaf and self.requires_grad and is_grad_enabled():
            raise RuntimeError(
                f"Variable.copy_: a leaf Variable that requires grad (role {self.role!r}) is "
                "being used in an in-place operation; wrap it in afnio.no_grad()"
            )
        data = src.data if isinstance(src, Variable) else validate_data(src, self.role)
        if isinstance(data, list) and len(data) != self.batch_size:
            size = "(a scalar)" if self.batch_size is None else f"of batch size {self.batch_size}"
            raise ValueError(
                f"Variable.copy_: source batch of size {len(data)} does not match Variable with "
                f"role {self.role!r} {size}"
            )
        if self.is_batched and not isinstance(data, list):
            data = [data] * len(self._data)
        self.data = data  # the setter copies a batch
        return self

    def __deepcopy__(self, memo: dict) -> Variable:
        if not self.is_leaf:
            raise RuntimeError(
                "Only Variables created explicitly by the user (graph leaves) support the "
                f"deepcopy protocol; Variable with role {self.role!r} is the output of "
                f"{self.grad_fn.name()}"
            )
        if id(self) in memo:
            return memo[id(self)]
        result = type(self).__new__(type(self))
        memo[id(self)] = result
        for key, value in self.__dict__.items():
            if key not in ("_grad_accumulator", "_hooks"):
                setattr(result, key, copy.deepcopy(value, memo))
        result._grad_accumulator = None
        result._hooks = None  # as in torch, a copy does not inherit gradient hooks
        return result

    # ----------------------------------------------------------------- operators
    def __add__(self, other: Any) -> Variable:
        from afnio.autodiff.basic_ops import Add

        return Add.apply(self, other)

    def __radd__(self, other: Any) -> Variable:
        from afnio.autodiff.basic_ops import Add

        return Add.apply(other, self)

    def __iadd__(self, other: Any) -> Variable:
        """``x += y``: in place when no graph is being recorded, out of place otherwise.

        When gradients are tracked, the result is a new Variable (Python rebinds the name), so the
        graph through the old value stays intact.
        """
        from afnio.autodiff.grad_mode import is_grad_enabled

        other_grad = isinstance(other, Variable) and other.requires_grad
        if is_grad_enabled() and (self.requires_grad or other_grad):
            return self + other
        from afnio.autodiff.basic_ops import add_data

        self.data = add_data(self, other, "Variable.__iadd__")
        return self

    # ----------------------------------------------------------------- printing
    def __repr__(self) -> str:
        parts = [f"data={_shorten(self._data)}"]
        if self.role:
            parts.append(f"role={_shorten(self.role, 40)}")
        if self.grad_fn is not None:
            parts.append(f"grad_fn=<{self.grad_fn.name()}>")
        else:
            parts.append(f"requires_grad={self.requires_grad}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __str__(self) -> str:
        return str(self._data)

    def __format__(self, spec: str) -> str:
        return format(str(self._data), spec)


def check_gradient_shape(variable: Variable, gradient: Any, where: str) -> None:
    """Raise if ``gradient`` is not a Variable shaped like ``variable``.

    Args:
        variable: The Variable the gradient is for.
        gradient: The candidate gradient.
        where: Name of the operation doing the check, quoted in the error.

    Raises:
        TypeError: If ``gradient`` is not a Variable.
        ValueError: If the shapes differ.
    """
    if not isinstance(gradient, Variable):
        raise TypeError(
            f"{where}: gradient for Variable with role {variable.role!r} must be a Variable, "
            f"got {type(gradient).__name__}"
        )
    expected, got = variable.batch_size, gradient.batch_size
    if expected != got:
        describe = lambda size: "a scalar" if size is None else f"a batch of {size}"  # noqa: E731
        raise ValueError(
            f"{where}: gradient for Variable with role {variable.role!r} must be "
            f"{describe(expected)} like its Variable, got {describe(got)}"
        )


def _flag(value: Any, role: str) -> bool:
    """``value`` as a bool, refusing anything that isn't one (``"no"`` is truthy)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy.bool_ too
        return bool(value)
    raise TypeError(
        f"Variable with role {role!r}: requires_grad must be a bool, got "
        f"{type(value).__name__} {value!r:.40}"
    )

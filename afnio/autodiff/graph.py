"""Graph nodes: the backward half of every recorded operation.

A :class:`Node` is created for each operation run under grad mode; its ``next_functions`` point
at the nodes (or :class:`AccumulateGrad` sinks, for leaves) that produced its inputs, in the flat
order of the operation's arguments. Every node carries a sequence number from forward, which the
engine uses to order gradients deterministically.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple

from afnio._hooks import RemovableHandle, add_hook, check_callable
from afnio._variable import Variable, batch_size_of

__all__ = [
    "FAN_IN_SEPARATOR",
    "AccumulateGrad",
    "GradientEdge",
    "Node",
    "combine_gradients",
    "empty_gradient",
    "gradient_edge",
    "gradient_role",
    "reduce_to_scalar",
    "run_variable_hooks",
]

_sequence = itertools.count()
_sequence_lock = threading.Lock()

FAN_IN_SEPARATOR = "\n\n"
"""The text :func:`combine_gradients` puts between the gradient pieces of one Variable."""

FREED_GRAPH_MESSAGE = (
    "Trying to backward through the graph a second time (or directly access saved variables "
    "after they have already been freed). Saved intermediate values of the graph are freed when "
    "you call .backward(). Specify retain_graph=True if you need to backward through the graph a "
    "second time or if you need to access saved variables after calling backward."
)


def _next_sequence_nr() -> int:
    with _sequence_lock:
        return next(_sequence)


class GradientEdge(NamedTuple):
    """An edge of the backward graph: gradients flow into output ``output_nr`` of ``node``."""

    node: Node | None
    output_nr: int


class Node:
    """Base class of backward-graph nodes.

    Subclasses implement :meth:`apply` (synchronous) or set ``is_async = True`` and implement
    :meth:`aapply`. Both receive one gradient (or ``None``) per output of the forward operation
    and return one gradient (or ``None``) per entry of ``next_functions``. A synchronous node
    runs in a worker thread (it may block) unless it sets ``inline = True``. A node that sets
    ``streams = True`` (and ``is_async = True``) implements :meth:`astream` instead, yielding
    ``(position, gradient)`` pairs as each input's gradient is ready, so the engine can pass
    each one on at once.

    Args:
        next_functions: Edges to the producers of this operation's inputs, in flat order.
        outputs: The Variables the forward operation returned (only their roles and shapes are
            kept).
    """

    is_async = False
    inline = False
    streams = False
    # Hooks of non-leaf outputs (``Variable.register_hook``): {output_nr: {handle id: hook}}.
    variable_hooks: dict[int, OrderedDict[int, Callable]] | None = None

    def __init__(
        self, next_functions: Sequence[GradientEdge] = (), outputs: Sequence[Variable] = ()
    ) -> None:
        self.next_functions: tuple[GradientEdge, ...] = tuple(next_functions)
        self.output_meta: list[tuple[str, int | None]] = [
            (out.role, out.batch_size) for out in outputs
        ]
        self.sequence_nr = _next_sequence_nr()
        self.retained: dict[int, Variable] = {}
        self.freed = False

    def name(self) -> str:
        """The node's display name, e.g. ``AddBackward``."""
        return type(self).__name__

    def output_info(self, output_nr: int) -> tuple[str, int | None]:
        """Return the role and batch size of forward output ``output_nr``."""
        return self.output_meta[output_nr]

    @property
    def trace(self) -> dict[str, Any] | None:
        """What the operation recorded for display (inputs, full response), or ``None``."""
        return None

    def retain_output(self, output_nr: int, variable: Variable) -> None:
        """Remember ``variable`` so the engine stores its combined gradient in ``grad``."""
        self.retained[output_nr] = variable

    def release(self) -> None:
        """Free saved state after backward (``retain_graph=False``)."""
        self.freed = True

    def register_variable_hook(
        self, output_nr: int, hook: Callable[[Variable], Variable | None]
    ) -> RemovableHandle:
        """Register a gradient hook of the Variable that is output ``output_nr`` of this node
        (what ``Variable.register_hook`` does for a non-leaf).

        The engine calls it on that output's combined gradient before this node runs.

        Returns:
            A handle whose ``remove()`` unregisters the hook.

        Example:
            >>> x = Variable("hi", requires_grad=True)
            >>> y = x + "!"
            >>> handle = y.grad_fn.register_variable_hook(0, lambda g: Variable(g.data + "?"))
            >>> y.backward(Variable("why"))
            >>> x.grad[0].data
            'why?'
        """
        check_callable(hook, f"{self.name()}.register_variable_hook")
        if self.variable_hooks is None:
            self.variable_hooks = {}
        return add_hook(self.variable_hooks.setdefault(output_nr, OrderedDict()), hook)

    def hooked_gradient(self, output_nr: int, gradient: Variable) -> Variable:
        """``gradient`` for output ``output_nr`` after that output's Variable hooks.

        Example:
            >>> y = Variable("hi", requires_grad=True) + "!"
            >>> _ = y.register_hook(lambda g: Variable(g.data.upper()))
            >>> y.grad_fn.hooked_gradient(0, Variable("louder")).data
            'LOUDER'
        """
        hooks = self.variable_hooks and self.variable_hooks.get(output_nr)
        if not hooks:
            return gradient
        role, batch_size = self.output_info(output_nr)
        return run_variable_hooks(hooks, gradient, role, batch_size)

    def apply(self, grad_outputs: list[Variable | None]) -> Sequence[Variable | None]:
        """Compute the input gradients synchronously.

        Args:
            grad_outputs: One gradient per forward output (``None`` if none arrived).

        Returns:
            One gradient or ``None`` per entry of ``next_functions``.
        """
        raise RuntimeError(f"{self.name()} defines neither apply nor an async aapply")

    async def aapply(self, grad_outputs: list[Variable | None]) -> Sequence[Variable | None]:
        """Async twin of :meth:`apply`; the default calls :meth:`apply`."""
        return self.apply(grad_outputs)

    async def astream(
        self, grad_outputs: list[Variable | None]
    ) -> AsyncIterator[tuple[int, Variable | None]]:
        """Yield ``(position, gradient)`` for entries of ``next_functions`` as each is ready.

        Each position at most once; positions never yielded get no gradient. The engine calls
        it for nodes with ``streams = True``; the default yields :meth:`aapply`'s results in
        order, once all are computed.

        Example:
            >>> import asyncio
            >>> x = Variable("hi", requires_grad=True)
            >>> node = (x + "!").grad_fn
            >>> async def pairs():
            ...     return [(i, g.data) async for i, g in node.astream([Variable("louder")])]
            >>> asyncio.run(pairs())
            [(0, 'louder')]
        """
        for position, gradient in enumerate(await self.aapply(grad_outputs)):
            yield position, gradient

    def __call__(self, *grad_outputs: Variable | None) -> Sequence[Variable | None]:
        return self.apply(list(grad_outputs))

    def __repr__(self) -> str:
        return f"<{self.name()} seq={self.sequence_nr}>"


class AccumulateGrad(Node):
    """The sink of a leaf Variable: gradients arriving here are appended to ``variable.grad``."""

    def __init__(self, variable: Variable) -> None:
        super().__init__((), ())
        self.variable = variable

    def output_info(self, output_nr: int) -> tuple[str, int | None]:
        """The leaf's role and batch size (read live: the leaf's data may have changed)."""
        return self.variable.role, self.variable.batch_size

    def hooked_gradient(self, output_nr: int, gradient: Variable) -> Variable:
        """``gradient`` after the leaf's hooks (``Variable.register_hook``).

        Example:
            >>> x = Variable("hi", requires_grad=True)
            >>> _ = x.register_hook(lambda g: Variable(g.data + "!"))
            >>> AccumulateGrad(x).hooked_gradient(0, Variable("warmer")).data
            'warmer!'
        """
        hooks = self.variable._hooks
        if not hooks:
            return gradient
        return run_variable_hooks(hooks, gradient, self.variable.role, self.variable.batch_size)

    def apply(self, grad_outputs: list[Variable | None]) -> Sequence[Variable | None]:
        """Append the (non-``None``) gradient, after the leaf's hooks, to its ``grad`` list."""
        if grad_outputs and grad_outputs[0] is not None:
            self.variable.grad.append(self.hooked_gradient(0, grad_outputs[0]))
        return ()


def gradient_edge(variable: Variable) -> GradientEdge:
    """Return the edge gradients for ``variable`` flow into (``node`` is None if it needs none)."""
    if variable.grad_fn is not None:
        return GradientEdge(variable.grad_fn, variable.output_nr)
    if variable.requires_grad:
        if variable._grad_accumulator is None:
            variable._grad_accumulator = AccumulateGrad(variable)
        return GradientEdge(variable._grad_accumulator, 0)
    return GradientEdge(None, 0)


def _describe(batch_size: int | None) -> str:
    return "a scalar" if batch_size is None else f"a batch of {batch_size}"


def run_variable_hooks(
    hooks: OrderedDict[int, Callable], gradient: Variable, role: str, batch_size: int | None
) -> Variable:
    """Pass ``gradient`` through ``hooks`` in order; a hook returning a Variable replaces it.

    Args:
        hooks: The hooks of one Variable (``Variable.register_hook``).
        gradient: The gradient about to be accumulated or to flow on.
        role: The Variable's role, quoted in errors.
        batch_size: The Variable's batch size; a replacement must have the same shape.

    Returns:
        The gradient after every hook.

    Raises:
        TypeError: If a hook returns something other than a Variable or ``None``.
        ValueError: If a hook returns a gradient shaped differently from the Variable.

    Example:
        >>> from collections import OrderedDict
        >>> hooks = OrderedDict({0: lambda g: Variable(g.data + "!"), 1: lambda g: None})
        >>> run_variable_hooks(hooks, Variable("shorter"), "answer", None).data
        'shorter!'
    """
    for hook in list(hooks.values()):
        result = hook(gradient)
        if result is None:
            continue
        name = getattr(hook, "__qualname__", type(hook).__name__)
        where = f"hook {name} registered on the Variable with role {role!r}"
        if not isinstance(result, Variable):
            raise TypeError(f"{where} must return a Variable or None, got {type(result).__name__}")
        if result.batch_size != batch_size:
            raise ValueError(
                f"{where} changed the gradient's shape: the Variable is {_describe(batch_size)} "
                f"but the hook returned {_describe(result.batch_size)}"
            )
        gradient = result
    return gradient


def gradient_role(role: str) -> str:
    """The role given to feedback about a Variable with role ``role``."""
    return f"feedback to {role}" if role else "feedback"


def empty_gradient(role: str, batch_size: int | None) -> Variable:
    """An "I have nothing to say" gradient shaped like a Variable of ``batch_size``."""
    data: Any = "" if batch_size is None else [""] * batch_size
    return Variable(data, role=gradient_role(role))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def combine_gradients(
    pieces: Sequence[Variable],
    role: str,
    batch_size: int | None,
    separator: str = FAN_IN_SEPARATOR,
) -> Variable:
    """Fan-in: merge several gradients for one Variable into one, keeping every non-empty piece.

    Pieces are kept in the order given (the engine passes them in descending producer sequence).
    Batches are merged element-wise; empty pieces are dropped.

    Args:
        pieces: Gradients shaped like the Variable.
        role: The Variable's role.
        batch_size: The Variable's batch size, ``None`` for a scalar.
        separator: Text placed between pieces.

    Returns:
        One gradient Variable of the same shape.

    Example:
        >>> a, b = Variable("too long"), Variable("")
        >>> combine_gradients([a, b, Variable("be polite")], "answer", None).data
        'too long\\n\\nbe polite'
    """
    if len(pieces) == 1:
        return pieces[0]
    if batch_size is None:
        texts = [_text(piece.data) for piece in pieces]
        data: Any = separator.join(text for text in texts if text)
    else:
        data = [
            separator.join(text for text in (_text(piece.data[i]) for piece in pieces) if text)
            for i in range(batch_size)
        ]
    return Variable(data, role=gradient_role(role))


def reduce_to_scalar(gradient: Variable, separator: str = "\n\n") -> str:
    """Turn batch feedback into one text for a scalar that was broadcast across the batch.

    Each non-empty element is labelled with its index so the reader knows which sample it is
    about; a scalar gradient is returned as its text.
    """
    data = gradient.data
    if batch_size_of(data) is None:
        return _text(data)
    return separator.join(
        f"[sample {index}] {_text(text)}" for index, text in enumerate(data) if _text(text)
    )

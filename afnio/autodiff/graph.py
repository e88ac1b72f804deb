"""Graph nodes: the backward half of every recorded operation.

A :class:`Node` is created for each operation run under grad mode; its ``next_functions`` point
at the nodes (or :class:`AccumulateGrad` sinks, for leaves) that produced its inputs, in the flat
order of the operation's arguments. Every node carries a sequence number from forward, which the
engine uses to order gradients deterministically.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

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
    runs in a worker thread (it may block) unless it sets ``inline = True``.

    Args:
        next_functions: Edges to the producers of this operation's inputs, in flat order.
        outputs: The Variables the forward operation returned (only their roles and shapes are
            kept).
    """

    is_async = False
    inline = False

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

    def apply(self, grad_outputs: list[Variable | None]) -> Sequence[Variable | None]:
        """Append the (non-``None``) gradient to the leaf's ``grad`` list."""
        if grad_outputs and grad_outputs[0] is not None:
            self.variable.grad.append(grad_outputs[0])
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

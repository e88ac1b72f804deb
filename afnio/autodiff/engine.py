"""The backward engine: runs a graph's nodes concurrently, with a deterministic result.

1. Walk the graph from the roots and count, for every node, the edges that feed it.
2. A node is *ready* once every consumer has delivered; its incoming gradients are combined in
   descending sequence order of their producers (so arrival order never matters).
3. Ready async nodes become tasks on the loop and synchronous ones that may block run in worker
   threads, so independent branches (and the LLM calls inside them) overlap; quick pure-Python
   nodes (``inline``) run directly. A *streaming* node (``streams = True``) hands over each
   input's gradient the moment it has it, so the nodes upstream of that input start while its
   slower gradients are still being computed.
4. Gradients for leaves are collected and appended at the end in the order a sequential engine
   (highest sequence number first) would produce them. If any node fails, no leaf is touched.

Variable hooks (``Variable.register_hook``) run on a non-leaf's combined gradient just before its
node runs, and on each leaf gradient, in that final order, just before it is appended.
:func:`grad` runs the same walk but returns the inputs' gradients instead of appending them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from afnio._runtime import run
from afnio._variable import Variable, validate_data
from afnio.autodiff.graph import (
    FREED_GRAPH_MESSAGE,
    AccumulateGrad,
    GradientEdge,
    Node,
    combine_gradients,
    empty_gradient,
    gradient_edge,
    gradient_role,
)

__all__ = ["abackward", "agrad", "backward", "grad"]

# (producer sequence number, position among the producer's edges, gradient)
Delivery = tuple[float, int, Variable]
_ROOT = float("inf")


@functools.cache
def _workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=64, thread_name_prefix="afnio-node")


def _off_loop(node: Node, grads: list[Variable | None]) -> asyncio.Future:
    """Run a synchronous node in a worker thread (with the caller's context variables)."""
    context = contextvars.copy_context()
    return asyncio.get_running_loop().run_in_executor(_workers(), context.run, node.apply, grads)


def _delivery_order(delivery: Delivery) -> tuple[float, int]:
    """Sort key: the latest producer first, then the producer's edge order."""
    return -delivery[0], delivery[1]


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, Variable):
        return [value]
    return list(value)


def _root_gradient(root: Variable, gradient: Any) -> Variable:
    if gradient is None:
        data = root.data
        text = [str(item) for item in data] if isinstance(data, list) else str(data)
        return Variable(text, role=gradient_role(root.role))
    if not isinstance(gradient, Variable):
        gradient = Variable(validate_data(gradient), role=gradient_role(root.role))
    if gradient.batch_size != root.batch_size:
        raise ValueError(
            f"backward: gradient for Variable with role {root.role!r} must have its shape "
            f"(batch size {root.batch_size}), got batch size {gradient.batch_size}"
        )
    return gradient


def _check_delivery(producer: Node, edge: GradientEdge, gradient: Variable) -> None:
    role, batch_size = edge.node.output_info(edge.output_nr)
    if gradient.batch_size != batch_size:
        raise RuntimeError(
            f"{producer.name()} sent a gradient of batch size {gradient.batch_size} to a Variable "
            f"with role {role!r} of batch size {batch_size}"
        )


class _GraphTask:
    """The state of one backward call."""

    def __init__(
        self, roots: list[tuple[GradientEdge, Variable]], retain_graph: bool, inputs: list
    ) -> None:
        self.retain_graph = retain_graph
        # Combined gradients of non-leaf inputs= targets (what grad() returns for them).
        self.captured: dict[tuple[Node, int], Variable] = {}
        self.dependencies: dict[Node, int] = {}
        self.buffers: dict[Node, dict[int, list[Delivery]]] = {}
        self.leaf_deliveries: dict[AccumulateGrad, list[Delivery]] = {}
        # Non-leaf inputs= targets, and (variable, gradient) pairs for every retained non-leaf;
        # like leaf gradients they are written only once the whole backward has succeeded.
        self.captures: dict[tuple[Node, int], Variable] = {}
        self.retained_updates: list[tuple[Variable, Variable]] = []
        root_nodes = []
        for edge, _ in roots:
            if edge.node not in root_nodes:
                root_nodes.append(edge.node)
        self._discover(root_nodes)
        # With inputs=: the nodes that lead to an input (``needed``) and, of those, the ones that
        # must run (``runnable``: an input lies further down); without inputs=, everything runs.
        self.runnable: set[Node] = set()
        self.needed = self._needed(inputs) if inputs else None
        for position, (edge, gradient) in enumerate(roots):
            self._deliver_to(edge, (_ROOT, position, gradient))
        self.ready = [node for node in root_nodes if self.dependencies.get(node, 0) == 0]

    def _discover(self, root_nodes: list[Node]) -> None:
        seen = set(root_nodes)
        stack = list(root_nodes)
        while stack:
            node = stack.pop()
            for next_node, _ in node.next_functions:
                if next_node is None:
                    continue
                self.dependencies[next_node] = self.dependencies.get(next_node, 0) + 1
                if next_node not in seen:
                    seen.add(next_node)
                    stack.append(next_node)
        self.nodes = seen

    def _needed(self, inputs: list[Variable]) -> set[Node]:
        """Nodes that lead to one of ``inputs`` (the rest need not run)."""
        targets: set[Node] = set()
        for variable in inputs:
            edge = gradient_edge(variable)
            if edge.node is None:
                raise RuntimeError(
                    f"backward: inputs= contains a Variable with role {variable.role!r} that "
                    "does not require grad"
                )
            if not isinstance(edge.node, AccumulateGrad):
                self.captures[(edge.node, edge.output_nr)] = variable
            targets.add(edge.node)
        needed: set[Node] = set()
        # Visit in ascending sequence order: producers come before their consumers.
        for node in sorted(self.nodes, key=lambda n: n.sequence_nr):
            if any(nxt in needed for nxt, _ in node.next_functions):
                self.runnable.add(node)
                needed.add(node)
            elif node in targets:
                needed.add(node)
        return needed

    def _deliver_to(self, edge: GradientEdge, delivery: Delivery) -> None:
        node = edge.node
        if isinstance(node, AccumulateGrad):
            if self.needed is None or node in self.needed:
                self.leaf_deliveries.setdefault(node, []).append(delivery)
        else:
            self.buffers.setdefault(node, {}).setdefault(edge.output_nr, []).append(delivery)

    def gradients_for(self, node: Node) -> list[Variable | None]:
        """Combine what ``node`` received into one gradient per output."""
        buffer = self.buffers.pop(node, {})
        grads: list[Variable | None] = []
        for output_nr in range(len(node.output_meta)):
            deliveries = buffer.get(output_nr)
            if not deliveries:
                grads.append(None)
                continue
            deliveries.sort(key=_delivery_order)
            role, batch_size = node.output_info(output_nr)
            combined = combine_gradients([d[2] for d in deliveries], role, batch_size)
            if node.variable_hooks:
                combined = node.hooked_gradient(output_nr, combined)
            grads.append(combined)
            key = (node, output_nr)
            captured = self.captures.get(key)
            if captured is not None:
                self.captured[key] = combined
            retained = node.retained.get(output_nr, captured)
            if retained is not None:
                self.retained_updates.append((retained, combined))
        return grads

    def should_run(self, node: Node) -> bool:
        return self.needed is None or node in self.runnable

    def deliver(self, node: Node, position: int, gradient: Variable | None) -> None:
        """Hand ``node``'s gradient for input ``position`` (``None``: none) to that input's
        producer, and queue the producer if it has now heard from every consumer."""
        edge = node.next_functions[position]
        target = edge.node
        if target is None:
            return
        if gradient is not None:
            _check_delivery(node, edge, gradient)
            self._deliver_to(edge, (node.sequence_nr, position, gradient))
        remaining = self.dependencies[target] - 1
        self.dependencies[target] = remaining
        if remaining == 0 and not isinstance(target, AccumulateGrad):
            self.ready.append(target)

    def complete(self, node: Node, results: Sequence[Variable | None], ran: bool = True) -> None:
        """Deliver all of ``node``'s input gradients at once (a node that returns them)."""
        if len(results) != len(node.next_functions):
            raise RuntimeError(
                f"{node.name()} returned {len(results)} gradients for "
                f"{len(node.next_functions)} inputs"
            )
        for position, gradient in enumerate(results):
            self.deliver(node, position, gradient)
        if ran and not self.retain_graph:
            node.release()

    def leaf_gradients(self) -> list[tuple[AccumulateGrad, Variable]]:
        """Every leaf gradient after its leaf's hooks, in the order a sequential engine appends
        them: latest producer first, then the producer's edge order (a unique key)."""
        ordered = sorted(
            (-seq, position, id(sink), sink, gradient)
            for sink, deliveries in self.leaf_deliveries.items()
            for seq, position, gradient in deliveries
        )
        return [(sink, sink.hooked_gradient(0, gradient)) for *_, sink, gradient in ordered]

    def accumulate(self) -> None:
        """Write the results into ``grad`` lists (only once every hook has succeeded)."""
        sinks = self.leaf_deliveries
        hooked = self.leaf_gradients() if any(s.variable._hooks for s in sinks) else None
        for variable, gradient in self.retained_updates:
            variable.grad.append(gradient)
        if hooked is not None:
            for sink, gradient in hooked:
                sink.variable.grad.append(gradient)
            return
        # Without hooks only each leaf's own order is observable: sort leaf by leaf (cheap).
        for sink, deliveries in sinks.items():
            deliveries.sort(key=_delivery_order)
            sink.variable.grad.extend(d[2] for d in deliveries)


class _Run:
    """Runs a graph task's nodes as they become ready, until all are done or one fails."""

    def __init__(self, task: _GraphTask) -> None:
        self.task = task
        self.running: set[asyncio.Future] = set()
        self.finished = asyncio.get_running_loop().create_future()

    async def __call__(self) -> None:
        try:
            self.launch()
            await self.finished
        finally:
            for job in self.running:
                job.cancel()
            if self.running:
                await asyncio.gather(*self.running, return_exceptions=True)

    def launch(self) -> None:
        """Start every ready node (inline ones run at once, and may make more nodes ready)."""
        task = self.task
        while task.ready and not self.finished.done():
            node = task.ready.pop()
            grads = task.gradients_for(node)
            if not task.should_run(node):
                task.complete(node, [None] * len(node.next_functions), ran=False)
                continue
            if node.freed:
                raise RuntimeError(FREED_GRAPH_MESSAGE)
            if node.inline:
                task.complete(node, node.apply(grads))
                continue
            if node.streams:
                job = asyncio.ensure_future(self.stream(node, grads))
            elif node.is_async:
                job = asyncio.ensure_future(node.aapply(grads))
            else:
                job = _off_loop(node, grads)
            self.running.add(job)
            job.add_done_callback(functools.partial(self.done, node))
        if not self.running and not self.finished.done():
            self.finished.set_result(None)

    async def stream(self, node: Node, grads: list[Variable | None]) -> None:
        """Deliver each gradient a streaming node yields as soon as it comes."""
        waiting = set(range(len(node.next_functions)))
        async with contextlib.aclosing(node.astream(grads)) as gradients:
            async for position, gradient in gradients:
                if position not in waiting:
                    raise RuntimeError(
                        f"{node.name()} delivered a gradient for input {position} "
                        + ("twice" if 0 <= position < len(node.next_functions) else
                           f"but has {len(node.next_functions)} inputs")
                    )
                waiting.discard(position)
                self.task.deliver(node, position, gradient)
                self.launch()
        for position in sorted(waiting):
            self.task.deliver(node, position, None)
        if not self.task.retain_graph:
            node.release()

    def done(self, node: Node, job: asyncio.Future) -> None:
        self.running.discard(job)
        if self.finished.done():
            return
        if job.cancelled():
            self.finished.cancel()
            return
        try:
            result = job.result()
            if not node.streams:
                self.task.complete(node, result)
            self.launch()
        except Exception as error:  # the first failure ends the run (the rest are cancelled)
            self.finished.set_exception(error)


async def _execute(task: _GraphTask) -> None:
    await _Run(task)()


def pair_roots_with_gradients(
    variables: Variable | Sequence[Variable], grad_variables: Any
) -> list[tuple[Variable, Variable]]:
    """Match each root with its initial gradient (see :func:`backward` for the accepted forms)."""
    roots = _as_list(variables)
    per_root = isinstance(grad_variables, (list, tuple)) and (
        len(roots) > 1 or any(isinstance(g, Variable) for g in grad_variables)
    )
    grads = list(grad_variables) if per_root else [grad_variables] * len(roots)
    if len(grads) != len(roots):
        raise ValueError(f"backward: got {len(grads)} gradients for {len(roots)} variables")
    pairs = []
    for index, (root, gradient) in enumerate(zip(roots, grads)):
        if not root.requires_grad:
            raise RuntimeError(
                f"element {index} of variables (role {root.role!r}) does not require grad and "
                "does not have a grad_fn"
            )
        pairs.append((root, _root_gradient(root, gradient)))
    return pairs


def _prepare(
    variables: Variable | Sequence[Variable],
    grad_variables: Any,
    retain_graph: bool | None,
    inputs: Variable | Sequence[Variable] | None,
) -> _GraphTask:
    edges = [
        (gradient_edge(root), gradient)
        for root, gradient in pair_roots_with_gradients(variables, grad_variables)
    ]
    return _GraphTask(edges, bool(retain_graph), _as_list(inputs))


async def _backward(*args: Any) -> None:
    task = _prepare(*args)
    await _execute(task)
    task.accumulate()


async def abackward(
    variables: Variable | Sequence[Variable],
    grad_variables: Any = None,
    retain_graph: bool | None = None,
    inputs: Variable | Sequence[Variable] | None = None,
) -> None:
    """Awaitable twin of :func:`backward`."""
    await _backward(variables, grad_variables, retain_graph, inputs)


def backward(
    variables: Variable | Sequence[Variable],
    grad_variables: Any = None,
    retain_graph: bool | None = None,
    inputs: Variable | Sequence[Variable] | None = None,
) -> None:
    """Compute and accumulate textual gradients of ``variables`` into the graph's leaves.

    Args:
        variables: The root(s) to differentiate.
        grad_variables: Feedback on each root (a Variable, raw text or a batch of texts). ``None``
            uses each root's own data as its feedback.
        retain_graph: Keep saved state so the graph can be walked again.
        inputs: Only these Variables receive gradients, and only nodes leading to them run.

    Example:
        >>> import afnio
        >>> x = afnio.Variable("hi", role="greeting", requires_grad=True)
        >>> y = x + " there"
        >>> afnio.autodiff.backward(y, afnio.Variable("be warmer"))
        >>> [g.data for g in x.grad]
        ['be warmer']
    """
    run(_backward(variables, grad_variables, retain_graph, inputs))


def _grad_inputs(inputs: Variable | Sequence[Variable]) -> list[Variable]:
    variables = _as_list(inputs)
    if not variables:
        raise RuntimeError("grad: inputs must hold at least one Variable")
    for index, variable in enumerate(variables):
        if not isinstance(variable, Variable):
            raise TypeError(
                f"grad: element {index} of inputs must be a Variable, got {type(variable).__name__}"
            )
        if not variable.requires_grad:
            raise RuntimeError(
                f"grad: element {index} of inputs (role {variable.role!r}) does not require grad; "
                "one of the differentiated Variables must be part of the graph"
            )
    return variables


async def agrad(
    outputs: Variable | Sequence[Variable],
    inputs: Variable | Sequence[Variable],
    grad_outputs: Any = None,
    retain_graph: bool | None = None,
    allow_unused: bool | None = None,
    materialize_grads: bool = False,
) -> tuple[Variable | None, ...]:
    """Awaitable twin of :func:`grad`, for code already running on an event loop.

    Example:
        >>> import asyncio
        >>> x = Variable(["a", "b"], role="drafts", requires_grad=True)
        >>> async def main():
        ...     return await agrad(x + "!", x, Variable(["shorter", ""]))
        >>> [g.data for g in asyncio.run(main())]
        [['shorter', '']]
    """
    if allow_unused is None:
        allow_unused = materialize_grads
    elif materialize_grads and not allow_unused:
        raise ValueError(
            "grad: expected allow_unused to be True or not passed when materialize_grads=True, "
            "but got allow_unused=False"
        )
    variables = _grad_inputs(inputs)
    task = _prepare(outputs, grad_outputs, retain_graph, variables)
    await _execute(task)  # no task.accumulate(): nothing is written to any grad
    pieces: dict[AccumulateGrad, list[Variable]] = {}
    for sink, gradient in task.leaf_gradients():
        pieces.setdefault(sink, []).append(gradient)
    results: list[Variable | None] = []
    for index, variable in enumerate(variables):
        edge = gradient_edge(variable)
        if isinstance(edge.node, AccumulateGrad):
            found = pieces.get(edge.node)
            gradient = (
                combine_gradients(found, variable.role, variable.batch_size) if found else None
            )
        else:
            gradient = task.captured.get((edge.node, edge.output_nr))
        if gradient is None:
            if not allow_unused:
                raise RuntimeError(
                    f"grad: element {index} of inputs (role {variable.role!r}) appears to not have "
                    "been used in the graph (no gradient reached it); pass allow_unused=True if "
                    "this is the desired behavior"
                )
            if materialize_grads:
                gradient = empty_gradient(variable.role, variable.batch_size)
        results.append(gradient)
    return tuple(results)


def grad(
    outputs: Variable | Sequence[Variable],
    inputs: Variable | Sequence[Variable],
    grad_outputs: Any = None,
    retain_graph: bool | None = None,
    allow_unused: bool | None = None,
    materialize_grads: bool = False,
) -> tuple[Variable | None, ...]:
    """Compute and return the gradients of ``inputs``, like ``torch.autograd.grad``.

    The graph is walked exactly as :func:`backward` walks it with ``inputs=`` (same nodes run,
    same hooks, same combination order), but no ``grad`` list is written — neither the inputs'
    nor any retained non-leaf's. Each input gets **one** gradient Variable: for a leaf, the
    pieces :func:`backward` would append to its ``grad``, combined in that order (a single
    piece is returned as is); for a non-leaf, the combined gradient :meth:`Variable.retain_grad`
    would store.

    Args:
        outputs: The root(s) to differentiate.
        inputs: The Variable(s) whose gradients are returned (leaves or non-leaves).
        grad_outputs: Feedback on each root, as ``grad_variables`` of :func:`backward`
            (``None``: each root's own data).
        retain_graph: Keep saved state so the graph can be walked again.
        allow_unused: Return ``None`` for an input no gradient reached instead of raising.
            Defaults to ``materialize_grads``.
        materialize_grads: Return empty feedback (``""``, or a batch of ``""``) instead of
            ``None`` for unused inputs.

    Returns:
        A tuple with one gradient (or ``None``) per input, in the order of ``inputs``.

    Raises:
        RuntimeError: If an input does not require grad, or no gradient reached an input and
            ``allow_unused`` is false.
        ValueError: If ``materialize_grads=True`` with ``allow_unused=False``.

    Example:
        >>> import afnio
        >>> x = afnio.Variable("hi", role="greeting", requires_grad=True)
        >>> y = x + " there"
        >>> (g,) = afnio.autodiff.grad(y, x, afnio.Variable("be warmer"))
        >>> g.data, x.grad
        ('be warmer', [])
    """
    return run(
        agrad(outputs, inputs, grad_outputs, retain_graph, allow_unused, materialize_grads)
    )

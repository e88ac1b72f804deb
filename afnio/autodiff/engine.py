"""The backward engine: runs a graph's nodes concurrently, with a deterministic result.

1. Walk the graph from the roots and count, for every node, the edges that feed it.
2. A node is *ready* once every consumer has delivered; its incoming gradients are combined in
   descending sequence order of their producers (so arrival order never matters).
3. Ready async nodes become tasks on the loop and synchronous ones that may block run in worker
   threads, so independent branches (and the LLM calls inside them) overlap; quick pure-Python
   nodes (``inline``) run directly.
4. Gradients for leaves are collected and appended at the end in the order a sequential engine
   (highest sequence number first) would produce them. If any node fails, no leaf is touched.
"""

from __future__ import annotations

import asyncio
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
    gradient_edge,
    gradient_role,
)

__all__ = ["abackward", "backward"]

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
            grads.append(combined)
            retained = node.retained.get(output_nr, self.captures.get((node, output_nr)))
            if retained is not None:
                self.retained_updates.append((retained, combined))
        return grads

    def should_run(self, node: Node) -> bool:
        return self.needed is None or node in self.runnable

    def complete(self, node: Node, results: Sequence[Variable | None], ran: bool = True) -> None:
        """Deliver ``node``'s input gradients and queue the nodes that became ready."""
        if len(results) != len(node.next_functions):
            raise RuntimeError(
                f"{node.name()} returned {len(results)} gradients for "
                f"{len(node.next_functions)} inputs"
            )
        for position, (edge, gradient) in enumerate(zip(node.next_functions, results)):
            if edge.node is None:
                continue
            if gradient is not None:
                _check_delivery(node, edge, gradient)
                self._deliver_to(edge, (node.sequence_nr, position, gradient))
            remaining = self.dependencies[edge.node] - 1
            self.dependencies[edge.node] = remaining
            if remaining == 0 and not isinstance(edge.node, AccumulateGrad):
                self.ready.append(edge.node)
        if ran and not self.retain_graph:
            node.release()

    def accumulate(self) -> None:
        for variable, gradient in self.retained_updates:
            variable.grad.append(gradient)
        for sink, deliveries in self.leaf_deliveries.items():
            deliveries.sort(key=_delivery_order)
            sink.variable.grad.extend(d[2] for d in deliveries)


async def _execute(task: _GraphTask) -> None:
    running: dict[asyncio.Task, Node] = {}
    try:
        while task.ready or running:
            while task.ready:
                node = task.ready.pop()
                grads = task.gradients_for(node)
                if not task.should_run(node):
                    task.complete(node, [None] * len(node.next_functions), ran=False)
                    continue
                if node.freed:
                    raise RuntimeError(FREED_GRAPH_MESSAGE)
                if node.inline:
                    task.complete(node, node.apply(grads))
                elif node.is_async:
                    running[asyncio.ensure_future(node.aapply(grads))] = node
                else:
                    running[_off_loop(node, grads)] = node
            if running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for finished in sorted(done, key=lambda t: -running[t].sequence_nr):
                    task.complete(running.pop(finished), finished.result())
    finally:
        for pending in running:
            pending.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    task.accumulate()


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


async def abackward(
    variables: Variable | Sequence[Variable],
    grad_variables: Any = None,
    retain_graph: bool | None = None,
    inputs: Variable | Sequence[Variable] | None = None,
) -> None:
    """Awaitable twin of :func:`backward`."""
    await _execute(_prepare(variables, grad_variables, retain_graph, inputs))


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
    run(_execute(_prepare(variables, grad_variables, retain_graph, inputs)))

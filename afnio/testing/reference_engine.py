"""A sequential reference backward engine, the yardstick for the concurrent one.

It runs one node at a time, always the ready node with the highest sequence number, and appends
each gradient to its leaf (after the leaf's hooks) the moment it is produced. The concurrent
engine in :mod:`afnio.autodiff.engine` must leave exactly the same ``grad`` lists and call leaf
hooks in the same order.
"""

from __future__ import annotations

import heapq
import inspect
from collections.abc import Sequence
from typing import Any

from afnio._runtime import run
from afnio._variable import Variable
from afnio.autodiff.engine import pair_roots_with_gradients
from afnio.autodiff.graph import AccumulateGrad, Node, combine_gradients, gradient_edge

__all__ = ["reference_backward"]


def reference_backward(roots: Variable | Sequence[Variable], gradients: Any = None) -> None:
    """Backward through the graph of ``roots`` one node at a time (no ``inputs=``, graph kept).

    Args:
        roots: The Variable(s) to differentiate.
        gradients: Feedback for each root (Variables or raw data); ``None`` uses each root's data.
    """
    run(_reference(roots, gradients))


async def _reference(roots: Variable | Sequence[Variable], gradients: Any) -> None:
    pairs = pair_roots_with_gradients(roots, gradients)
    dependencies: dict[Node, int] = {}
    seen: set[Node] = set()
    stack = [gradient_edge(root).node for root, _ in pairs]
    seen.update(stack)
    while stack:
        node = stack.pop()
        for next_node, _ in node.next_functions:
            if next_node is not None:
                dependencies[next_node] = dependencies.get(next_node, 0) + 1
                if next_node not in seen:
                    seen.add(next_node)
                    stack.append(next_node)
    buffers: dict[Node, dict[int, list[Variable]]] = {}
    heap: list[tuple[int, int, Node]] = []

    def deliver(node: Node, output_nr: int, gradient: Variable) -> None:
        if isinstance(node, AccumulateGrad):
            node.variable.grad.append(node.hooked_gradient(0, gradient))
        else:
            buffers.setdefault(node, {}).setdefault(output_nr, []).append(gradient)

    for root, gradient in pairs:
        edge = gradient_edge(root)
        deliver(edge.node, edge.output_nr, gradient)
    for node in seen:
        if dependencies.get(node, 0) == 0 and not isinstance(node, AccumulateGrad):
            heapq.heappush(heap, (-node.sequence_nr, id(node), node))
    while heap:
        _, _, node = heapq.heappop(heap)
        buffer = buffers.pop(node, {})
        grads = []
        for output_nr in range(len(node.output_meta)):
            pieces = buffer.get(output_nr)
            role, batch_size = node.output_info(output_nr)
            combined = combine_gradients(pieces, role, batch_size) if pieces else None
            grads.append(None if combined is None else node.hooked_gradient(output_nr, combined))
        result = node.aapply(grads) if node.is_async else node.apply(grads)
        if inspect.isawaitable(result):
            result = await result
        for (next_node, output_nr), gradient in zip(node.next_functions, result):
            if next_node is None:
                continue
            if gradient is not None:
                deliver(next_node, output_nr, gradient)
            dependencies[next_node] -= 1
            if dependencies[next_node] == 0 and not isinstance(next_node, AccumulateGrad):
                heapq.heappush(heap, (-next_node.sequence_nr, id(next_node), next_node))

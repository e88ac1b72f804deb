"""Backward overhead of the engine on graphs of non-LLM ops (no model calls at all).

Two shapes per size: a chain (each Add feeds the next) and a balanced tree (pairwise Adds over
leaves, so fan-in and many leaves). Prints seconds per backward and microseconds per node.

Run: python benchmarks/engine_overhead.py
"""

from __future__ import annotations

import time

import afnio
from afnio import Variable


def chain(nodes: int) -> tuple[Variable, list[Variable]]:
    leaf = Variable(0, role="start", requires_grad=True)
    out = leaf
    for _ in range(nodes):
        out = out + 1
    return out, [leaf]


def tree(nodes: int) -> tuple[Variable, list[Variable]]:
    leaves = [Variable(i, role=f"leaf {i}", requires_grad=True) for i in range(nodes + 1)]
    level = list(leaves)
    while len(level) > 1:
        paired = [a + b for a, b in zip(level[0::2], level[1::2])]
        level = paired + level[len(paired) * 2 :]
    return level[0], leaves


def measure(build, nodes: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        root, _ = build(nodes)
        start = time.perf_counter()
        root.backward(Variable("make it larger"))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    afnio.autodiff.backward(Variable("warm", requires_grad=True) + "up", "x")
    print(f"{'graph':<8}{'nodes':>9}{'backward s':>13}{'us/node':>10}")
    for build in (chain, tree):
        for nodes in (1_000, 10_000, 100_000):
            seconds = measure(build, nodes, repeats=3 if nodes < 100_000 else 1)
            print(f"{build.__name__:<8}{nodes:>9}{seconds:>13.4f}{seconds / nodes * 1e6:>10.2f}")


if __name__ == "__main__":
    main()

"""Wall time of independent branches whose backward is synchronous and blocks.

Four branches, each a Function with a plain ``backward`` that sleeps 0.3 s (standing in for a
blocking model call), and the same with a GradComponent whose ``backward`` override is plain.
The engine runs synchronous nodes off its loop, so the branches overlap: about 0.3 s, not 1.2 s.

Run: python benchmarks/sync_branches.py
"""

from __future__ import annotations

import time

import afnio
from afnio import Variable
from afnio.autodiff import Function, Sum
from afnio.cognitive import GradComponent

BRANCHES, DELAY = 4, 0.3


class Blocking(Function):
    @staticmethod
    def forward(ctx, x):
        return Variable(x.data, role="blocking step")

    @staticmethod
    def backward(ctx, grad_output):
        time.sleep(DELAY)
        return grad_output


class BlockingComponent(GradComponent):
    def call(self, text):
        return text

    def backward(self, *, response, id=None, disable_backward_engine=False, **kwargs):
        time.sleep(DELAY)
        return [response.grad[0]]


def measure(step) -> float:
    leaves = [Variable(f"x{i}", role="leaf", requires_grad=True) for i in range(BRANCHES)]
    total = Sum.apply([step(leaf) for leaf in leaves])
    start = time.perf_counter()
    total.backward(Variable("feedback"))
    return time.perf_counter() - start


def main() -> None:
    component = BlockingComponent("passes its input on")
    print(f"{BRANCHES} branches, each blocking {DELAY} s in a synchronous backward")
    for name, step in (("Function", Blocking.apply), ("GradComponent", component)):
        print(f"  {name:<14} {measure(step):.3f} s  (sequential would be {BRANCHES * DELAY:.1f} s)")
    afnio.set_backward_model_client(None)


if __name__ == "__main__":
    main()

"""Properties of streaming backward: per-input delivery never changes the result.

Random graphs mix streaming ops (each input's gradient computed in its own task and yielded as it
finishes), returning async ops and inline ``+``. Every gradient a streaming op produces passes a
:class:`~afnio.testing.Turnstile` keyed by ``(op, input)``, which releases each wave of waiting
gradients reversed, rotated or in a seeded shuffle, so gradients reach the engine in an order
that differs from their inputs' order and interleaves with other nodes' deliveries. Leaves,
roots and ops carry distinct text and each op labels what it passes on, so a gradient delivered
to the wrong input, combined in arrival order or appended in arrival order changes a ``grad``
list that the sequential reference engine predicts exactly.
"""

import functools

from hypothesis import given
from hypothesis import strategies as st
from random_graphs import build as build_graph
from random_graphs import grads_of, graph_recipes, labelled, op_output

from afnio import Variable
from afnio.autodiff import Function, backward
from afnio.autodiff.feedback import as_finished
from afnio.testing import Turnstile, completion_orders, reference_backward


class StreamMix(Function):
    """Streams each input's labelled gradient once it has passed the turnstile."""

    @staticmethod
    def forward(ctx, label, gate, inputs):
        ctx.label, ctx.gate = label, gate
        ctx.sizes, out = op_output(label, inputs)
        return out

    @staticmethod
    async def backward(ctx, grad_output):
        async def one(i, size):
            if ctx.gate is not None:
                await ctx.gate.wait((ctx.label, i))
            return labelled(ctx.label, i, size, grad_output)

        async for i, gradient in as_finished([one(i, s) for i, s in enumerate(ctx.sizes)]):
            yield (2, i), gradient


class WholeMix(StreamMix):
    """Returns every input's labelled gradient at once, after passing the turnstile."""

    @staticmethod
    async def backward(ctx, grad_output):
        if ctx.gate is not None:
            await ctx.gate.wait((ctx.label, "all"))
        return None, None, [labelled(ctx.label, i, s, grad_output)
                            for i, s in enumerate(ctx.sizes)]


recipes = functools.partial(graph_recipes, ["stream", "stream", "whole", "add"], 4)


def build(recipe, gate):
    return build_graph(recipe, gate, {"stream": StreamMix, "whole": WholeMix})


@given(recipes(), completion_orders())
def test_streaming_engine_matches_sequential_reference(recipe, order):
    gate = Turnstile(order)
    leaves, roots, grads = build(recipe, gate)
    backward(roots, grads)
    expected_leaves, expected_roots, expected_grads = build(recipe, None)
    reference_backward(expected_roots, expected_grads)
    assert grads_of(leaves) == grads_of(expected_leaves)
    assert sorted(gate.releases, key=str) == sorted(gate.arrivals, key=str)


@given(recipes(), completion_orders(), st.data())
def test_streaming_with_inputs_restricts_gradients_to_the_chosen_leaves(recipe, order, data):
    leaves, roots, grads = build(recipe, Turnstile(order))
    chosen = data.draw(st.lists(st.sampled_from(range(len(leaves))), min_size=1, unique=True))
    backward(roots, grads, inputs=[leaves[i] for i in chosen])
    expected_leaves, expected_roots, expected_grads = build(recipe, None)
    reference_backward(expected_roots, expected_grads)
    full = grads_of(expected_leaves)
    assert grads_of(leaves) == [full[i] if i in chosen else [] for i in range(len(leaves))]


def test_the_turnstile_really_reorders_deliveries_within_and_across_nodes():
    """The property's premise: released gradients arrive out of input order."""
    gate = Turnstile("reverse")
    a, b, c = (Variable(n, role=n, requires_grad=True) for n in "abc")
    first = StreamMix.apply("first", gate, [a, b])
    second = StreamMix.apply("second", gate, [first, c])
    second.backward(Variable("fb"))
    assert gate.releases == [("second", 1), ("second", 0), ("first", 1), ("first", 0)]
    assert [g.data for g in a.grad] == ["first.0<second.0<fb>>"]
    assert [g.data for g in c.grad] == ["second.1<fb>"]

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

from hypothesis import given
from hypothesis import strategies as st

from afnio import Variable
from afnio.autodiff import Function, backward
from afnio.autodiff.feedback import as_finished
from afnio.testing import Turnstile, completion_orders, reference_backward


def _labelled(label, i, size, grad_output):
    if size is None:
        text = grad_output.data
        if isinstance(text, list):
            text = "|".join(text)
        return Variable(f"{label}.{i}<{text}>")
    return Variable([f"{label}.{i}<{t}>" for t in grad_output.data])


def _output(label, inputs):
    sizes = [v.batch_size for v in inputs]
    size = next((s for s in sizes if s is not None), None)
    text = f"{label}(" + ",".join(v.role for v in inputs) + ")"
    return sizes, Variable(text if size is None else [f"{text}e{i}" for i in range(size)],
                           role=label)


class StreamMix(Function):
    """Streams each input's labelled gradient once it has passed the turnstile."""

    @staticmethod
    def forward(ctx, label, gate, inputs):
        ctx.label, ctx.gate = label, gate
        ctx.sizes, out = _output(label, inputs)
        return out

    @staticmethod
    async def backward(ctx, grad_output):
        async def one(i, size):
            if ctx.gate is not None:
                await ctx.gate.wait((ctx.label, i))
            return _labelled(ctx.label, i, size, grad_output)

        async for i, gradient in as_finished([one(i, s) for i, s in enumerate(ctx.sizes)]):
            yield (2, i), gradient


class WholeMix(Function):
    """Returns every input's labelled gradient at once, after passing the turnstile."""

    @staticmethod
    def forward(ctx, label, gate, inputs):
        ctx.label, ctx.gate = label, gate
        ctx.sizes, out = _output(label, inputs)
        return out

    @staticmethod
    async def backward(ctx, grad_output):
        if ctx.gate is not None:
            await ctx.gate.wait((ctx.label, "all"))
        return None, None, [_labelled(ctx.label, i, s, grad_output)
                            for i, s in enumerate(ctx.sizes)]


@st.composite
def recipes(draw):
    batch = draw(st.sampled_from([None, 2, 3]))
    n_leaves = draw(st.integers(1, 4))
    leaf_batched = [draw(st.booleans()) and batch is not None for _ in range(n_leaves)]
    ops = []
    for k in range(draw(st.integers(2, 8))):
        picks = draw(st.lists(st.integers(0, n_leaves + k - 1), min_size=1, max_size=4))
        ops.append((draw(st.sampled_from(["stream", "stream", "whole", "add"])), picks))
    return batch, leaf_batched, ops, draw(st.integers(1, min(3, len(ops))))


def build(recipe, gate):
    batch, leaf_batched, ops, n_roots = recipe
    leaves = [
        Variable([f"l{i}e{k}" for k in range(batch)] if batched else f"l{i}", role=f"leaf{i}",
                 requires_grad=True)
        for i, batched in enumerate(leaf_batched)
    ]
    values = list(leaves)
    for k, (kind, picks) in enumerate(ops):
        chosen = [values[p] for p in picks]
        if kind == "add" and len(chosen) >= 2:
            values.append(chosen[0] + chosen[1])
        else:
            op = WholeMix if kind == "whole" else StreamMix
            values.append(op.apply(f"op{k}", gate, chosen))
    roots = [r for r in values[-n_roots:] if not r.is_leaf] or [values[-1]]
    grads = [
        Variable([f"root{i}e{k}" for k in range(r.batch_size)] if r.is_batched else f"root{i}")
        for i, r in enumerate(roots)
    ]
    return leaves, roots, grads


def grads_of(leaves):
    return [[g.data for g in leaf.grad] for leaf in leaves]


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

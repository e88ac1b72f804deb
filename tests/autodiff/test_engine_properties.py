"""Properties of the engine: concurrent == sequential reference, and argument flattening order."""

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from afnio import Variable
from afnio.autodiff import Function, backward
from afnio.autodiff.function import flatten_variables
from afnio.autodiff.graph import AccumulateGrad
from afnio.testing import reference_backward


class Mix(Function):
    """An op with an async backward that sleeps, then labels each input's gradient."""

    @staticmethod
    def forward(ctx, label, delays, inputs):
        ctx.label, ctx.delays = label, delays
        ctx.sizes = [v.batch_size for v in inputs]
        size = next((s for s in ctx.sizes if s is not None), None)
        text = f"{label}(" + ",".join(v.role for v in inputs) + ")"
        return Variable(text if size is None else [text] * size, role=label)

    @staticmethod
    async def backward(ctx, grad_output):
        delay = ctx.delays.pop(0) if ctx.delays else 0.0
        await asyncio.sleep(delay)
        grads = []
        for i, size in enumerate(ctx.sizes):
            if size is None:
                text = grad_output.data
                if isinstance(text, list):
                    text = "|".join(text)
                grads.append(Variable(f"{ctx.label}.{i}<{text}>"))
            else:
                grads.append(Variable([f"{ctx.label}.{i}<{t}>" for t in grad_output.data]))
        return None, None, grads


@st.composite
def dag_recipes(draw):
    batch = draw(st.sampled_from([None, 2]))
    n_leaves = draw(st.integers(1, 4))
    leaf_batched = [draw(st.booleans()) and batch is not None for _ in range(n_leaves)]
    n_ops = draw(st.integers(1, 8))
    ops = []
    for k in range(n_ops):
        pool = n_leaves + k
        picks = draw(st.lists(st.integers(0, pool - 1), min_size=1, max_size=3))
        kind = draw(st.sampled_from(["mix", "mix", "add"]))
        ops.append((kind, picks))
    n_roots = draw(st.integers(1, min(3, n_ops)))
    delays = draw(st.lists(st.sampled_from([0.0, 0.001, 0.004]), min_size=n_ops, max_size=n_ops))
    return batch, leaf_batched, ops, n_roots, delays


def build(recipe, delays):
    batch, leaf_batched, ops, n_roots, _ = recipe
    leaves = [
        Variable([f"l{i}"] * batch if batched else f"l{i}", role=f"leaf{i}", requires_grad=True)
        for i, batched in enumerate(leaf_batched)
    ]
    values = list(leaves)
    for k, (kind, picks) in enumerate(ops):
        chosen = [values[p] for p in picks]
        if kind == "add" and len(chosen) >= 2:
            out = chosen[0] + chosen[1]
        else:
            out = Mix.apply(f"op{k}", [delays[k]], chosen)
        values.append(out)
    roots = values[-n_roots:]
    roots = [r for r in roots if not r.is_leaf] or [values[-1]]
    return leaves, roots


@given(dag_recipes())
def test_concurrent_engine_matches_sequential_reference(recipe):
    delays = recipe[-1]
    leaves_a, roots_a = build(recipe, delays)
    leaves_b, roots_b = build(recipe, [0.0] * len(delays))
    grads = [
        Variable([f"root{i}"] * r.batch_size if r.is_batched else f"root{i}")
        for i, r in enumerate(roots_a)
    ]
    backward(roots_a, grads)
    reference_backward(roots_b, grads)
    assert [[g.data for g in leaf.grad] for leaf in leaves_a] == [
        [g.data for g in leaf.grad] for leaf in leaves_b
    ]


nested = st.recursive(
    st.one_of(st.just("plain"), st.integers(0, 9).map(lambda i: ("var", i))),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from("abc"), children, max_size=3),
    ),
    max_leaves=12,
)


def materialize(spec, made):
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "var":
        variable = Variable(f"v{len(made)}", requires_grad=True)
        made.append(variable)
        return variable
    if isinstance(spec, list):
        return [materialize(item, made) for item in spec]
    if isinstance(spec, tuple):
        return tuple(materialize(item, made) for item in spec)
    if isinstance(spec, dict):
        return {key: materialize(value, made) for key, value in spec.items()}
    return spec


class Collect(Function):
    @staticmethod
    def forward(ctx, first, second=None, **extra):
        return Variable("out")

    @staticmethod
    def backward(ctx, grad_output):
        return (None,) * len(ctx.needs_input_grad)


@given(nested, nested, nested)
def test_flat_order_equals_next_functions_order(first, second, extra):
    made = []
    a, b, c = (materialize(spec, made) for spec in (first, second, extra))
    seed = Variable("seed", requires_grad=True)  # guarantees a graph is recorded
    out = Collect.apply([seed, a], second=b, extra=c)
    expected = [seed, *made]
    assert list(flatten_variables([[seed, a], b, c])) == expected
    sinks = [edge.node for edge in out.grad_fn.next_functions]
    assert all(isinstance(node, AccumulateGrad) for node in sinks)
    assert [node.variable for node in sinks] == expected


def mirror(value, keep):
    """``value``'s structure with a gradient naming each Variable (None where ``keep`` says no)."""
    if isinstance(value, Variable):
        return Variable(f"grad of {value.data}") if keep(value) else None
    if isinstance(value, (list, tuple)):
        return type(value)(mirror(item, keep) for item in value)
    if isinstance(value, dict):
        return {key: mirror(item, keep) for key, item in value.items()}
    return None


def _even(variable):
    return variable.data[-1] in "02468"


class Mirror(Function):
    @staticmethod
    def forward(ctx, first, second=None, **extra):
        ctx.arguments = (first, second, *extra.values())
        return Variable("out")

    @staticmethod
    def backward(ctx, grad_output):
        return tuple(mirror(argument, _even) for argument in ctx.arguments)


@given(nested, nested, nested)
def test_container_gradients_reach_their_own_variables(first, second, extra):
    made = []
    a, b, c = (materialize(spec, made) for spec in (first, second, extra))
    seed = Variable("seed", requires_grad=True)
    Mirror.apply([seed, a], second=b, extra=c).backward(Variable("fb"))
    for variable in made:
        expected = [f"grad of {variable.data}"] if _even(variable) else []
        assert [g.data for g in variable.grad] == expected
    assert seed.grad == []

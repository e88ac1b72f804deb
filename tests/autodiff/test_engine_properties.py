"""Properties of the engine: concurrent == sequential reference under adversarial completion
orders (several roots, shared leaves, fan-in, retain_graph, inputs=), and argument flattening
order.

Every leaf, root and consumer carries distinct text, and each op's backward labels what it passes
on, so a gradient delivered to the wrong leaf, combined in the wrong order or appended in
completion order shows up as a different ``grad`` list. A :class:`~afnio.testing.Turnstile`
decides which async backward finishes first (reverse, rotated, seeded shuffles), so the
derandomized CI profile exercises completion orders that differ from start order on every run.
"""

import functools

from hypothesis import given
from hypothesis import strategies as st
from random_graphs import build as build_graph
from random_graphs import grads_of, graph_recipes, labelled, op_output

from afnio import Variable
from afnio.autodiff import Function, backward
from afnio.autodiff.function import flatten_variables
from afnio.autodiff.graph import AccumulateGrad
from afnio.testing import Turnstile, completion_orders, reference_backward


class Mix(Function):
    """An op with an async backward that waits for its turn, then labels each input's gradient
    with the op's name and the input's position (so the route a gradient took is in its text)."""

    @staticmethod
    def forward(ctx, label, gate, inputs):
        ctx.label, ctx.gate = label, gate
        ctx.sizes, out = op_output(label, inputs)
        return out

    @staticmethod
    async def backward(ctx, grad_output):
        if ctx.gate is not None:
            await ctx.gate.wait(ctx.label)
        return None, None, [labelled(ctx.label, i, size, grad_output)
                            for i, size in enumerate(ctx.sizes)]


dag_recipes = functools.partial(graph_recipes, ["mix", "mix", "add"], 3)


def build(recipe, gate):
    return build_graph(recipe, gate, {"mix": Mix})


def reference_grads(recipe, times=1):
    leaves, roots, grads = build(recipe, None)
    for _ in range(times):
        reference_backward(roots, grads)
    return grads_of(leaves)


@given(dag_recipes(), completion_orders())
def test_concurrent_engine_matches_sequential_reference(recipe, order):
    gate = Turnstile(order)
    leaves, roots, grads = build(recipe, gate)
    backward(roots, grads)
    assert grads_of(leaves) == reference_grads(recipe)
    # Every async backward went through the turnstile exactly once.
    assert sorted(gate.releases) == sorted(gate.arrivals)


@given(dag_recipes(), completion_orders(), completion_orders())
def test_retain_graph_repeats_the_same_gradients(recipe, first, second):
    gates = [Turnstile(first), Turnstile(second)]
    leaves, roots, grads = build(recipe, None)
    for node_gate in gates:
        _set_gate(roots, node_gate)
        backward(roots, grads, retain_graph=True)
    assert grads_of(leaves) == reference_grads(recipe, times=2)


def _set_gate(roots, gate):
    """Point every Mix node under ``roots`` at ``gate`` (the ctx outlives a retained backward)."""
    stack, seen = [r.grad_fn for r in roots if r.grad_fn is not None], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "ctx") and hasattr(node.ctx, "gate"):
            node.ctx.gate = gate
        stack.extend(next_node for next_node, _ in node.next_functions)


@given(dag_recipes(), completion_orders(), st.data())
def test_inputs_restricts_gradients_to_the_chosen_leaves(recipe, order, data):
    leaves, roots, grads = build(recipe, Turnstile(order))
    chosen = data.draw(st.lists(st.sampled_from(range(len(leaves))), min_size=1, unique=True))
    backward(roots, grads, inputs=[leaves[i] for i in chosen])
    full = reference_grads(recipe)
    assert grads_of(leaves) == [full[i] if i in chosen else [] for i in range(len(leaves))]


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

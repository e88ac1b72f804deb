"""``afnio.autodiff.grad``: torch.autograd.grad for textual gradients.

torch's rules mirrored here: the gradients of ``inputs`` are returned and no ``.grad`` is
written; an input no gradient reaches raises unless ``allow_unused=True`` (then ``None``), and
``materialize_grads=True`` gives a zero-like (here: empty) gradient instead; an input that does
not require grad raises; the graph is freed unless ``retain_graph=True``.
"""

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio import Variable
from afnio.autodiff import Function, agrad, backward, grad
from afnio.autodiff.graph import FAN_IN_SEPARATOR
from afnio.testing import reference_backward


class Tag(Function):
    calls: list[str] = []

    @staticmethod
    def forward(ctx, label, *inputs):
        ctx.label = label
        ctx.shapes = [v.batch_size for v in inputs]
        return Variable("+".join(str(v.data) for v in inputs), role=f"tag {label}")

    @staticmethod
    def backward(ctx, grad_output):
        Tag.calls.append(ctx.label)
        grads = []
        for i, size in enumerate(ctx.shapes):
            text = f"{ctx.label}[{i}]({grad_output.data})"
            grads.append(Variable(text if size is None else [text] * size))
        return (None, *grads)


def fan_in_graph():
    x = Variable("x", role="x", requires_grad=True)
    y = Variable("y", role="y", requires_grad=True)
    a, b = Tag.apply("a", x), Tag.apply("b", x, y)
    mid = Tag.apply("m", a, b)
    mid.retain_grad()
    return x, y, mid, Tag.apply("r", mid, x)


def test_returns_gradients_without_touching_any_grad():
    x, y, mid, root = fan_in_graph()
    gx, gy = grad(root, [x, y], Variable("fb"))
    assert x.grad == [] and y.grad == [] and mid.grad == []
    assert gy.data == "b[1](m[1](r[0](fb)))"
    # x got three gradients; grad() combines them in the order backward appends them.
    twin_x, _, _, twin_root = fan_in_graph()
    twin_root.backward(Variable("fb"))
    pieces = [g.data for g in twin_x.grad]
    assert pieces == ["r[1](fb)", "b[0](m[1](r[0](fb)))", "a[0](m[0](r[0](fb)))"]
    assert gx.data == FAN_IN_SEPARATOR.join(pieces) and gx.role == "feedback to x"


def test_a_single_gradient_is_returned_as_is_and_one_per_input_in_input_order():
    x, y, mid, root = fan_in_graph()
    gy, gmid = grad(root, (y, mid), Variable("fb"))
    assert gy.data == "b[1](m[1](r[0](fb)))"
    # A non-leaf input gets what retain_grad would store: its combined gradient.
    assert gmid.data == "r[0](fb)" and mid.grad == []


def test_only_nodes_leading_to_the_inputs_run():
    x = Variable("x", role="x", requires_grad=True)
    y = Variable("y", role="y", requires_grad=True)
    root = Tag.apply("r", Tag.apply("left", x), Tag.apply("right", y))
    Tag.calls = []
    (gy,) = grad(root, y, Variable("fb"))
    assert gy.data == "right[0](r[1](fb))" and Tag.calls == ["r", "right"]


def test_unused_inputs_follow_torchs_rules():
    x = Variable("x", role="x", requires_grad=True)
    unused = Variable("u", role="unused prompt", requires_grad=True)
    batch = Variable(["p", "q"], role="unused batch", requires_grad=True)
    with pytest.raises(RuntimeError, match="'unused prompt'.*allow_unused=True"):
        grad(Tag.apply("r", x), [x, unused], Variable("fb"), retain_graph=True)
    root = Tag.apply("r", x)
    gx, gu = grad(root, [x, unused], Variable("fb"), retain_graph=True, allow_unused=True)
    assert gx.data == "r[0](fb)" and gu is None
    # materialize_grads: empty feedback shaped like the input (torch: zeros_like).
    _, gu, gb = grad(root, [x, unused, batch], Variable("fb"), materialize_grads=True)
    assert (gu.data, gb.data, gb.role) == ("", ["", ""], "feedback to unused batch")
    with pytest.raises(ValueError, match="allow_unused"):
        grad(root, x, materialize_grads=True, allow_unused=False)


def test_an_input_whose_gradient_is_none_counts_as_unused():
    class Drop(Function):
        @staticmethod
        def forward(ctx, x):
            return Variable(x.data)

        @staticmethod
        def backward(ctx, grad_output):
            return None

    x = Variable("x", role="x", requires_grad=True)
    with pytest.raises(RuntimeError, match="not have been used"):
        grad(Drop.apply(x), x)


def test_bad_inputs_raise():
    x = Variable("x", role="x", requires_grad=True)
    root = Tag.apply("r", x)
    with pytest.raises(RuntimeError, match="'constant'.*does not require grad"):
        grad(root, Variable("c", role="constant"))
    with pytest.raises(RuntimeError, match="at least one"):
        grad(root, [])
    with pytest.raises(TypeError, match="element 0 of inputs must be a Variable"):
        grad(root, ["x"])
    with pytest.raises(RuntimeError, match="does not require grad"):
        grad(Variable("plain"), x)


def test_graph_is_freed_unless_retain_graph():
    x = Variable("x", role="x", requires_grad=True)
    root = Tag.apply("r", x)
    grad(root, x, retain_graph=True)
    grad(root, x)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        grad(root, x)


def test_default_gradient_is_the_roots_own_data_and_several_outputs():
    x = Variable("x", role="x", requires_grad=True)
    first, second = Tag.apply("p", x), Tag.apply("q", x)
    (gx,) = grad([first, second], x)
    assert gx.data == "q[0](x)\n\np[0](x)"


def test_hooks_apply_to_the_returned_gradients():
    x = Variable("x", role="x", requires_grad=True)
    mid = Tag.apply("m", x)
    mid.register_hook(lambda g: Variable(f"hm<{g.data}>"))
    x.register_hook(lambda g: Variable(f"hx<{g.data}>"))
    gx, gmid = grad(Tag.apply("r", mid), [x, mid], Variable("fb"))
    assert gmid.data == "hm<r[0](fb)>" and gx.data == "hx<m[0](hm<r[0](fb)>)>"


def test_agrad_inside_a_running_loop():
    async def main():
        x = Variable(["a", "b"], role="xs", requires_grad=True)
        (gx,) = await agrad(x + "!", x, Variable(["one", "two"]))
        return gx.data, x.grad

    assert asyncio.run(main()) == (["one", "two"], [])


@st.composite
def graphs(draw):
    n_leaves = draw(st.integers(1, 4))
    ops = []
    for k in range(draw(st.integers(1, 7))):
        ops.append(draw(st.lists(st.integers(0, n_leaves + k - 1), min_size=1, max_size=3)))
    hooked = draw(st.lists(st.booleans(), min_size=n_leaves + len(ops),
                           max_size=n_leaves + len(ops)))
    return n_leaves, ops, hooked


def build(recipe):
    n_leaves, ops, hooked = recipe
    values = [Variable(f"l{i}", role=f"leaf {i}", requires_grad=True) for i in range(n_leaves)]
    for k, picks in enumerate(ops):
        values.append(Tag.apply(f"op{k}", *[values[p] for p in picks]))
    for i, (value, hook) in enumerate(zip(values, hooked)):
        if hook:  # distinct per Variable, so a hook applied to the wrong one shows
            value.register_hook(lambda g, i=i: Variable(f"h{i}<{g.data}>", role=g.role))
    return values[:n_leaves], values[-1]


@given(graphs())
def test_grad_equals_what_backward_appends_combined(recipe):
    leaves, root = build(recipe)
    results = grad(root, leaves, Variable("fb"), allow_unused=True)
    assert all(leaf.grad == [] for leaf in leaves)
    twin_leaves, twin_root = build(recipe)
    backward(twin_root, Variable("fb"))
    for result, twin in zip(results, twin_leaves):
        pieces = [g.data for g in twin.grad]
        assert (result and result.data) == (FAN_IN_SEPARATOR.join(pieces) if pieces else None)
    # With the same hooks, the sequential reference engine leaves the same grad lists.
    reference_leaves, reference_root = build(recipe)
    reference_backward(reference_root, Variable("fb"))
    assert [[g.data for g in leaf.grad] for leaf in reference_leaves] == [
        [g.data for g in leaf.grad] for leaf in twin_leaves
    ]

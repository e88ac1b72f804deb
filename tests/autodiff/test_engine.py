"""The backward engine: ordering, fan-in, concurrency, retain_graph, inputs=."""

import asyncio
import threading

import pytest

import afnio
from afnio import Variable
from afnio.autodiff import Function, backward


class Tag(Function):
    """Passes each gradient back prefixed with the op's label (so order is visible)."""

    @staticmethod
    def forward(ctx, label, *inputs):
        ctx.label = label
        ctx.shapes = [v.batch_size for v in inputs]
        return Variable("+".join(str(v.data) for v in inputs), role=f"tag {label}")

    @staticmethod
    def backward(ctx, grad_output):
        grads = []
        for i, size in enumerate(ctx.shapes):
            text = f"{ctx.label}[{i}]({grad_output.data})"
            grads.append(Variable(text if size is None else [text] * size))
        return (None, *grads)


class SlowTag(Function):
    active = 0
    peak = 0

    @staticmethod
    def forward(ctx, x, delay):
        ctx.delay = delay
        return Variable(x.data, role="slow")

    @staticmethod
    async def backward(ctx, grad_output):
        SlowTag.active += 1
        SlowTag.peak = max(SlowTag.peak, SlowTag.active)
        try:
            await asyncio.sleep(ctx.delay)
        finally:
            SlowTag.active -= 1
        return Variable("slow:" + grad_output.data), None


def test_fan_in_combines_gradients_in_descending_sequence_order():
    x = Variable("x", role="x", requires_grad=True)
    a = Tag.apply("a", x)
    b = Tag.apply("b", x)
    c = Tag.apply("c", a, b)
    c.backward(Variable("fb"))
    # Leaves get one entry per gradient, producer with the highest sequence number first.
    assert [g.data for g in x.grad] == ["b[0](c[1](fb))", "a[0](c[0](fb))"]


def test_non_leaf_fan_in_gets_one_backward_call_with_combined_gradient():
    calls = []

    class Record(Function):
        @staticmethod
        def forward(ctx, x):
            return Variable(x.data)

        @staticmethod
        def backward(ctx, grad_output):
            calls.append(grad_output.data)
            return grad_output

    x = Variable("x", requires_grad=True)
    shared = Record.apply(x)
    first, second = Tag.apply("p", shared), Tag.apply("q", shared)
    backward([first, second], [Variable("one"), Variable("")])
    assert calls == ["q[0]()\n\np[0](one)"]  # descending producer sequence
    assert len(x.grad) == 1


def test_empty_pieces_are_dropped_when_combining_batches():
    x = Variable(["a", "b"], requires_grad=True)
    y = x + Variable(">")
    z = y + Variable("!")
    w = y + Variable("?")
    backward([z, w], [Variable(["", "late"]), Variable(["early", ""])])
    assert [g.data for g in x.grad] == [["early", "late"]]


def test_independent_async_branches_overlap():
    SlowTag.active = SlowTag.peak = 0
    leaves = [Variable(f"x{i}", requires_grad=True) for i in range(6)]
    outputs = [SlowTag.apply(leaf, 0.2) for leaf in leaves]
    total = afnio.autodiff.Sum.apply(outputs)
    total.backward(Variable("fb"))
    assert SlowTag.peak == 6
    assert all(leaf.grad[0].data == "slow:fb" for leaf in leaves)


def test_retain_graph_allows_a_second_backward_and_freed_graph_raises():
    x = Variable("x", requires_grad=True)
    y = Tag.apply("t", x)
    y.backward(Variable("one"), retain_graph=True)
    y.backward(Variable("two"))
    assert [g.data for g in x.grad] == ["t[0](one)", "t[0](two)"]
    with pytest.raises(RuntimeError, match="second time"):
        y.backward(Variable("three"))


def test_inputs_restricts_accumulation_and_skips_unneeded_nodes():
    ran = []

    class Mark(Function):
        @staticmethod
        def forward(ctx, name, x):
            ctx.name = name
            return Variable(x.data)

        @staticmethod
        def backward(ctx, grad_output):
            ran.append(ctx.name)
            return None, grad_output

    x = Variable("x", requires_grad=True)
    y = Variable("y", requires_grad=True)
    out = Mark.apply("mx", x) + Mark.apply("my", y)
    out.backward(Variable("fb"), inputs=[x])
    assert [g.data for g in x.grad] == ["fb"] and y.grad == []
    assert ran == ["mx"]


def test_inputs_may_name_a_non_leaf():
    x = Variable("x", requires_grad=True)
    mid = Tag.apply("m", x)
    out = Tag.apply("o", mid)
    out.backward(Variable("fb"), inputs=[mid])
    assert [g.data for g in mid.grad] == ["o[0](fb)"] and x.grad == []


def test_backward_without_gradient_uses_root_data():
    x = Variable(["a", "b"], requires_grad=True)
    y = x + Variable("!")
    y.backward()
    assert x.grad[0].data == ["a!", "b!"]


def test_root_errors():
    with pytest.raises(RuntimeError, match="does not require grad"):
        Variable("x").backward()
    y = Variable(["a", "b"], requires_grad=True) + "!"
    with pytest.raises(ValueError, match="shape"):
        y.backward(Variable("scalar"))


def test_failure_in_a_node_leaves_no_gradient_anywhere():
    class Boom(Function):
        @staticmethod
        async def forward(ctx, x):
            return Variable(x.data)

        @staticmethod
        async def backward(ctx, grad_output):
            await asyncio.sleep(0.01)
            raise ValueError("backward model unavailable")

    x = Variable("x", requires_grad=True)
    y = Variable("y", requires_grad=True)
    out = Boom.apply(x) + y
    with pytest.raises(ValueError, match="unavailable"):
        out.backward(Variable("fb"))
    assert x.grad == [] and y.grad == []


def test_backward_called_from_inside_the_runtime_loop_does_not_hang():
    class Inner(Function):
        @staticmethod
        def forward(ctx, x):
            return Variable(x.data)

        @staticmethod
        async def backward(ctx, grad_output):
            z = Variable("z", requires_grad=True)
            (z + "!").backward(Variable("inner"))  # sync backward on the loop thread
            return Variable(grad_output.data + "|" + z.grad[0].data)

    x = Variable("x", requires_grad=True)
    Inner.apply(x).backward(Variable("outer"))
    assert x.grad[0].data == "outer|inner"


def test_inputs_non_leaf_capture_does_not_stick_to_later_backwards():
    x = Variable("x", requires_grad=True)
    mid = Tag.apply("m", x)
    out = Tag.apply("o", mid)
    out.backward(Variable("first"), inputs=[mid], retain_graph=True)
    out.backward(Variable("second"))
    assert [g.data for g in mid.grad] == ["o[0](first)"]
    assert [g.data for g in x.grad] == ["m[0](o[0](second))"]


def test_failure_leaves_retained_non_leaves_untouched_too():
    class Boom(Function):
        @staticmethod
        def forward(ctx, x):
            return Variable(x.data)

        @staticmethod
        async def backward(ctx, grad_output):
            raise ValueError("backward model unavailable")

    x = Variable("x", requires_grad=True)
    mid = Boom.apply(x)
    top = mid + "!"
    top.retain_grad()
    with pytest.raises(ValueError):
        (top + "?").backward(Variable("fb"))
    assert top.grad == [] and x.grad == []


class Rendezvous(Function):
    """A synchronous backward that blocks until every branch's backward is running at once."""

    barrier: threading.Barrier

    @staticmethod
    def forward(ctx, x):
        return Variable(x.data, role="rendezvous")

    @staticmethod
    def backward(ctx, grad_output):
        Rendezvous.barrier.wait()  # blocks: a sync node must not hold the engine's loop
        return Variable("met:" + grad_output.data)


def test_blocking_sync_backwards_run_off_the_loop_together():
    # Four branches whose synchronous backward each blocks until all four are blocked: run
    # inline on the loop, the first would wait alone and the barrier would time out.
    Rendezvous.barrier = threading.Barrier(4, timeout=30)
    leaves = [Variable(f"x{i}", requires_grad=True) for i in range(4)]
    total = afnio.autodiff.Sum.apply([Rendezvous.apply(leaf) for leaf in leaves])
    total.backward(Variable("fb"))
    assert [leaf.grad[0].data for leaf in leaves] == ["met:fb"] * 4
    assert not Rendezvous.barrier.broken


def test_a_sync_backward_may_call_a_model_synchronously():
    from afnio.testing import ScriptedModel

    model = ScriptedModel(lambda messages, **kw: "asked:" + messages[-1]["content"])

    class AskModel(Function):
        @staticmethod
        def forward(ctx, x):
            return Variable(x.data, role="asked")

        @staticmethod
        def backward(ctx, grad_output):
            return Variable(model.chat([{"role": "user", "content": grad_output.data}]))

    x = Variable("x", requires_grad=True)
    AskModel.apply(x).backward(Variable("why"))
    assert x.grad[0].data == "asked:why"


def test_built_in_ops_run_inline_and_user_functions_off_the_loop():
    assert Variable("a", requires_grad=True).__add__("b").grad_fn.inline
    assert not Rendezvous._backward_cls.inline and not Rendezvous._backward_cls.is_async

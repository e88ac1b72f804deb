"""The backward engine: ordering, fan-in, concurrency, retain_graph, inputs=."""

import asyncio
import threading

import pytest

import afnio
from afnio import Variable
from afnio.autodiff import Function, backward
from afnio.testing import Turnstile


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


class GatedTag(Function):
    """An async backward that passes a turnstile: it can only finish once all are waiting."""

    active = 0
    peak = 0

    @staticmethod
    def forward(ctx, x, gate):
        ctx.gate = gate
        return Variable(x.data, role="gated")

    @staticmethod
    async def backward(ctx, grad_output):
        GatedTag.active += 1
        GatedTag.peak = max(GatedTag.peak, GatedTag.active)
        try:
            await ctx.gate.wait()
        finally:
            GatedTag.active -= 1
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
    GatedTag.active = GatedTag.peak = 0
    gate = Turnstile("reverse", expected=6, timeout=30)  # fails unless all 6 wait at once
    leaves = [Variable(f"x{i}", requires_grad=True) for i in range(6)]
    outputs = [GatedTag.apply(leaf, gate) for leaf in leaves]
    total = afnio.autodiff.Sum.apply(outputs)
    total.backward(Variable("fb"))
    assert GatedTag.peak == 6 and gate.releases == [5, 4, 3, 2, 1, 0]
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
            await asyncio.sleep(0)
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


# ---------------------------------------------------------------------- edges found by mutation
class Mark(Function):
    """Passes the gradient through, recording that its backward ran."""

    ran: list[str] = []

    @staticmethod
    def forward(ctx, name, x):
        ctx.name = name
        return Variable(x.data, role=f"marked {name}")

    @staticmethod
    def backward(ctx, grad_output):
        Mark.ran.append(ctx.name)
        return None, grad_output


def test_raw_gradients_for_one_batched_root_and_for_several_roots():
    x = Variable(["a", "b"], role="xs", requires_grad=True)
    (x + "!").backward(["fix a", "fix b"])  # one root: the list is its batch gradient
    assert [g.data for g in x.grad] == [["fix a", "fix b"]]
    p, q = Variable("p", requires_grad=True), Variable("q", requires_grad=True)
    backward([p + "!", q + "?"], ["for p", "for q"])  # several roots: one gradient each
    assert [g.data for g in p.grad] == ["for p"] and [g.data for g in q.grad] == ["for q"]
    for grads in (["one"], ["one", "two", "three"]):
        with pytest.raises(ValueError, match=f"got {len(grads)} gradients for 2 variables"):
            backward([p + "!", q + "?"], [Variable(g) for g in grads])


def test_large_batches_and_many_inputs_are_checked_by_value_not_identity():
    # Sizes above 256 are distinct int objects in CPython: an `is not` check would misfire.
    n = 300
    x = Variable([f"x{i}" for i in range(n)], role="xs", requires_grad=True)
    (x + "!").backward(Variable([f"fb{i}" for i in range(n)]))
    assert x.grad[0].data == [f"fb{i}" for i in range(n)]
    leaves = [Variable(f"l{i}", requires_grad=True) for i in range(n)]
    afnio.autodiff.Sum.apply(leaves).backward(Variable("all"))
    assert all(leaf.grad[0].data == "all" for leaf in leaves)
    roots = [leaf + "?" for leaf in leaves]
    backward(roots, [Variable(f"r{i}") for i in range(n)])
    assert [leaf.grad[-1].data for leaf in leaves] == [f"r{i}" for i in range(n)]


def test_a_node_gets_every_outputs_gradient_even_when_an_earlier_one_has_none():
    seen = []

    class Two(Function):
        @staticmethod
        def forward(ctx, x):
            return Variable(x.data + "1", role="first"), Variable(x.data + "2", role="second")

        @staticmethod
        def backward(ctx, first, second):
            seen.append((first.data, second.data))
            return Variable(second.data)

    x = Variable("x", requires_grad=True)
    _, second = Two.apply(x)
    (second + "!").backward(Variable("only the second"))
    assert seen == [("", "only the second")]
    assert [g.data for g in x.grad] == ["only the second"]


def test_a_node_returning_the_wrong_number_of_gradients_is_an_error():
    from afnio.autodiff.graph import Node, gradient_edge

    class Wrong(Node):
        def __init__(self, inputs, output, count):
            super().__init__([gradient_edge(v) for v in inputs], [output])
            self.count = count

        def apply(self, grad_outputs):
            return [grad_outputs[0]] * self.count

    x, y = Variable("x", requires_grad=True), Variable("y", requires_grad=True)
    for count in (1, 3):
        out = Variable("xy", role="joined")
        out.grad_fn, out.output_nr, out._requires_grad = Wrong([x, y], out, count), 0, True
        with pytest.raises(RuntimeError, match=f"Wrong returned {count} gradients for 2 inputs"):
            out.backward(Variable("fb"))
    assert x.grad == [] and y.grad == []


def test_nodes_skipped_by_inputs_are_not_freed():
    Mark.ran = []
    x, y = Variable("x", requires_grad=True), Variable("y", requires_grad=True)
    my = Mark.apply("my", y)
    out = Mark.apply("mx", x) + my
    out.backward(Variable("fb"), inputs=[x])  # runs mx and the add (and frees them), skips my
    (my + "?").backward(Variable("later"))  # so my can still run
    assert Mark.ran == ["mx", "my"]
    assert [g.data for g in y.grad] == ["later"]


def test_a_skipped_node_does_not_hold_back_other_ready_nodes():
    # A and B must be waiting at once for the turnstile to release either; the skipped node
    # popped between them must not make the engine wait for B before starting A.
    gate = Turnstile("reverse", expected=2, timeout=30)
    GatedTag.active = GatedTag.peak = 0
    x, y, z = (Variable(name, requires_grad=True) for name in "xyz")
    a, b = GatedTag.apply(x, gate), GatedTag.apply(y, gate)
    skipped = Mark.apply("skipped", z)
    backward([a, skipped, b], [Variable("fa"), Variable("fs"), Variable("fb")], inputs=[x, y])
    assert [g.data for g in x.grad] == ["slow:fa"] and [g.data for g in y.grad] == ["slow:fb"]
    assert GatedTag.peak == 2 and z.grad == []


def test_a_failing_node_cancels_running_siblings_and_waits_for_them():
    log = []
    events = {}

    def event(name):
        return events.setdefault(name, asyncio.Event())

    class Fails(Function):
        @staticmethod
        def forward(ctx, x):
            return Variable(x.data)

        @staticmethod
        async def backward(ctx, grad_output):
            await event("sibling started").wait()
            raise ValueError("backward model unavailable")

    class Waits(Function):
        @staticmethod
        def forward(ctx, x):
            return Variable(x.data)

        @staticmethod
        async def backward(ctx, grad_output):
            event("sibling started").set()
            try:
                await asyncio.wait_for(event("never").wait(), 10)
            except asyncio.CancelledError:
                log.append("cancelled")
                raise
            log.append("ran to the end")
            return grad_output

    async def main():
        x, y = Variable("x", requires_grad=True), Variable("y", requires_grad=True)
        try:
            await afnio.autodiff.engine.abackward(
                [Fails.apply(x), Waits.apply(y)], [Variable("f"), Variable("w")]
            )
        except ValueError as error:
            # Checked with no await in between: the engine itself must have waited for the
            # cancelled sibling to finish.
            return str(error), list(log), x.grad, y.grad
        raise AssertionError("the failure must propagate")

    message, seen, x_grad, y_grad = asyncio.run(main())
    assert message == "backward model unavailable"
    assert seen == ["cancelled"] and x_grad == [] and y_grad == []

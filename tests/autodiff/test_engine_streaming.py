"""Streaming backward: a node hands over each input's gradient the moment it has it.

An ``async def backward`` that yields ``(index or path, gradient)`` pairs makes a streaming node:
the engine delivers each pair at once, so the node upstream of a fast input runs while the same
node's slower gradients are still being computed. Events, not latencies, decide every outcome
here: the slow gradient of each test waits for an event only the *upstream* node can set, so an
engine that waited for the whole node would never set it (the wait has a long guard timeout that
only a broken engine reaches, so the test fails instead of hanging).
"""

import asyncio

import pytest

import afnio
from afnio import Variable
from afnio.autodiff import Function, backward, grad, variable_paths
from afnio.testing import reference_backward

GUARD = 30  # seconds; reached only when the engine holds a delivered gradient back


class Upstream(Function):
    """Passes its gradient on, labelled, and sets ``ctx.started`` when its backward runs."""

    @staticmethod
    def forward(ctx, x, started):
        ctx.started = started
        return Variable(x.data, role=f"upstream of {x.role}")

    @staticmethod
    async def backward(ctx, grad_output):
        ctx.started.set()
        return Variable("up:" + grad_output.data), None


class FastThenSlow(Function):
    """Streams the gradient of ``fast`` at once; that of ``slow`` only after ``started`` is set
    (by the Upstream node that produced ``fast``)."""

    @staticmethod
    def forward(ctx, fast, slow, started):
        ctx.started = started
        return Variable(f"{fast.data}|{slow.data}", role="joined")

    @staticmethod
    async def backward(ctx, grad_output):
        yield 0, Variable("fast:" + grad_output.data)
        await asyncio.wait_for(ctx.started.wait(), GUARD)
        yield 1, Variable("slow:" + grad_output.data)


def test_the_upstream_node_runs_before_the_streaming_node_has_finished():
    started = asyncio.Event()
    x = Variable("x", role="question", requires_grad=True)
    prompt = Variable("p", role="prompt", requires_grad=True)
    out = FastThenSlow.apply(Upstream.apply(x, started), prompt, started)
    assert out.grad_fn.streams
    out.backward(Variable("fb"))
    assert [g.data for g in x.grad] == ["up:fast:fb"]
    assert [g.data for g in prompt.grad] == ["slow:fb"]


def test_a_streaming_node_applied_directly_collects_its_gradients():
    started = asyncio.Event()
    started.set()
    fast, slow = Variable("a", requires_grad=True), Variable("b", requires_grad=True)
    node = FastThenSlow.apply(fast, slow, started).grad_fn
    assert [g.data for g in node.apply([Variable("fb")])] == ["fast:fb", "slow:fb"]
    reference_backward(FastThenSlow.apply(fast, slow, started), Variable("again"))
    assert [g.data for g in fast.grad] == ["fast:again"]
    assert [g.data for g in slow.grad] == ["slow:again"]


class Paths(Function):
    """Messages and inputs like ChatCompletion's; backward yields what ``ctx.plan`` says."""

    @staticmethod
    def forward(ctx, client, messages, inputs=None, plan=()):
        ctx.plan = plan
        return Variable("reply", role="reply")

    @staticmethod
    async def backward(ctx, grad_output):
        for index, text in ctx.plan:
            yield index, text if not isinstance(text, str) else Variable(text)


def _messages_and_inputs():
    system = Variable("system", role="system prompt", requires_grad=True)
    template = Variable("{q}", role="user template", requires_grad=True)
    question = Variable("q", role="question", requires_grad=True)
    items = [Variable(f"item{k}", role=f"item {k}", requires_grad=True) for k in range(3)]
    messages = [
        {"role": "system", "content": [system]},
        {"role": "user", "content": ["literal", template]},
    ]
    return messages, {"q": question, "items": items}, [system, template, question, *items]


def test_paths_address_variables_inside_container_arguments():
    messages, inputs, (system, template, question, *items) = _messages_and_inputs()
    plan = [
        ((2, "items", 2), "to item 2"),
        ((1, 1, "content", 1), "to the template"),
        ((2, "q"), "to the question"),
        ((1, 0, "content"), [Variable("to the system prompt")]),
    ]
    Paths.apply(None, messages, inputs, plan).backward()
    assert [g.data for g in system.grad] == ["to the system prompt"]
    assert [g.data for g in template.grad] == ["to the template"]
    assert [g.data for g in question.grad] == ["to the question"]
    assert [[g.data for g in item.grad] for item in items] == [[], [], ["to item 2"]]


def test_a_whole_argument_may_be_yielded_as_backward_would_return_it():
    messages, inputs, variables = _messages_and_inputs()
    plan = [(2, {"q": Variable("Q"), "items": [None, Variable("I1"), None]})]
    Paths.apply(None, messages, inputs, plan).backward()
    assert [[g.data for g in v.grad] for v in variables] == [[], [], ["Q"], [], ["I1"], []]


def test_variable_paths_are_the_addresses_a_streaming_backward_yields():
    messages, inputs, variables = _messages_and_inputs()
    found = list(variable_paths([messages, inputs], prefix=()))
    assert [v for _, v in found] == variables
    plan = [((path[0] + 1, *path[1:]), f"g{n}") for n, (path, _) in enumerate(found)]
    Paths.apply(None, messages, inputs, plan).backward()
    assert [[g.data for g in v.grad] for v in variables] == [[f"g{n}"] for n in range(6)]


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ([((1, 0, "content", 0), "a"), ((1, 0, "content"), [Variable("b")])],
         r"second gradient for the input at index \(1, 0, 'content'\)"),
        ([((1, 5), "a")], r"5 is not a position of a sequence of length 2"),
        ([((2, "missing"), "a")], r"'missing' is not a key of the dict"),
        ([((2, "q", 0), "a")], r"goes on past a Variable"),
        ([((0, "x"), "a")], r"goes on past a plain value"),
        ([(7, "a")], r"argument index \(0 to 3\)"),
        ([(True, "a")], r"argument index"),
        ([((2, "items"), [Variable("a")])], r"sequence of length 3"),
        ([((2, "q"), Variable(["a", "b"]))], r"is a scalar but its gradient is a batch of 2"),
    ],
)
def test_a_bad_yield_names_the_function_and_the_place_and_touches_no_leaf(plan, message):
    messages, inputs, variables = _messages_and_inputs()
    plan = [((2, "items", 0), "delivered first"), *plan]
    with pytest.raises(RuntimeError, match=message) as error:
        Paths.apply(None, messages, inputs, plan).backward()
    assert "PathsBackward" in str(error.value)
    assert all(v.grad == [] for v in variables)


def test_a_yield_that_is_not_a_pair_is_an_error():
    class Bad(Function):
        @staticmethod
        def forward(ctx, x):
            return Variable(x.data)

        @staticmethod
        async def backward(ctx, grad_output):
            yield grad_output

    x = Variable("x", requires_grad=True)
    with pytest.raises(RuntimeError, match=r"BadBackward yielded .*\(index, gradient\) pairs"):
        Bad.apply(x).backward(Variable("fb"))
    assert x.grad == []


def test_a_node_yielding_a_position_twice_or_out_of_range_is_an_error():
    class Raw(afnio.autodiff.Node):
        is_async = streams = True

        def __init__(self, x, positions):
            super().__init__([afnio.autodiff.graph.gradient_edge(x)], [x])
            self.positions = positions

        async def astream(self, grad_outputs):
            for position in self.positions:
                yield position, Variable("g")

    for positions, message in (([0, 0], "input 0 twice"), ([3], "input 3 but has 1 inputs")):
        x = Variable("x", requires_grad=True)
        y = Variable("y")
        y.grad_fn, y._requires_grad = Raw(x, positions), True
        with pytest.raises(RuntimeError, match=message):
            y.backward(Variable("fb"))
        assert x.grad == []


def test_a_failure_after_a_delivery_cancels_the_started_upstream_and_touches_no_leaf():
    log = []
    upstream_running = asyncio.Event()

    class Slow(Function):
        @staticmethod
        def forward(ctx, x):
            return Variable(x.data)

        @staticmethod
        async def backward(ctx, grad_output):
            upstream_running.set()
            try:
                await asyncio.wait_for(asyncio.Event().wait(), GUARD)
            except asyncio.CancelledError:
                log.append("upstream cancelled")
                raise
            return grad_output

    class FailsLate(Function):
        @staticmethod
        def forward(ctx, a, b):
            return Variable(a.data + b.data)

        @staticmethod
        async def backward(ctx, grad_output):
            yield 0, grad_output
            await asyncio.wait_for(upstream_running.wait(), GUARD)
            raise ValueError("the shared prompt's request failed")

    a, b = Variable("a", requires_grad=True), Variable("b", requires_grad=True)
    kept = Variable("kept", requires_grad=True)
    out = FailsLate.apply(Slow.apply(a), b)
    with pytest.raises(ValueError, match="shared prompt"):
        backward([out, kept + "!"], [Variable("fb"), Variable("k")])
    assert log == ["upstream cancelled"]
    assert a.grad == b.grad == kept.grad == []


def test_streaming_nodes_are_freed_and_keep_hooks_and_retain_graph():
    started = asyncio.Event()
    x = Variable("x", role="question", requires_grad=True)
    prompt = Variable("p", role="prompt", requires_grad=True)
    middle = Upstream.apply(x, started)
    middle.register_hook(lambda g: Variable(g.data + "+hook"))
    x.register_hook(lambda g: Variable(g.data + "+leaf"))
    out = FastThenSlow.apply(middle, prompt, started)
    out.backward(Variable("one"), retain_graph=True)
    started.clear()
    out.backward(Variable("two"))
    assert [g.data for g in x.grad] == ["up:fast:one+hook+leaf", "up:fast:two+hook+leaf"]
    assert [g.data for g in prompt.grad] == ["slow:one", "slow:two"]
    with pytest.raises(RuntimeError, match="second time"):
        out.backward(Variable("three"))


def test_grad_and_inputs_work_through_streaming_nodes():
    started = asyncio.Event()
    x = Variable("x", role="question", requires_grad=True)
    prompt = Variable("p", role="prompt", requires_grad=True)
    out = FastThenSlow.apply(Upstream.apply(x, started), prompt, started)
    (gx,) = grad(out, x, Variable("fb"), retain_graph=True)
    assert gx.data == "up:fast:fb" and x.grad == []
    # With inputs=[prompt] the Upstream node is skipped, so nothing else would set the event.
    started.set()
    out.backward(Variable("only the prompt"), inputs=[prompt])
    assert [g.data for g in prompt.grad] == ["slow:only the prompt"] and x.grad == []

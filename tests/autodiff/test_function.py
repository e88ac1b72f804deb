"""User-defined Functions: both forward styles, async, ctx, and backward validation."""

import asyncio

import pytest

import afnio
from afnio import Variable
from afnio.autodiff import Function


class Upper(Function):
    @staticmethod
    def forward(ctx, x, suffix=""):
        ctx.save_for_backward(x)
        return Variable(x.data.upper() + suffix, role=f"upper {x.role}")

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_variables
        return Variable(f"{grad_output.data} (about {x.role})"), None


class UpperWithSetup(Function):
    @staticmethod
    def forward(x):
        return Variable(x.data.upper(), role="upper")

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.role = inputs[0].role
        ctx.output_data = output.data

    @staticmethod
    def backward(ctx, grad_output):
        return Variable(f"{grad_output.data}|{ctx.role}|{ctx.output_data}")


class AsyncEcho(Function):
    @staticmethod
    async def forward(ctx, x):
        await asyncio.sleep(0.001)
        return Variable(x.data, role="echo")

    @staticmethod
    async def backward(ctx, grad_output):
        await asyncio.sleep(0.001)
        return Variable("async:" + grad_output.data)


def test_instantiating_a_function_warns_like_torch_and_apply_still_works():
    # torch 2.x: instantiating an autograd.Function emits a DeprecationWarning (not an error).
    with pytest.warns(DeprecationWarning, match=r"Upper\.apply"):
        instance = Upper()
    x = Variable("hi", role="greeting", requires_grad=True)
    assert instance.apply(x).data == "HI"
    # Calling an instance is the legacy style torch rejects with a RuntimeError.
    with pytest.raises(RuntimeError, match=r"Upper\.apply"):
        instance(x)


def test_function_without_forward_gets_a_clear_error():
    class NoForward(Function):
        @staticmethod
        def backward(ctx, grad_output):
            return grad_output

    with pytest.raises(RuntimeError, match="NoForward does not define forward"):
        NoForward.apply(Variable("a", requires_grad=True))


def test_function_without_backward_gets_a_clear_error_at_backward():
    class NoBackward(Function):
        @staticmethod
        def forward(ctx, x):
            return Variable(x.data)

    x = Variable("a", requires_grad=True)
    y = NoBackward.apply(x)  # torch also only fails once backward runs
    with pytest.raises(RuntimeError, match="NoBackward does not define backward"):
        y.backward(Variable("fb"))
    assert x.grad == []


def test_ctx_style_forward_backward_and_name():
    x = Variable("hi", role="greeting", requires_grad=True)
    y = Upper.apply(x, suffix="!")
    assert y.data == "HI!" and y.grad_fn.name() == "UpperBackward" and not y.is_leaf
    y.backward(Variable("quieter"))
    assert [g.data for g in x.grad] == ["quieter (about greeting)"]


def test_setup_context_style():
    x = Variable("hi", role="greeting", requires_grad=True)
    y = UpperWithSetup.apply(x)
    y.backward(Variable("fb"))
    assert x.grad[0].data == "fb|greeting|HI"


def test_async_forward_and_backward_from_sync_code():
    x = Variable("hi", role="greeting", requires_grad=True)
    y = AsyncEcho.apply(x)
    assert y.data == "hi"
    y.backward(Variable("fb"))
    assert x.grad[0].data == "async:fb"


def test_aapply_and_abackward_inside_a_running_loop():
    async def main():
        x = Variable("hi", role="greeting", requires_grad=True)
        y = await AsyncEcho.aapply(x)
        await y.abackward(Variable("fb"))
        return x.grad[0].data

    assert asyncio.run(main()) == "async:fb"


def test_apply_inside_async_backward_does_not_deadlock():
    class Nested(Function):
        @staticmethod
        async def forward(ctx, x):
            return Variable(x.data)

        @staticmethod
        async def backward(ctx, grad_output):
            # Sync apply of an async Function from code running on the runtime loop.
            inner = AsyncEcho.apply(Variable(grad_output.data))
            return Variable("nested:" + inner.data)

    x = Variable("a", requires_grad=True)
    Nested.apply(x).backward(Variable("fb"))
    assert x.grad[0].data == "nested:fb"


def test_no_graph_under_no_grad_or_without_grad_inputs():
    x = Variable("hi", requires_grad=True)
    with afnio.no_grad():
        y = Upper.apply(x)
    assert y.is_leaf and not y.requires_grad
    z = Upper.apply(Variable("plain"))
    assert z.is_leaf and not z.requires_grad


def test_needs_input_grad_one_per_argument():
    seen = {}

    class Probe(Function):
        @staticmethod
        def forward(ctx, a, b, c=None, **extra):
            seen["flags"] = ctx.needs_input_grad
            return Variable("out")

        @staticmethod
        def backward(ctx, grad_output):
            return None, None, None, None

    a = Variable("a", requires_grad=True)
    Probe.apply(a, "plain", c=[Variable("c"), {"k": Variable("k", requires_grad=True)}], d=1)
    assert seen["flags"] == (True, False, True, False)


def test_forward_runs_without_recording():
    inner_state = {}

    class Probe(Function):
        @staticmethod
        def forward(ctx, x):
            inner_state["grad"] = afnio.is_grad_enabled()
            return x + "!"

        @staticmethod
        def backward(ctx, grad_output):
            return grad_output

    y = Probe.apply(Variable("a", requires_grad=True))
    assert inner_state["grad"] is False and y.grad_fn.name() == "ProbeBackward"


def test_returning_an_input_gives_a_new_output():
    class Identity(Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, grad_output):
            return grad_output

    x = Variable("a", requires_grad=True)
    y = Identity.apply(x)
    assert y is not x and x.is_leaf and y.grad_fn is not None


def test_mark_non_differentiable():
    received = []

    class ScoreAndText(Function):
        @staticmethod
        def forward(ctx, x):
            score, text = Variable(1), Variable(x.data)
            ctx.mark_non_differentiable(score)
            return score, text

        @staticmethod
        def backward(ctx, grad_score, grad_text):
            received.append((grad_score, grad_text.data))
            return grad_text

    x = Variable("a", requires_grad=True)
    score, text = ScoreAndText.apply(x)
    assert score.is_leaf and not score.requires_grad and text.grad_fn is not None
    text.backward(Variable("fb"))
    # One slot per forward output, as in torch; the non-differentiable one always gets None.
    assert received == [(None, "fb")] and x.grad[0].data == "fb"


@pytest.mark.parametrize("materialize", [True, False])
def test_backward_gets_one_slot_per_forward_output(materialize):
    """torch: backward receives one gradient per output of forward; an output that is not a
    tensor gets None. Here the Variable outputs sit between a str and an int."""
    received = []

    class Mixed(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.set_materialize_grads(materialize)
            return "label", Variable(x.data + "1"), 7, Variable(x.data + "2", role="second")

        @staticmethod
        def backward(ctx, grad_label, grad_first, grad_count, grad_second):
            received.append(
                (grad_label, grad_first and grad_first.data, grad_count, grad_second)
            )
            return Variable(grad_first.data)

    x = Variable("a", role="x", requires_grad=True)
    label, first, count, second = Mixed.apply(x)
    assert (label, count) == ("label", 7) and second.grad_fn is first.grad_fn
    assert (first.output_nr, second.output_nr) == (0, 1)
    first.backward(Variable("about 1"))
    # The second Variable got no gradient: empty feedback when materialized, else None.
    missing = received[0][3]
    assert received[0][:3] == (None, "about 1", None)
    assert (missing.data == "" and missing.role == "feedback to second") if materialize else (
        missing is None
    )


def _bad_backward(value):
    class Bad(Function):
        @staticmethod
        def forward(ctx, x, items):
            return Variable("out")

        @staticmethod
        def backward(ctx, grad_output):
            return value

    return Bad


@pytest.mark.parametrize(
    "value, message",
    [
        ((None,), "incorrect number of gradients"),
        ((None, None, None), "incorrect number of gradients"),
        (("text", None), "index 0"),
        ((Variable(["a", "b"]), None), "index 0"),
        ((None, [Variable("g")]), "index 1"),
        ((None, Variable("g")), "index 1"),
    ],
)
def test_wrong_backward_returns_raise_runtime_error(value, message):
    x = Variable("a", role="prompt", requires_grad=True)
    items = [Variable("i", requires_grad=True), Variable("j", requires_grad=True)]
    y = _bad_backward(value).apply(x, items)
    with pytest.raises(RuntimeError, match=message) as info:
        y.backward(Variable("fb"))
    assert "BadBackward" in str(info.value)
    assert x.grad == [] and items[0].grad == []  # nothing half-updated


def test_container_gradients_map_to_their_variables():
    class Gather(Function):
        @staticmethod
        def forward(ctx, parts, extra=None):
            return Variable("joined")

        @staticmethod
        def backward(ctx, grad_output):
            return [Variable("g0"), None, {"k": Variable("gk")}], None

    a, b, k = (Variable(n, requires_grad=True) for n in "abk")
    Gather.apply([a, b, {"k": k, "plain": 3}]).backward(Variable("fb"))
    assert [g.data for g in a.grad] == ["g0"] and b.grad == [] and k.grad[0].data == "gk"


def test_bad_apply_arguments_name_the_function():
    with pytest.raises(TypeError, match="Upper.apply"):
        Upper.apply()


# ---------------------------------------------------------------------- edges found by mutation
def test_save_for_backward_accepts_variables_and_none_only():
    class Saves(Function):
        @staticmethod
        def forward(ctx, x, extra):
            ctx.save_for_backward(x, None)
            ctx.save_for_backward(x, extra)
            return Variable(x.data)

        @staticmethod
        def backward(ctx, grad_output):
            return grad_output, None

    x = Variable("x", requires_grad=True)
    Saves.apply(x, Variable("e"))
    with pytest.raises(TypeError, match="Saves: save_for_backward .* argument 1 is str"):
        Saves.apply(x, "not a variable")


def test_backward_without_retain_graph_frees_what_forward_saved():
    import gc
    import weakref

    class Payload:
        pass

    class Keeps(Function):
        @staticmethod
        def forward(ctx, x, payload):
            ctx.payload = payload
            ctx.save_for_backward(x)
            return Variable(x.data)

        @staticmethod
        def backward(ctx, grad_output):
            return grad_output, None

    payload = Payload()
    alive = weakref.ref(payload)
    x = Variable("x", requires_grad=True)
    y = Keeps.apply(x, payload)
    ctx = y.grad_fn.ctx
    del payload
    y.backward(Variable("fb"))
    gc.collect()
    assert alive() is None  # the ctx no longer holds it
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _ = ctx.saved_variables


@pytest.mark.parametrize(
    "argument, gradient, message",
    [
        (Variable("s", requires_grad=True), Variable(["a", "b"]),
         "the input with role 'v' is a scalar but its gradient is a batch of 2"),
        (Variable(["s", "t"], requires_grad=True), Variable("a"),
         "the input with role 'v' is a batch of 2 but its gradient is a scalar"),
        ([Variable("s", requires_grad=True)], [Variable("a"), Variable("b")],
         "sequence of length 1"),
        ({"k": Variable("s", requires_grad=True)}, {"k": None, "other": Variable("b")},
         "must be None or a dict with its keys"),
    ],
)
def test_gradient_shape_errors_say_what_was_expected(argument, gradient, message):
    for variable in afnio.autodiff.function.flatten_variables(argument):
        variable.role = "v"

    class Returns(Function):
        @staticmethod
        def forward(ctx, value):
            return Variable("out")

        @staticmethod
        def backward(ctx, grad_output):
            return gradient

    with pytest.raises(RuntimeError, match=message):
        Returns.apply(argument).backward(Variable("fb"))


def test_an_argument_without_variables_must_get_no_gradient():
    class Labelled(Function):
        @staticmethod
        def forward(ctx, x, label):
            return Variable(x.data + label)

        @staticmethod
        def backward(ctx, grad_output):
            return grad_output, Variable("a gradient for a str")

    x = Variable("x", requires_grad=True)
    with pytest.raises(RuntimeError, match="index 1: the input holds no Variable"):
        Labelled.apply(x, "!").backward(Variable("fb"))


def test_a_dict_argument_may_get_no_gradient_at_all():
    class Mapping(Function):
        @staticmethod
        def forward(ctx, first, named):
            return Variable("out")

        @staticmethod
        def backward(ctx, grad_output):
            return grad_output, None

    first = Variable("f", requires_grad=True)
    named = {"a": Variable("a", requires_grad=True), "b": [Variable("b", requires_grad=True)]}
    Mapping.apply(first, named).backward(Variable("fb"))
    assert [g.data for g in first.grad] == ["fb"]
    assert named["a"].grad == [] and named["b"][0].grad == []


def test_forward_and_setup_context_run_without_recording():
    seen = {}

    class WithSetup(Function):
        @staticmethod
        def forward(x):
            return Variable(x.data)

        @staticmethod
        def setup_context(ctx, inputs, output):
            seen["setup"] = afnio.is_grad_enabled()
            ctx.extra = inputs[0] + "!"

        @staticmethod
        def backward(ctx, grad_output):
            return grad_output

    class AsyncForward(Function):
        @staticmethod
        async def forward(ctx, x):
            await asyncio.sleep(0)
            seen["async forward"] = afnio.is_grad_enabled()
            return Variable(x.data)

        @staticmethod
        def backward(ctx, grad_output):
            return grad_output

    x = Variable("x", requires_grad=True)
    out = WithSetup.apply(x)
    assert out.grad_fn.ctx.extra.grad_fn is None and not out.grad_fn.ctx.extra.requires_grad
    AsyncForward.apply(x)

    async def from_a_loop():
        return await AsyncForward.aapply(x)

    asyncio.run(from_a_loop())
    assert seen == {"setup": False, "async forward": False}


def test_aapply_records_only_under_grad_mode_with_an_input_needing_grad():
    async def run_both():
        plain = await AsyncEcho.aapply(Variable("no grad needed"))
        with afnio.no_grad():
            quiet = await AsyncEcho.aapply(Variable("x", requires_grad=True))
        return plain, quiet

    plain, quiet = asyncio.run(run_both())
    for out in (plain, quiet):
        assert out.grad_fn is None and not out.requires_grad

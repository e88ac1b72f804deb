"""``Variable.register_hook``: torch's tensor hooks, for textual gradients.

torch's rules mirrored here: a hook sees the gradient before it is accumulated into a leaf's
``.grad`` or flows on from a non-leaf into its ``grad_fn``; returning a value replaces the
gradient; hooks run in registration order; ``retain_grad`` stores the gradient after the hooks;
registering on a tensor that does not require grad raises; ``handle.remove()`` unregisters.
"""

import asyncio
import copy

import pytest

from afnio import Variable
from afnio.autodiff import Function, backward
from afnio.testing import reference_backward
from afnio.utils.hooks import RemovableHandle


class Tag(Function):
    """Passes the gradient on to every input, prefixed with the op's label."""

    @staticmethod
    def forward(ctx, label, *inputs):
        ctx.label = label
        return Variable("+".join(str(v.data) for v in inputs), role=f"tag {label}")

    @staticmethod
    def backward(ctx, grad_output):
        grads = [Variable(f"{ctx.label}[{i}]({grad_output.data})")
                 for i in range(len(ctx.needs_input_grad) - 1)]
        return (None, *grads)


def rewrite(prefix, log=None):
    def hook(grad):
        if log is not None:
            log.append((prefix, grad.data))
        return Variable(f"{prefix}<{grad.data}>", role=grad.role)

    return hook


def test_leaf_hook_replaces_the_gradient_before_it_is_appended():
    x = Variable("x", role="x", requires_grad=True)
    seen = []
    handle = x.register_hook(rewrite("h", seen))
    assert isinstance(handle, RemovableHandle)
    Tag.apply("a", x).backward(Variable("fb"))
    assert seen == [("h", "a[0](fb)")]
    assert [g.data for g in x.grad] == ["h<a[0](fb)>"]
    handle.remove()
    handle.remove()  # removing twice is harmless, as in torch
    Tag.apply("b", x).backward(Variable("fb"))
    assert [g.data for g in x.grad] == ["h<a[0](fb)>", "b[0](fb)"]


def test_hooks_chain_in_registration_order_and_none_keeps_the_gradient():
    x = Variable("x", role="x", requires_grad=True)
    calls = []
    x.register_hook(rewrite("first"))
    x.register_hook(lambda grad: calls.append(grad.data))  # returns None: observe only
    x.register_hook(rewrite("third"))
    Tag.apply("a", x).backward(Variable("fb"))
    assert calls == ["first<a[0](fb)>"]
    assert x.grad[0].data == "third<first<a[0](fb)>>"


def test_handle_as_context_manager():
    x = Variable("x", role="x", requires_grad=True)
    with x.register_hook(rewrite("h")):
        Tag.apply("a", x).backward(Variable("one"))
    Tag.apply("a", x).backward(Variable("two"))
    assert [g.data for g in x.grad] == ["h<a[0](one)>", "a[0](two)"]


def test_leaf_hook_runs_once_per_gradient_that_reaches_the_leaf():
    """torch sums a leaf's gradients before AccumulateGrad, so its hook runs once; afnio keeps
    each gradient as its own ``grad`` entry, so the hook sees each one, in append order."""
    x = Variable("x", role="x", requires_grad=True)
    seen = []
    x.register_hook(rewrite("h", seen))
    a, b = Tag.apply("a", x), Tag.apply("b", x)
    Tag.apply("c", a, b).backward(Variable("fb"))
    assert [g.data for g in x.grad] == ["h<b[0](c[1](fb))>", "h<a[0](c[0](fb))>"]
    assert [data for _, data in seen] == ["b[0](c[1](fb))", "a[0](c[0](fb))"]


def test_non_leaf_hook_sees_the_combined_gradient_once_and_changes_what_flows_on():
    x = Variable("x", role="x", requires_grad=True)
    mid = Tag.apply("m", x)
    seen = []
    mid.register_hook(rewrite("h", seen))
    mid.retain_grad()
    first, second = Tag.apply("p", mid), Tag.apply("q", mid)
    backward([first, second], [Variable("one"), Variable("two")])
    combined = "q[0](two)\n\np[0](one)"  # descending producer sequence
    assert seen == [("h", combined)]
    # retain_grad stores the gradient after the hooks (torch >= 2.0 runs it last).
    assert [g.data for g in mid.grad] == [f"h<{combined}>"]
    assert [g.data for g in x.grad] == [f"m[0](h<{combined}>)"]


def test_hook_on_a_root_runs_on_the_root_gradient():
    x = Variable("x", role="x", requires_grad=True)
    root = Tag.apply("r", x)
    root.register_hook(rewrite("h"))
    root.backward(Variable("fb"))
    assert x.grad[0].data == "r[0](h<fb>)"


def test_batch_hook_keeps_the_shape():
    x = Variable(["a", "b"], role="xs", requires_grad=True)
    x.register_hook(lambda g: Variable([t.upper() for t in g.data], role=g.role))
    (x + "!").backward(Variable(["too long", ""]))
    assert x.grad[0].data == ["TOO LONG", ""]


def test_register_hook_errors_like_torch():
    plain = Variable("x", role="constant")
    with pytest.raises(RuntimeError, match="doesn't require gradient.*'constant'"):
        plain.register_hook(rewrite("h"))
    x = Variable("x", role="x", requires_grad=True)
    with pytest.raises(TypeError, match="must be callable"):
        x.register_hook("not a function")


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (lambda grad: "plain text", TypeError, "must return a Variable or None, got str"),
        (lambda grad: Variable(["a", "b"]), ValueError, "a scalar but the hook returned a batch"),
    ],
)
def test_bad_hook_results_name_the_role_and_leave_nothing_half_updated(bad, error, message):
    x = Variable("x", role="the prompt", requires_grad=True)
    other = Variable("y", role="other", requires_grad=True)
    x.register_hook(bad)
    root = Tag.apply("a", other, x)
    with pytest.raises(error, match=message) as info:
        root.backward(Variable("fb"))
    assert "'the prompt'" in str(info.value)
    assert x.grad == [] and other.grad == []


def test_copies_do_not_inherit_hooks():
    x = Variable("x", role="x", requires_grad=True)
    x.register_hook(rewrite("h"))
    clone = copy.deepcopy(x)
    Tag.apply("a", clone).backward(Variable("fb"))
    assert clone.grad[0].data == "a[0](fb)"


class Gated(Function):
    """An async op whose backward finishes only after ``ctx.wait_for`` is set (if any), then
    sets its own ``ctx.done``: the test, not the clock, fixes the completion order."""

    @staticmethod
    def forward(ctx, x, wait_for, done):
        ctx.wait_for, ctx.done = wait_for, done
        return Variable(x.data, role="gated")

    @staticmethod
    async def backward(ctx, grad_output):
        if ctx.wait_for is not None:
            await asyncio.wait_for(ctx.wait_for.wait(), 10)  # a safety net, not the decider
        ctx.done.set()
        return Variable(f"g<{grad_output.data}>"), None, None


def run_gated(first_finishes_first):
    """Two concurrent branches over the same two leaves; returns grads and leaf-hook order."""
    calls = []
    x = Variable("x", role="x", requires_grad=True)
    y = Variable("y", role="y", requires_grad=True)
    x.register_hook(lambda g: calls.append(("x", g.data)))
    y.register_hook(lambda g: calls.append(("y", g.data)))
    done = [asyncio.Event(), asyncio.Event()]
    order = [None, done[0]] if first_finishes_first else [done[1], None]
    left = Gated.apply(Tag.apply("L", x, y), order[0], done[0])
    right = Gated.apply(Tag.apply("R", y, x), order[1], done[1])
    backward([left, right], [Variable("one"), Variable("two")])
    return [[g.data for g in v.grad] for v in (x, y)], calls


def test_leaf_hook_order_and_grads_do_not_depend_on_completion_order():
    grads_a, calls_a = run_gated(first_finishes_first=True)
    grads_b, calls_b = run_gated(first_finishes_first=False)
    assert grads_a == grads_b and calls_a == calls_b
    # The order is the sequential reference's: latest producer first.
    assert calls_a == [
        ("y", "R[0](g<two>)"),
        ("x", "R[1](g<two>)"),
        ("x", "L[0](g<one>)"),
        ("y", "L[1](g<one>)"),
    ]


def test_reference_engine_applies_the_same_hooks():
    def make():
        calls = []
        x = Variable("x", role="x", requires_grad=True)
        x.register_hook(rewrite("hx", calls))
        mid = Tag.apply("m", x)
        mid.register_hook(rewrite("hm", calls))
        root = Tag.apply("r", mid, x)
        return x, root, calls

    x_a, root_a, calls_a = make()
    x_b, root_b, calls_b = make()
    backward(root_a, Variable("fb"))
    reference_backward(root_b, Variable("fb"))
    assert [g.data for g in x_a.grad] == [g.data for g in x_b.grad] == [
        "hx<r[1](fb)>",
        "hx<m[0](hm<r[0](fb)>)>",
    ]
    # Leaf hooks run in the same order in both; the concurrent engine runs them after the
    # graph (so that a failing node leaves every grad untouched), hence after non-leaf hooks.
    leaf_calls = [("hx", "r[1](fb)"), ("hx", "m[0](hm<r[0](fb)>)")]
    assert [c for c in calls_a if c[0] == "hx"] == [c for c in calls_b if c[0] == "hx"]
    assert [c for c in calls_a if c[0] == "hx"] == leaf_calls
    assert calls_a == [("hm", "r[0](fb)"), *leaf_calls]

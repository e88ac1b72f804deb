"""Module forward hooks: ``register_forward_pre_hook`` / ``register_forward_hook`` and the
module-wide variants, with torch.nn.Module's rules.

torch's rules mirrored here: a pre-hook ``hook(module, args)`` may return new args (a single
value is wrapped in a tuple); with ``with_kwargs=True`` it is ``hook(module, args, kwargs)`` and
returns ``None`` or ``(args, kwargs)`` (anything else raises); a forward hook ``hook(module,
args, output)`` sees the args the call ran with and may replace the output; hooks run in
registration order, ``prepend=True`` puts one first, global hooks run before a module's own;
``always_call=True`` hooks also run when the call raises, and the call's error propagates;
handles remove hooks and work as context managers.
"""

from __future__ import annotations

import warnings

import pytest

import afnio
from afnio.cognitive import (
    GradComponent,
    Module,
    Sequential,
    fun_to_grad_component,
    register_module_forward_hook,
    register_module_forward_pre_hook,
)


class Join(Module):
    def forward(self, text, suffix="!"):
        return text + suffix


class Shout(GradComponent):
    def call(self, text):
        return text.upper()


def test_pre_hook_replaces_positional_arguments():
    join = Join()
    seen = []

    def pre(module, args):
        seen.append((module, args))
        return args[0] + " please"  # a single value becomes a one-element tuple

    handle = join.register_forward_pre_hook(pre)
    text = afnio.Variable("answer", role="request")
    assert join(text, suffix="?").data == "answer please?"
    assert seen[0][0] is join and seen[0][1] == (text,)  # the Variables themselves
    handle.remove()
    assert join(text).data == "answer!"


def test_pre_hook_with_kwargs_replaces_both_and_checks_its_result():
    join = Join()

    def pre(module, args, kwargs):
        return (args[0] + " now",), {**kwargs, "suffix": "."}

    join.register_forward_pre_hook(pre, with_kwargs=True)
    assert join("go", suffix="!") == "go now."
    join.register_forward_pre_hook(lambda module, args, kwargs: ("only args",), with_kwargs=True)
    with pytest.raises(RuntimeError, match=r"forward pre-hook .*<lambda>.* of Join.*new_kwargs"):
        join("go")


def test_forward_hook_sees_the_args_the_call_ran_with_and_replaces_the_output():
    join = Join()
    seen = []
    join.register_forward_pre_hook(lambda module, args: ("changed",))
    join.register_forward_hook(lambda module, args, out: seen.append((args, out)))
    join.register_forward_hook(lambda module, args, kwargs, out: f"{out}{kwargs}",
                               with_kwargs=True)
    assert join("original", suffix="?") == "changed?{'suffix': '?'}"
    assert seen == [(("changed",), "changed?")]


def test_order_registration_prepend_and_global_first():
    join = Join()
    calls = []

    def pre(name):
        return lambda module, args: calls.append(name)

    def post(name):
        return lambda module, args, out: calls.append(name)

    join.register_forward_pre_hook(pre("pre 1"))
    join.register_forward_pre_hook(pre("pre 0"), prepend=True)
    join.register_forward_pre_hook(pre("pre 2"))
    join.register_forward_hook(post("post 1"))
    join.register_forward_hook(post("post 0"), prepend=True)
    with register_module_forward_pre_hook(pre("global pre")), register_module_forward_hook(
        post("global post")
    ):
        join("x")
    assert calls == [
        "global pre", "pre 0", "pre 1", "pre 2", "global post", "post 0", "post 1"
    ]
    calls.clear()
    join("x")  # the global hooks were removed when their blocks ended
    assert calls == ["pre 0", "pre 1", "pre 2", "post 0", "post 1"]


def test_global_hooks_see_every_module_of_a_program():
    program = Sequential(Join(), Shout("upper-cases"))
    called = []
    with register_module_forward_hook(
        lambda module, args, out: called.append((type(module).__name__, str(out)))
    ):
        out = program(afnio.Variable("hi", role="greeting", requires_grad=True))
    assert out.data == "HI!"
    assert called == [("Join", "hi!"), ("Shout", "HI!"), ("Sequential", "HI!")]


def test_grad_component_hooks_run_in_training_and_eval_mode():
    shout = Shout("upper-cases")
    seen = []
    shout.register_forward_pre_hook(lambda module, args: (args[0] + "!",))
    shout.register_forward_hook(lambda module, args, out: seen.append(out) or None)
    x = afnio.Variable("hi", role="greeting", requires_grad=True)
    traced = shout(x)
    assert traced.data == "HI!" and traced.grad_fn.name() == "ShoutBackward"
    assert shout.eval()("yo") == "YO!"
    assert seen == [traced, "YO!"]


def test_fun_grad_component_hooks():
    @fun_to_grad_component(desc="adds one")
    def add_one(x):
        return x + 1

    add_one.register_forward_hook(lambda module, args, out: afnio.Variable(out.data * 10))
    assert add_one(1).data == 20


class Failing(Module):
    def forward(self, text):
        raise ValueError(f"cannot handle {text}")


def test_always_call_hooks_run_when_the_call_fails_and_the_error_propagates():
    failing = Failing()
    calls = []
    failing.register_forward_hook(lambda module, args, out: calls.append("plain"))
    failing.register_forward_hook(
        lambda module, args, out: calls.append(("always", args, out)), always_call=True
    )
    with pytest.raises(ValueError, match="cannot handle x"):
        failing("x")
    assert calls == [("always", ("x",), None)]


def test_always_call_hook_runs_once_when_a_later_hook_fails():
    join = Join()
    calls = []
    join.register_forward_hook(lambda m, a, out: calls.append(out), always_call=True)

    def boom(module, args, out):
        raise KeyError("boom")

    join.register_forward_hook(boom)
    join.register_forward_hook(lambda m, a, out: calls.append(("late", out)), always_call=True)
    with pytest.raises(KeyError, match="boom"):
        join("x")
    # The first ran normally; the third never ran, so it runs as an always_call hook.
    assert calls == ["x!", ("late", "x!")]


def test_an_always_call_hook_error_becomes_a_warning():
    failing = Failing()

    def broken(module, args, out):
        raise RuntimeError("hook broke")

    failing.register_forward_hook(broken, always_call=True)
    with pytest.warns(RuntimeWarning, match="broken of Failing.*RuntimeError: hook broke"):
        with pytest.raises(ValueError, match="cannot handle"):
            failing("x")


def test_no_hooks_no_warnings_and_bad_hooks_rejected():
    join = Join()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert join("x") == "x!"
    with pytest.raises(TypeError, match="Join.register_forward_hook: the hook must be callable"):
        join.register_forward_hook(None)
    with pytest.raises(TypeError, match="must be callable"):
        register_module_forward_pre_hook("nope")

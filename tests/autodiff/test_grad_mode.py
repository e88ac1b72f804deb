"""Grad modes: nesting, decorators (sync and async), thread and task isolation."""

import asyncio
import threading

import pytest

import afnio
from afnio import Variable


def test_nesting_and_restoring():
    assert afnio.is_grad_enabled()
    with afnio.no_grad():
        assert not afnio.is_grad_enabled()
        with afnio.enable_grad():
            assert afnio.is_grad_enabled()
            with afnio.set_grad_enabled(False):
                assert not afnio.is_grad_enabled()
            assert afnio.is_grad_enabled()
        assert not afnio.is_grad_enabled()
    assert afnio.is_grad_enabled()


def test_set_grad_enabled_as_a_function_applies_at_once():
    afnio.set_grad_enabled(False)
    try:
        assert not afnio.is_grad_enabled()
    finally:
        afnio.set_grad_enabled(True)
    assert afnio.is_grad_enabled()


def test_decorators_on_sync_and_async_functions():
    @afnio.no_grad()
    def plain():
        return (Variable("a", requires_grad=True) + "b").requires_grad

    @afnio.no_grad()
    async def coroutine():
        await asyncio.sleep(0)
        return afnio.is_grad_enabled()

    assert plain() is False
    assert asyncio.run(coroutine()) is False
    assert afnio.is_grad_enabled()


def test_inference_mode():
    with afnio.inference_mode():
        assert not afnio.is_grad_enabled()
    with afnio.inference_mode(False):
        assert afnio.is_grad_enabled()


def test_mode_is_isolated_per_thread():
    seen = {}
    entered = threading.Event()
    release = threading.Event()

    def worker():
        seen["worker"] = afnio.is_grad_enabled()
        entered.set()
        release.wait(5)

    with afnio.no_grad():
        thread = threading.Thread(target=worker)
        thread.start()
        entered.wait(5)
        seen["main"] = afnio.is_grad_enabled()
        release.set()
        thread.join()
    assert seen == {"worker": True, "main": False}


def test_mode_is_isolated_per_task_and_follows_into_the_runtime():
    from afnio._runtime import run

    async def probe():
        return afnio.is_grad_enabled()

    async def disabled_task():
        with afnio.no_grad():
            await asyncio.sleep(0.01)
            return afnio.is_grad_enabled()

    async def main():
        return await asyncio.gather(disabled_task(), probe())

    assert asyncio.run(main()) == [False, True]
    with afnio.no_grad():
        assert run(probe()) is False
    assert run(probe()) is True


def test_bare_decorators_like_torch_2():
    """torch 2.x accepts ``@torch.no_grad`` / ``@torch.enable_grad`` / ``@torch.inference_mode``
    without parentheses, on plain and async functions, keeping the function's name."""

    @afnio.no_grad
    def plain(x):
        return (x + "b").requires_grad

    @afnio.inference_mode
    async def coroutine():
        await asyncio.sleep(0)
        return afnio.is_grad_enabled()

    @afnio.enable_grad
    def enabled():
        return afnio.is_grad_enabled()

    assert plain(Variable("a", requires_grad=True)) is False and plain.__name__ == "plain"
    assert asyncio.run(coroutine()) is False and coroutine.__name__ == "coroutine"
    with afnio.no_grad():
        assert enabled() is True
        assert afnio.is_grad_enabled() is False  # restored after the call
    assert afnio.is_grad_enabled()


def test_bare_decorator_forms_reject_non_functions():
    with pytest.raises(TypeError, match="no_grad"):
        afnio.no_grad(3)
    with pytest.raises(TypeError, match="inference_mode: expected a bool mode"):
        afnio.inference_mode("yes")
    # The usual forms still make context managers.
    assert isinstance(afnio.no_grad(), afnio.no_grad)
    assert isinstance(afnio.inference_mode(False), afnio.inference_mode)

"""Grad modes: nesting, decorators (sync and async), thread and task isolation."""

import asyncio
import threading

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

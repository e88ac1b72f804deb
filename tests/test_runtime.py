"""The runtime loop: sync entry point from plain code, threads, a running loop, and itself."""

import asyncio
import threading

import pytest

from afnio._runtime import in_runtime_thread, run


async def where():
    await asyncio.sleep(0)
    return threading.current_thread().name


def test_run_from_plain_code_uses_the_runtime_thread():
    assert run(where()) == "afnio-runtime"
    assert not in_runtime_thread()


def test_run_from_inside_a_running_loop_like_jupyter():
    async def cell():
        return run(where())  # a blocking call inside a running loop must not raise or hang

    assert asyncio.run(cell()) == "afnio-runtime"


def test_run_from_the_runtime_thread_itself_uses_a_private_loop():
    async def outer():
        return run(where())

    assert run(outer()).startswith("afnio-nested")


def test_run_from_many_threads():
    results = []

    def worker(i):
        async def value():
            await asyncio.sleep(0.01)
            return i

        results.append(run(value()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(8))


def test_exceptions_propagate():
    async def fail():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run(fail())

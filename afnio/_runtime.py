"""One background asyncio loop that every concurrent part of afnio runs on.

Synchronous user code (``Function.apply``, ``Variable.backward``, ``model.chat``) hands its
coroutines to :func:`run`, which executes them on a single daemon loop thread and blocks until
they finish. This works the same from a plain script, from a thread, and from a Jupyter cell that
already has a running loop of its own.

Example:
    >>> import asyncio
    >>> from afnio._runtime import run
    >>> async def double(x):
    ...     await asyncio.sleep(0)
    ...     return 2 * x
    >>> run(double(21))
    42
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["get_loop", "in_runtime_thread", "run"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    """Return the runtime loop, starting its daemon thread on first use.

    Returns:
        The event loop all of afnio's concurrent work is scheduled on.
    """
    global _loop, _thread
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            thread = threading.Thread(target=serve, name="afnio-runtime", daemon=True)
            thread.start()
            started.wait()
            _loop, _thread = loop, thread
        return _loop


def in_runtime_thread() -> bool:
    """Return True when the caller is running on the runtime loop's own thread."""
    return _thread is not None and threading.current_thread() is _thread


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code and return its result.

    The coroutine sees a copy of the caller's context variables (so ``no_grad`` and friends
    carry over). Called from the runtime thread itself — from a synchronous function that an
    async task on the runtime loop invoked — the coroutine runs on a private loop in a helper
    thread instead, so the call can never deadlock waiting for the loop it is blocking.

    Args:
        coro: The coroutine to run.

    Returns:
        Whatever the coroutine returns. Its exceptions propagate unchanged.
    """
    if in_runtime_thread():
        context = contextvars.copy_context()
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="afnio-nested") as pool:
            return pool.submit(context.run, asyncio.run, coro).result()
    future = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise

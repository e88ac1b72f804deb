"""Requests per second through FakeProviderServer with the real openai SDK, at concurrency 64.

Measures two clients against the same server: the bare ``openai.AsyncOpenAI`` SDK client, and
afnio's :class:`~afnio.models.openai.AsyncOpenAI` (the SDK plus afnio's request pipeline: limits,
retries, usage, pricing). The server runs in a child process by default so that it doesn't share
the client's GIL; ``--in-process`` runs it on a thread of this process instead.

Run:
    python benchmarks/fake_server_throughput.py [--requests 2000] [--in-process]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from collections.abc import Awaitable, Callable

import openai

from afnio.models.openai import AsyncOpenAI
from afnio.testing import FakeProviderServer

CONCURRENCY = 64
MESSAGES = [{"role": "user", "content": "benchmark request"}]


def _serve(latency: float, connection) -> None:
    with FakeProviderServer(latency=latency) as server:
        connection.send(server.openai_base_url)
        connection.recv()  # wait for the stop message
        connection.send((len(server.requests), server.max_in_flight))


async def _drive(send: Callable[[], Awaitable[str]], total: int) -> float:
    """Run ``total`` requests with CONCURRENCY workers; return requests per second."""
    remaining = CONCURRENCY  # warm-up: open the connection pool

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await send()

    await asyncio.gather(*[worker() for _ in range(CONCURRENCY)])
    remaining = total
    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(CONCURRENCY)])
    return total / (time.perf_counter() - started)


async def _measure(base_url: str, total: int) -> tuple[float, float]:
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)

    async def sdk_send() -> str:
        completion = await sdk.chat.completions.create(model="gpt-4.1-nano", messages=MESSAGES)
        return completion.choices[0].message.content or ""

    client = AsyncOpenAI("gpt-4.1-nano", base_url=base_url, api_key="bench")

    async def afnio_send() -> str:
        return await client.achat(MESSAGES)

    sdk_rate = await _drive(sdk_send, total)
    afnio_rate = await _drive(afnio_send, total)
    await sdk.close()
    await client.aclose()
    return sdk_rate, afnio_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--in-process", action="store_true", help="serve from a thread here")
    options = parser.parse_args()

    print(f"concurrency {CONCURRENCY}, {options.requests} requests per measurement, server "
          f"{'in process (thread)' if options.in_process else 'in a child process'}")
    for latency in (0.0, 0.05):
        if options.in_process:
            with FakeProviderServer(latency=latency) as server:
                sdk_rate, afnio_rate = asyncio.run(_measure(server.openai_base_url,
                                                            options.requests))
                seen, peak = len(server.requests), server.max_in_flight
        else:
            parent, child = multiprocessing.Pipe()
            process = multiprocessing.get_context("spawn").Process(target=_serve,
                                                                   args=(latency, child))
            process.start()
            base_url = parent.recv()
            sdk_rate, afnio_rate = asyncio.run(_measure(base_url, options.requests))
            parent.send("stop")
            seen, peak = parent.recv()
            process.join()
        ideal = f" (ideal {CONCURRENCY / latency:.0f})" if latency else ""
        print(f"latency {latency * 1000:4.0f} ms: openai SDK {sdk_rate:7.0f} req/s, "
              f"afnio AsyncOpenAI {afnio_rate:7.0f} req/s{ideal}; server saw {seen} requests, "
              f"max {peak} in flight")


if __name__ == "__main__":
    main()

"""Response-cache hit latency: the raw SQLite lookup, its async form, and a full client call.

Run: ``python benchmarks/cache_hit.py [--n 2000]``. Prints microseconds per hit (mean, p50,
p99) for:

- ``get``: ``ResponseCache.get`` (a primary-key SELECT on this thread's connection),
- ``aget``: ``await ResponseCache.aget`` (the same SELECT in a worker thread),
- ``achat``: ``await client.achat`` answered from the cache (message checks, key hashing, lookup,
  usage recording),
- ``chat``: the synchronous ``client.chat`` (adds the hop to afnio's runtime loop),
- and, for comparison, ``put``: storing a new reply (one committed WAL transaction).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from afnio.models.cache import CachedResponse, ResponseCache
from afnio.testing import ScriptedModel


def report(name: str, seconds: list[float]) -> None:
    micros = sorted(s * 1e6 for s in seconds)
    p99 = micros[min(len(micros) - 1, int(len(micros) * 0.99))]
    print(
        f"{name:6s} n={len(micros):5d}  mean {statistics.fmean(micros):8.1f} us  "
        f"p50 {statistics.median(micros):8.1f} us  p99 {p99:8.1f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="hits to time per variant")
    n = parser.parse_args().n
    with tempfile.TemporaryDirectory() as directory:
        cache = ResponseCache(os.path.join(directory, "bench.sqlite"))
        messages = [
            {"role": "system", "content": "You classify customer messages by sentiment."},
            {"role": "user", "content": "The delivery was late but the support was great."},
        ]
        key = cache.key("scripted", "scripted", messages, {"temperature": 0})

        put_times = []
        for i in range(n):
            start = time.perf_counter()
            cache.put(f"filler-{i}", CachedResponse("x" * 200, 40, 5), provider="p", model="m")
            put_times.append(time.perf_counter() - start)
        cache.put(key, CachedResponse("positive", 40, 1), provider="scripted", model="scripted")

        get_times = []
        for _ in range(n):
            start = time.perf_counter()
            assert cache.get(key) is not None
            get_times.append(time.perf_counter() - start)

        client = ScriptedModel(["positive"], cache=cache)

        async def timed_async() -> tuple[list[float], list[float]]:
            aget_times, achat_times = [], []
            for _ in range(n):
                start = time.perf_counter()
                await cache.aget(key)
                aget_times.append(time.perf_counter() - start)
            for _ in range(n):
                start = time.perf_counter()
                await client.achat(messages, temperature=0)
                achat_times.append(time.perf_counter() - start)
            return aget_times, achat_times

        aget_times, achat_times = asyncio.run(timed_async())
        chat_times = []
        for _ in range(n):
            start = time.perf_counter()
            client.chat(messages, temperature=0)
            chat_times.append(time.perf_counter() - start)
        assert client.calls == 0, "every call above must have been a cache hit"

        print(f"response cache hit latency ({len(cache)} rows, WAL, {os.cpu_count()} cpus)")
        report("get", get_times)
        report("aget", aget_times)
        report("achat", achat_times)
        report("chat", chat_times)
        report("put", put_times)


if __name__ == "__main__":
    main()

"""What scaling past one process costs: requests in flight, endpoint pools, Ray.

Four measurements, each printed as a table (``docs/scaling.md`` quotes them):

- ``inflight``: N requests sent at once by one process (afnio's ``AsyncOpenAI``) to a
  ``FakeProviderServer`` in a child process that answers each after 1 s. Wall time close to 1 s
  means the process kept all N in flight; what it takes beyond that is the process's CPU cost.
- ``pool``: 64 requests to replicas that each serve 8 at a time (a GPU server's batch slots,
  set as ``PoolEndpoint(max_concurrency=8)``) with 200 ms latency, through an ``EndpointPool``
  of 1, 2 and 4 endpoints; plus what a failover costs: a request whose first endpoint refuses
  connections, and requests in flight on an endpoint that is killed.
- ``ray``: ``ray.init(num_cpus=2)``, the round trip of a trivial task, and ``evaluate()`` of 32
  samples whose scoring burns 50 ms of CPU each, in this process and sharded over 2 Ray
  workers; and the same for an agent that only waits on its model (100 ms per request).

Run:
    python benchmarks/scaling.py            # all
    python benchmarks/scaling.py inflight   # or pool, ray
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import threading
import time
import warnings

import afnio
from afnio import cognitive
from afnio._runtime import run
from afnio.cognitive import Parameter
from afnio.models import EndpointPool, PoolEndpoint, set_price
from afnio.models.openai import AsyncOpenAI
from afnio.testing import FakeProviderServer, ScriptedModel

MODEL = "gpt-4.1-nano"


def _serve(latencies: list[float], connection) -> None:
    servers = [FakeProviderServer(latency=latency).start() for latency in latencies]
    connection.send([server.openai_base_url for server in servers])
    connection.recv()
    connection.send([server.max_in_flight for server in servers])
    for server in servers:
        server.close()


class Servers:
    """FakeProviderServers in a child process (so they don't share this process's GIL)."""

    def __init__(self, *latencies: float) -> None:
        self._parent, child = multiprocessing.Pipe()
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(target=_serve, args=(list(latencies), child))

    def __enter__(self) -> list[str]:
        self._process.start()
        return self._parent.recv()

    def __exit__(self, *exc_info: object) -> None:
        self._parent.send("stop")
        self.max_in_flight = self._parent.recv()
        self._process.join()


def ask(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"request {i}"}]


async def _all_at_once(client, count: int) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(client.achat(ask(i)) for i in range(count)))
    return time.perf_counter() - started


def inflight() -> None:
    print("\n## inflight: N requests at once from one process, server latency 1 s")
    print("| requests | wall s | CPU s (this process) | server max in flight |")
    print("|---:|---:|---:|---:|")
    for count in (100, 250, 500, 1000):
        servers = Servers(1.0)
        with servers as (url,):
            client = AsyncOpenAI(MODEL, base_url=url, api_key="bench", max_retries=0,
                                 timeout=120)
            run(_all_at_once(client, 8))  # warm up the connection pool
            cpu = time.process_time()
            wall = run(_all_at_once(client, count))
            cpu = time.process_time() - cpu
            run(client.aclose())
        print(f"| {count} | {wall:.2f} | {cpu:.2f} | {servers.max_in_flight[0]} |")


def pool() -> None:
    print("\n## pool: 64 requests, endpoints serving 8 at a time with 200 ms latency")
    print("| endpoints | wall s | ideal s |")
    print("|---:|---:|---:|")
    for count in (1, 2, 4):
        with Servers(*[0.2] * count) as urls:
            client = EndpointPool(MODEL, [PoolEndpoint(url, max_concurrency=8) for url in urls],
                                  api_key="bench")
            run(_all_at_once(client, 8))
            wall = run(_all_at_once(client, 64))
            run(client.aclose())
        print(f"| {count} | {wall:.2f} | {64 / (8 * count) * 0.2:.2f} |")

    print("\n## failover cost (servers answer at once)")
    dead = FakeProviderServer().start()
    dead_url = dead.openai_base_url
    dead.close()
    with FakeProviderServer() as alive:
        healthy = EndpointPool(MODEL, [alive.openai_base_url], api_key="bench")
        run(_all_at_once(healthy, 4))
        times = [run(_all_at_once(healthy, 1)) for _ in range(20)]
        normal = sorted(times)[len(times) // 2]
        refusing = []
        for _ in range(20):
            client = EndpointPool(MODEL, [dead_url, alive.openai_base_url], api_key="bench")
            client.check_health()  # builds both SDK clients and connects to the live one
            refusing.append(run(_all_at_once(client, 1)))
            run(client.aclose())
        run(healthy.aclose())
    print(f"one request, healthy endpoint: {normal * 1000:.1f} ms (median of 20)")
    print(f"one request whose first endpoint refuses connections: "
          f"{sorted(refusing)[len(refusing) // 2] * 1000:.1f} ms (median of 20; the endpoint "
          "then leaves the rotation after failure_threshold=2 such failures)")

    held = threading.Event()

    async def hang(body):
        if len(victim.requests) >= 16:
            held.set()
        await asyncio.Event().wait()

    victim = FakeProviderServer(reply=hang).start()
    with FakeProviderServer() as survivor:
        client = EndpointPool(MODEL, [victim.openai_base_url, survivor.openai_base_url],
                              api_key="bench")
        result: list[float] = []
        worker = threading.Thread(target=lambda: result.append(run(_all_at_once(client, 32))))
        worker.start()
        held.wait(30)
        killed = time.perf_counter()
        victim.close()
        worker.join()
        recovered = time.perf_counter() - killed
        stats = client.endpoint_stats()
        run(client.aclose())
    print(f"32 requests, 16 in flight on an endpoint that is killed: all answered "
          f"{recovered * 1000:.0f} ms after the kill; {stats[1]['requests']} answered by the "
          f"survivor, {stats[0]['failures']} failed attempts, nothing answered twice")


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def heavy_score(prediction: str, target: str) -> int:
    _burn(0.05)
    return int(prediction == target)


class Heavy(cognitive.Module):
    """Echoes each sample (no model), then scores it with a CPU-heavy function."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = Parameter("", role="prefix")
        self.judge = cognitive.DeterministicEvaluator(heavy_score, "exact match (heavy)")

    def validation_step(self, batch, batch_idx):
        texts, targets = batch
        return self.judge(self.prefix + texts, targets)


class Waiting(cognitive.Module):
    """One model request per sample, 100 ms each, cheap scoring."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt = Parameter("echo", role="system prompt")
        self.chat = cognitive.ChatCompletion(ScriptedModel(latency=0.1))
        self.judge = cognitive.ExactMatchEvaluator()

    def validation_step(self, batch, batch_idx):
        texts, targets = batch
        replies = self.chat([{"role": "system", "content": [self.prompt]},
                             {"role": "user", "content": ["{t}"]}], inputs={"t": texts})
        return self.judge(replies, targets)


def ray_costs() -> None:
    import ray

    from afnio.trainer import RayEvaluation, evaluate
    from afnio.utils.data import DataLoader

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init = time.perf_counter() - started

    @ray.remote
    def nothing(x):
        return x

    ray.get([nothing.remote(i) for i in range(20)])  # start the workers
    started = time.perf_counter()
    for i in range(50):
        ray.get(nothing.remote(i))
    round_trip = (time.perf_counter() - started) / 50
    started = time.perf_counter()
    ray.get([nothing.remote(i) for i in range(200)])
    batch = time.perf_counter() - started
    print("\n## ray")
    print(f"ray.init(num_cpus=2): {init:.1f} s; one trivial task, round trip: "
          f"{round_trip * 1000:.1f} ms; 200 tasks at once: {batch * 1000:.0f} ms")

    data = [(afnio.Variable(f"s{i}", role="sample"), f"s{i}") for i in range(32)]
    loader = DataLoader(data, batch_size=4)
    print("| agent | one process s | 2 Ray workers, first call s | 2 Ray workers, again s |")
    print("|---|---:|---:|---:|")
    for name, factory in (("CPU-heavy scoring (50 ms/sample)", Heavy),
                          ("waits on its model (100 ms/request)", Waiting)):
        agent = factory()
        started = time.perf_counter()
        local = evaluate(agent, loader)
        here = time.perf_counter() - started
        walls = []
        for _ in range(2):
            started = time.perf_counter()
            remote = evaluate(agent, loader, distributed=RayEvaluation(factory, num_workers=2))
            walls.append(time.perf_counter() - started)
        assert remote.metrics == local.metrics
        print(f"| {name} | {here:.2f} | {walls[0]:.2f} | {walls[1]:.2f} |")
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = {"inflight": inflight, "pool": pool, "ray": ray_costs}
    parser.add_argument("parts", nargs="*", help=f"any of {', '.join(parts)} (default: all)")
    options = parser.parse_args()
    unknown = sorted(set(options.parts) - set(parts))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(parts)}")
    warnings.simplefilter("ignore")  # unpriced fake models, assumed context windows
    set_price(MODEL, input=0.1, output=0.4)
    for part in options.parts or list(parts):
        parts[part]()


if __name__ == "__main__":
    main()

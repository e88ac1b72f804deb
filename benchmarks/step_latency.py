"""Wall time of one training step of a 3-stage chain, next to the time it can't beat.

The step: three ChatCompletion stages (stage k's output feeds stage k+1 through the ``{x}``
placeholder; each stage's system prompt is a Parameter requiring grad), an LMJudgeEvaluator as
the loss (one LLM call per sample), ``explanation.backward()`` and a ``TGD`` step over the three
prompts. Every model request takes ``--latency`` seconds. The requests form 8 dependent levels:

    forward stage 1, 2, 3 (B each) -> judge (B) -> backward stage 3 (B + 1: the shared prompt
    plus one call per sample for the input that came from stage 2), stage 2 (B + 1), stage 1
    (1: the inputs of stage 1 are data) -> optimizer (3: one per prompt)

so a step makes 6B + 6 LLM calls and its critical path is (3 + 1 + 3 + 1) x latency.

Two measurements per batch size B:

(a) ``ScriptedModel(latency=...)`` in process: wall time against the critical-path limit.
(b) ``FakeProviderServer(latency=...)`` with afnio's ``AsyncOpenAI`` (the official ``openai``
    SDK underneath): wall time against the *transport floor*, which replays the very request
    bodies the afnio step sent, level by level (each level's requests all at once), with the bare
    ``openai.AsyncOpenAI`` client through the same server on the same event loop.

The scripted replies are well formed for every kind of call (stage output, judge JSON,
``<FEEDBACK>``, ``<IMPROVED_VARIABLE>``), and the script checks that every level made exactly the
expected number of calls, so no retry hides in the numbers. The server runs in a child process
by default (a real provider does not share our GIL); ``--server thread`` runs it in this process.

Run:
    python benchmarks/step_latency.py [--batches 1 8 32 64] [--latency 0.05] [--repeat 5]
        [--server process|thread] [--only a|b]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import openai
from _chain import chain, stage_prompts

import afnio
from afnio._runtime import run
from afnio.autodiff import prompts as autodiff_prompts
from afnio.autodiff.evaluator import LMJudgeEvaluator
from afnio.models import ChatCompletionModel, track_usage
from afnio.models.openai import AsyncOpenAI
from afnio.optim import TGD
from afnio.optim import prompts as optim_prompts
from afnio.testing import FakeProviderServer, ScriptedModel

STAGES = 3
MODEL = "gpt-4.1-nano"
LEVELS = ["forward 1", "forward 2", "forward 3", "judge", "backward 3", "backward 2",
          "backward 1", "optimizer"]
_STAGE = re.compile(r"Stage (\d)")
_GRADIENT_SYSTEM = autodiff_prompts.GRADIENT_SYSTEM_PROMPT[:40]
_OPTIMIZER_SYSTEM = optim_prompts.TGD_SYSTEM_PROMPT[:40]
_JUDGE_INSTRUCTION = autodiff_prompts.JUDGE_FORMAT_INSTRUCTION[:40]


# --------------------------------------------------------------------------- the scripted model
def level_of(messages: list[dict[str, str]]) -> int:
    """Which of the 8 levels a request belongs to (an index into LEVELS)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    if system.startswith(_OPTIMIZER_SYSTEM):
        return 7
    if system.startswith(_GRADIENT_SYSTEM):
        # The conversation shown to the backward model starts with that stage's system prompt;
        # outputs and feedback never contain the word "Stage".
        stage = int(_STAGE.search(messages[1]["content"]).group(1))
        return 4 + (STAGES - stage)
    if _JUDGE_INSTRUCTION in messages[-1]["content"]:
        return 3
    return int(_STAGE.match(system).group(1)) - 1


def reply(messages: list[dict[str, str]], **completion_args: Any) -> str:
    """A well-formed reply for every kind of request the step makes."""
    level = level_of(messages)
    if level < STAGES:
        return f"s{level + 1}({messages[-1]['content']})"
    if level == 3:
        return '{"score": 0, "explanation": "The answer leaves out the delivery date."}'
    if level < 7:
        return "<FEEDBACK>Ask for the delivery date explicitly.</FEEDBACK>"
    stage = _STAGE.search(messages[1]["content"]).group(1)
    return (f"<IMPROVED_VARIABLE>Stage {stage}: answer the customer and always give the "
            "delivery date.</IMPROVED_VARIABLE>")


def server_reply(body: dict[str, Any]) -> str:
    return reply(body["messages"])


def expected_calls(batch: int) -> list[int]:
    return [batch, batch, batch, batch, batch + 1, batch + 1, 1, STAGES]


# --------------------------------------------------------------------------- one training step
def training_step(model: ChatCompletionModel, batch: int) -> tuple[float, float, int, int]:
    """One forward -> judge -> backward -> optimizer step; returns (wall seconds, CPU seconds of
    this process, calls, prompt tokens). ``model`` answers every kind of request."""
    prompts = stage_prompts(STAGES)
    optimizer = TGD(prompts, model_client=model)
    questions = afnio.Variable([f"Where is order {i}?" for i in range(batch)],
                               role="customer questions")
    targets = afnio.Variable([f"Order {i} arrives on Monday." for i in range(batch)],
                             role="reference answers")
    rubric = afnio.Variable("Reference: {target}\nAnswer: {prediction}\nIs the answer right?",
                            role="judge rubric")
    with track_usage() as used:
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        x = chain(model, prompts, questions)
        _, explanation = LMJudgeEvaluator.apply(
            model, [{"role": "user", "content": [rubric]}], x, target=targets
        )
        explanation.backward()
        optimizer.step()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if not all(p.data.endswith("delivery date.") for p in prompts):
        raise RuntimeError("the optimizer step did not update every prompt")
    return seconds, cpu, used.requests, used.prompt_tokens


def check_levels(counts: list[int], batch: int, where: str) -> None:
    if counts != expected_calls(batch):
        raise RuntimeError(
            f"{where}, B={batch}: calls per level {dict(zip(LEVELS, counts))} differ from the "
            f"expected {dict(zip(LEVELS, expected_calls(batch)))} (a retry or an extra call)"
        )


def per_level(requests: list[list[dict[str, str]]]) -> list[list[int]]:
    """Indices of the requests at each level."""
    levels: list[list[int]] = [[] for _ in LEVELS]
    for index, messages in enumerate(requests):
        levels[level_of(messages)].append(index)
    return levels


# --------------------------------------------------------------------------- (a) scripted
def scripted(batches: list[int], latency: float, repeat: int) -> None:
    limit = (STAGES + 1 + STAGES + 1) * latency
    print(f"(a) ScriptedModel(latency={latency * 1000:.0f} ms), in process; critical-path limit "
          f"(3 forward + 1 loss + 3 backward + 1 optimizer) x latency = {limit * 1000:.0f} ms; "
          f"median of {repeat}")
    print(f"{'B':>4} {'LLM calls':>10} {'prompt tok':>11} {'wall ms':>9} {'limit ms':>9} "
          f"{'ratio':>6} {'CPU ms':>8}")
    model = ScriptedModel(reply, latency=latency, model=MODEL)
    training_step(model, max(batches))  # warm-up: imports, the runtime loop, tokenizer tables
    for batch in batches:
        runs = []
        for _ in range(repeat):
            model.reset()
            wall, cpu, calls, tokens = training_step(model, batch)
            check_levels([len(level) for level in per_level([m for m, _ in model.requests])],
                         batch, "scripted")
            if calls != 6 * batch + 6:
                raise RuntimeError(f"B={batch}: {calls} requests recorded, expected "
                                   f"{6 * batch + 6}")
            runs.append((wall, cpu))
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{batch:>4} {calls:>10} {tokens:>11} {wall * 1000:>9.1f} {limit * 1000:>9.0f} "
              f"{wall / limit:>6.2f} {cpu * 1000:>8.1f}")


# --------------------------------------------------------------------------- (b) fake server
class _ThreadServer:
    """The fake server on a thread of this process."""

    def __init__(self, latency: float) -> None:
        self.server = FakeProviderServer(reply=server_reply, latency=latency).start()
        self.base_url = self.server.openai_base_url

    def take_requests(self) -> list[dict[str, Any]]:
        requests = list(self.server.requests)
        self.server.reset()
        return requests

    def close(self) -> None:
        self.server.close()


def _serve(latency: float, connection: Any) -> None:
    with FakeProviderServer(reply=server_reply, latency=latency) as server:
        connection.send(server.openai_base_url)
        while connection.recv() == "take":
            connection.send(list(server.requests))
            server.reset()


class _ProcessServer:
    """The fake server in a child process (its own GIL, like a real provider)."""

    def __init__(self, latency: float) -> None:
        self.connection, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(latency, child), daemon=True
        )
        self.process.start()
        self.base_url = self.connection.recv()

    def take_requests(self) -> list[dict[str, Any]]:
        self.connection.send("take")
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send("stop")
        self.process.join()


def transport_floor(
    sdk: openai.AsyncOpenAI, bodies: list[list[dict[str, Any]]]
) -> tuple[float, float]:
    """(wall, CPU) seconds to send each level's bodies at once with the bare SDK, level after
    level."""

    async def replay() -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        for level in bodies:
            await asyncio.gather(*[sdk.chat.completions.create(**body) for body in level])
        return time.perf_counter() - start, time.process_time() - cpu_start

    return run(replay())


def through_server(batches: list[int], latency: float, repeat: int, mode: str) -> None:
    server = _ProcessServer(latency) if mode == "process" else _ThreadServer(latency)
    try:
        model = AsyncOpenAI(MODEL, base_url=server.base_url, api_key="benchmark")
        # The bare SDK client lives on afnio's runtime loop, like afnio's own client, so both
        # keep their connections open between measurements.
        sdk: openai.AsyncOpenAI = run(_make_sdk(server.base_url))
        print(f"(b) FakeProviderServer(latency={latency * 1000:.0f} ms) in a "
              f"{'child process' if mode == 'process' else 'thread of this process'}, afnio "
              f"AsyncOpenAI vs the bare openai SDK replaying the same requests level by level; "
              f"median of {repeat}; critical-path limit {8 * latency * 1000:.0f} ms")
        print(f"{'B':>4} {'LLM calls':>10} {'prompt tok':>11} {'wall ms':>9} {'floor ms':>9} "
              f"{'ratio':>6} {'CPU ms':>8} {'floor CPU':>10}")

        def step_and_floor(batch: int) -> tuple[float, float, float, float, int, int]:
            wall, cpu, calls, tokens = training_step(model, batch)
            bodies = server.take_requests()
            levels = per_level([body["messages"] for body in bodies])
            check_levels([len(level) for level in levels], batch, "fake server")
            if calls != len(bodies) or calls != 6 * batch + 6:
                raise RuntimeError(f"B={batch}: afnio counted {calls} requests, the server "
                                   f"saw {len(bodies)}, expected {6 * batch + 6}")
            floor, floor_cpu = transport_floor(sdk, [[bodies[i] for i in level]
                                                     for level in levels])
            if len(server.take_requests()) != len(bodies):
                raise RuntimeError("the floor replay did not send every request once")
            return wall, floor, cpu, floor_cpu, calls, tokens

        step_and_floor(max(batches))  # warm-up: opens the connections of both clients
        for batch in batches:
            runs = [step_and_floor(batch) for _ in range(repeat)]
            wall, floor, cpu, floor_cpu = (statistics.median(r[i] for r in runs)
                                           for i in range(4))
            calls, tokens = runs[0][4], runs[0][5]
            print(f"{batch:>4} {calls:>10} {tokens:>11} {wall * 1000:>9.1f} {floor * 1000:>9.1f} "
                  f"{wall / floor:>6.2f} {cpu * 1000:>8.1f} {floor_cpu * 1000:>10.1f}")
        run(sdk.close())
        run(model.aclose())
    finally:
        server.close()


async def _make_sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="benchmark", max_retries=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--server", choices=["process", "thread"], default="process")
    parser.add_argument("--only", choices=["a", "b"])
    args = parser.parse_args()
    print(f"one training step of a {STAGES}-stage chain: 6B + 6 LLM calls in 8 levels")
    runners: dict[str, Callable[[], None]] = {
        "a": lambda: scripted(args.batches, args.latency, args.repeat),
        "b": lambda: through_server(args.batches, args.latency, args.repeat, args.server),
    }
    for name, runner in runners.items():
        if args.only in (None, name):
            runner()


if __name__ == "__main__":
    main()

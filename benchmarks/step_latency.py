"""Wall time of one training step of a 3-stage chain, next to the time it can't beat.

The step: three ChatCompletion stages (stage k's output feeds stage k+1 through the ``{x}``
placeholder; each stage's system prompt is a Parameter requiring grad), an LMJudgeEvaluator as
the loss (one LLM call per sample), ``explanation.backward()`` and a ``TGD`` step over the three
prompts: 6B + 6 LLM calls. Every request takes as long as a :class:`~afnio.testing.LatencyModel`
says — by default 50 ms plus 0.04 ms per prompt token (10 ms per 1,000 characters, as real
prefill grows) plus 1 ms per output token — so a shared prompt's request, which shows every
sample, takes longer than a per-sample one.

The requests form this DAG (each group waits only for the groups its inputs come from):

    F1 -> F2 -> F3 -> J            forward stages 1-3 and the judge, B requests each
    J  -> G3x, G3p                 backward of stage 3: B per-sample requests for its input,
                                   1 shared request for its prompt
    G3x -> G2x, G2p                stage 2 needs only the gradient of its output (G3x)
    G2x -> G1p                     stage 1's inputs are data: only its prompt's request
    G1p, G2p, G3p -> Ok            optimizer.step() starts once backward() has returned

A Variable is one batch, so a group starts when all requests of the groups it waits for have
been answered. The **critical-path limit** is the longest path through the DAG with every
request's modelled duration (computed afterwards from the requests the step really sent).

Parts:

(a) ``ScriptedModel(latency=model)`` in process: wall time against the critical-path limit.
(b) ``FakeProviderServer(latency=model)`` with afnio's ``AsyncOpenAI`` (the official ``openai``
    SDK underneath): wall time against the *SDK floor*, which replays the very request bodies the
    afnio step sent through the same DAG (each group's requests at once, as soon as the groups
    it waits for are answered), with the bare ``openai.AsyncOpenAI`` client, through the same
    server, on the same event loop.
(c) cold: the first step of a fresh process (three clients — forward, backward, optimizer — on
    the same endpoint, created just before the step) and its second step, each against the SDK
    floor of its own requests (replayed by this, warm, process).
(v) validation: a forward pass (3 stages and the judge, no grad) over N samples in one batch,
    against the SDK floor of its 4 levels.

The script checks that every group made exactly the expected number of calls (so no retry hides
in the numbers) and that every prompt was updated. The server runs in a child process (a real
provider does not share our GIL).

Run:
    python benchmarks/step_latency.py [--batches 1 8 32 64] [--repeat 5] [--repeat-large 3]
        [--only a b c v]
        [--latency 0.05] [--per-prompt-token 0.00004] [--per-output-token 0.001] [--jitter 0]
        [--cold-batch 32] [--validation 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import openai
from _chain import chain, order_questions, stage_prompts

import afnio
from afnio._runtime import run
from afnio.autodiff import prompts as autodiff_prompts
from afnio.autodiff.evaluator import LMJudgeEvaluator
from afnio.models import ChatCompletionModel, track_usage
from afnio.models.openai import AsyncOpenAI
from afnio.models.tokens import count_message_tokens, count_tokens
from afnio.optim import TGD
from afnio.optim import prompts as optim_prompts
from afnio.testing import FakeProviderServer, LatencyModel, ScriptedModel

STAGES = 3
MODEL = "gpt-4.1-nano"
GROUPS = ["F1", "F2", "F3", "J", "G3x", "G3p", "G2x", "G2p", "G1p", "O3", "O2", "O1"]
WAITS_FOR = {
    "F1": [], "F2": ["F1"], "F3": ["F2"], "J": ["F3"], "G3x": ["J"], "G3p": ["J"],
    "G2x": ["G3x"], "G2p": ["G3x"], "G1p": ["G2x"],
    # optimizer.step() runs once backward() has returned: every prompt's request waits for all
    # of the backward pass.
    **dict.fromkeys(["O3", "O2", "O1"], ["G3p", "G2p", "G1p"]),
}
_STAGE = re.compile(r"Stage (\d)")
_GRADIENT_SYSTEM = autodiff_prompts.GRADIENT_SYSTEM_PROMPT[:40]
_OPTIMIZER_SYSTEM = optim_prompts.TGD_SYSTEM_PROMPT[:40]
_JUDGE_INSTRUCTION = autodiff_prompts.JUDGE_FORMAT_INSTRUCTION[:40]
_MARK = autodiff_prompts.MARKED_VARIABLE.split("{text}")[0]


# --------------------------------------------------------------------------- the scripted replies
def group_of(messages: list[dict[str, str]]) -> str:
    """Which group of the DAG a request belongs to."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    if system.startswith(_OPTIMIZER_SYSTEM):
        return f"O{_STAGE.search(messages[1]['content']).group(1)}"
    if system.startswith(_GRADIENT_SYSTEM):
        # The conversation shown starts with that stage's system prompt; outputs and feedback
        # never contain the word "Stage". The prompt's request marks the prompt itself.
        user = messages[1]["content"]
        stage = _STAGE.search(user).group(1)
        return f"G{stage}{'p' if (_MARK + 'Stage') in user else 'x'}"
    if _JUDGE_INSTRUCTION in messages[-1]["content"]:
        return "J"
    return f"F{_STAGE.match(system).group(1)}"


def reply(messages: list[dict[str, str]], **completion_args: Any) -> str:
    """A well-formed reply for every kind of request the step makes."""
    group = group_of(messages)
    if group[0] == "F":
        return f"s{group[1]}({messages[-1]['content']})"
    if group == "J":
        return '{"score": 0, "explanation": "The answer leaves out the delivery date."}'
    if group[0] == "G":
        return "<FEEDBACK>Ask for the delivery date explicitly.</FEEDBACK>"
    return (f"<IMPROVED_VARIABLE>Stage {group[1]}: answer the customer and always give the "
            "delivery date.</IMPROVED_VARIABLE>")


def server_reply(body: dict[str, Any]) -> str:
    return reply(body["messages"])


def expected_calls(batch: int) -> dict[str, int]:
    per_sample = {"F1", "F2", "F3", "J", "G3x", "G2x"}
    return {group: batch if group in per_sample else 1 for group in GROUPS}


def by_group(requests: list[list[dict[str, str]]]) -> dict[str, list[int]]:
    """Indices of the requests in each group."""
    groups: dict[str, list[int]] = {group: [] for group in GROUPS}
    for index, messages in enumerate(requests):
        groups[group_of(messages)].append(index)
    return groups


def check_groups(groups: dict[str, list[int]], batch: int, where: str) -> None:
    counts = {group: len(indices) for group, indices in groups.items()}
    if counts != expected_calls(batch):
        raise RuntimeError(f"{where}, B={batch}: calls per group {counts} differ from the "
                           f"expected {expected_calls(batch)} (a retry or an extra call)")


def critical_path(durations: dict[str, list[float]]) -> float:
    """The longest path through the DAG, each group lasting as long as its longest request."""
    end: dict[str, float] = {}
    for group in GROUPS:  # listed so that every group comes after those it waits for
        start = max((end[other] for other in WAITS_FOR[group]), default=0.0)
        end[group] = start + max(durations.get(group) or [0.0])
    return max(end.values())


def scripted_durations(requests: list[list[dict[str, str]]], latency: LatencyModel,
                       groups: dict[str, list[int]]) -> dict[str, list[float]]:
    """Each request's modelled duration, counted as ScriptedModel counts (tiktoken)."""
    def seconds(messages: list[dict[str, str]]) -> float:
        return latency.seconds(
            count_message_tokens(messages, MODEL), count_tokens(reply(messages), MODEL),
            LatencyModel.request_key(m["content"] for m in messages),
        )
    return {g: [seconds(requests[i]) for i in indices] for g, indices in groups.items()}


def server_durations(bodies: list[dict[str, Any]], latency: LatencyModel,
                     groups: dict[str, list[int]]) -> dict[str, list[float]]:
    """Each request's modelled duration, counted as the fake server counts (words)."""
    def seconds(body: dict[str, Any]) -> float:
        texts = [m["content"] for m in body["messages"]]
        prompt = sum(FakeProviderServer.count_tokens(text) for text in texts)
        output = FakeProviderServer.count_tokens(server_reply(body))
        return latency.seconds(prompt, output, LatencyModel.request_key(texts))
    return {g: [seconds(bodies[i]) for i in indices] for g, indices in groups.items()}


# --------------------------------------------------------------------------- one training step
def training_step(
    model: ChatCompletionModel, batch: int, backward: ChatCompletionModel | None = None,
    optimizer_model: ChatCompletionModel | None = None,
) -> tuple[float, float, int, int]:
    """One forward -> judge -> backward -> optimizer step; returns (wall seconds, CPU seconds of
    this process, calls, prompt tokens). ``model`` answers the forward requests, ``backward``
    (default ``model``) the gradient requests, ``optimizer_model`` (default ``model``) TGD's."""
    backward = backward or model
    prompts = stage_prompts(STAGES)
    optimizer = TGD(prompts, model_client=optimizer_model or model)
    questions, targets, rubric = order_questions(batch)
    with track_usage() as used:
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        x = chain(model, prompts, questions, backward_model_client=backward)
        _, explanation = LMJudgeEvaluator.apply(
            model, [{"role": "user", "content": [rubric]}], x, target=targets,
            backward_model_client=backward,
        )
        explanation.backward()
        optimizer.step()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if not all(p.data.endswith("delivery date.") for p in prompts):
        raise RuntimeError("the optimizer step did not update every prompt")
    return seconds, cpu, used.requests, used.prompt_tokens


def validation_pass(model: ChatCompletionModel, samples: int) -> tuple[float, float, int]:
    """Forward (3 stages and the judge, no grad) over ``samples`` samples in one batch; returns
    (wall seconds, CPU seconds, calls)."""
    prompts = stage_prompts(STAGES)
    questions, targets, rubric = order_questions(samples)
    with track_usage() as used, afnio.no_grad():
        start, cpu_start = time.perf_counter(), time.process_time()
        x = chain(model, prompts, questions)
        LMJudgeEvaluator.apply(model, [{"role": "user", "content": [rubric]}], x,
                               target=targets)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu, used.requests


# --------------------------------------------------------------------------- (a) scripted
def repeats(batch: int, repeat: int, repeat_large: int) -> int:
    """How many times B is measured: ``repeat_large`` times above B = 256."""
    return repeat if batch <= 256 else repeat_large


def scripted(batches: list[int], latency: LatencyModel, repeat: int,
             repeat_large: int) -> None:
    print(f"(a) ScriptedModel({describe(latency)}), in process; wall against the critical-path "
          f"limit of the request DAG; median of {repeat} ({repeat_large} above B = 256)")
    print(f"{'B':>5} {'LLM calls':>10} {'prompt tok':>11} {'wall ms':>9} {'limit ms':>9} "
          f"{'ratio':>6} {'CPU ms':>8}")
    model = ScriptedModel(reply, latency=latency, model=MODEL)
    training_step(model, max(batches))  # warm-up: imports, the runtime loop, tokenizer tables
    for batch in batches:
        runs = []
        for _ in range(repeats(batch, repeat, repeat_large)):
            model.reset()
            wall, cpu, calls, tokens = training_step(model, batch)
            requests = [messages for messages, _ in model.requests]
            groups = by_group(requests)
            check_groups(groups, batch, "scripted")
            if calls != 6 * batch + 6:
                raise RuntimeError(f"B={batch}: {calls} requests recorded, expected "
                                   f"{6 * batch + 6}")
            limit = critical_path(scripted_durations(requests, latency, groups))
            runs.append((wall, cpu, limit))
        wall, cpu, limit = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{batch:>5} {calls:>10} {tokens:>11} {wall * 1000:>9.1f} {limit * 1000:>9.1f} "
              f"{wall / limit:>6.3f} {cpu * 1000:>8.1f}")


# --------------------------------------------------------------------------- (b) fake server
def _serve(latency: dict[str, Any], connection: Any) -> None:
    with FakeProviderServer(reply=server_reply, latency=LatencyModel.of(latency)) as server:
        connection.send(server.openai_base_url)
        while connection.recv() == "take":
            connection.send(list(server.requests))
            server.reset()


class _ProcessServer:
    """The fake server in a child process (its own GIL, like a real provider)."""

    def __init__(self, latency: LatencyModel) -> None:
        self.connection, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(latency.as_dict(), child), daemon=True
        )
        self.process.start()
        self.base_url = self.connection.recv()

    def take_requests(self) -> list[dict[str, Any]]:
        self.connection.send("take")
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send("stop")
        self.process.join()


def sdk_floor(
    sdk: openai.AsyncOpenAI, bodies: list[dict[str, Any]], groups: dict[str, list[int]],
    waits_for: dict[str, list[str]] = WAITS_FOR,
) -> tuple[float, float]:
    """(wall, CPU) seconds to send the bodies with the bare SDK through the DAG: each group's
    requests all at once, as soon as the groups it waits for are answered."""

    async def replay() -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        answered = {group: asyncio.Event() for group in groups}

        async def send(group: str) -> None:
            for other in waits_for[group]:
                await answered[other].wait()
            await asyncio.gather(*[sdk.chat.completions.create(**bodies[i])
                                   for i in groups[group]])
            answered[group].set()

        await asyncio.gather(*[send(group) for group in groups])
        return time.perf_counter() - start, time.process_time() - cpu_start

    return run(replay())


async def _make_sdk(base_url: str) -> openai.AsyncOpenAI:
    # The timeout of afnio's client (60 s, connecting included), so that both wait alike when
    # a thousand connections open at once.
    return openai.AsyncOpenAI(base_url=base_url, api_key="benchmark", max_retries=0,
                              timeout=60.0)


def through_server(batches: list[int], latency: LatencyModel, repeat: int,
                   repeat_large: int) -> None:
    server = _ProcessServer(latency)
    try:
        model = AsyncOpenAI(MODEL, base_url=server.base_url, api_key="benchmark")
        # The bare SDK client lives on afnio's runtime loop, like afnio's own client, so both
        # keep their connections open between measurements.
        sdk: openai.AsyncOpenAI = run(_make_sdk(server.base_url))
        print(f"(b) FakeProviderServer({describe(latency)}) in a child process, afnio "
              "AsyncOpenAI vs the bare openai SDK replaying the same requests through the same "
              f"DAG; median of {repeat} ({repeat_large} above B = 256)")
        print(f"{'B':>5} {'LLM calls':>10} {'prompt tok':>11} {'wall ms':>9} {'floor ms':>9} "
              f"{'ratio':>6} {'limit ms':>9} {'CPU ms':>8} {'floor CPU':>10}")

        def step_and_floor(batch: int) -> tuple[float, ...]:
            wall, cpu, calls, tokens = training_step(model, batch)
            bodies = server.take_requests()
            groups = by_group([body["messages"] for body in bodies])
            check_groups(groups, batch, "fake server")
            if calls != len(bodies) or calls != 6 * batch + 6:
                raise RuntimeError(f"B={batch}: afnio counted {calls} requests, the server "
                                   f"saw {len(bodies)}, expected {6 * batch + 6}")
            limit = critical_path(server_durations(bodies, latency, groups))
            floor, floor_cpu = sdk_floor(sdk, bodies, groups)
            if len(server.take_requests()) != len(bodies):
                raise RuntimeError("the floor replay did not send every request once")
            return wall, floor, limit, cpu, floor_cpu, calls, tokens

        step_and_floor(min(max(batches), 64))  # warm-up: opens the connections of both clients
        for batch in batches:
            runs = [step_and_floor(batch) for _ in range(repeats(batch, repeat, repeat_large))]
            wall, floor, limit, cpu, floor_cpu = (statistics.median(r[i] for r in runs)
                                                  for i in range(5))
            calls, tokens = runs[0][5], runs[0][6]
            print(f"{batch:>5} {calls:>10} {tokens:>11} {wall * 1000:>9.1f} "
                  f"{floor * 1000:>9.1f} {wall / floor:>6.3f} {limit * 1000:>9.1f} "
                  f"{cpu * 1000:>8.1f} {floor_cpu * 1000:>10.1f}")
        run(sdk.close())
        run(model.aclose())
    finally:
        server.close()


# --------------------------------------------------------------------------- (c) cold
def _cold_child(base_url: str, batch: int, connection: Any) -> None:
    """A fresh process: three clients on one endpoint, created just before the first step."""
    clients = [AsyncOpenAI(MODEL, base_url=base_url, api_key="benchmark") for _ in range(3)]
    for _ in range(2):
        wall, cpu, calls, _ = training_step(clients[0], batch, clients[1], clients[2])
        connection.send((wall, cpu, calls))
        connection.recv()


def cold(batch: int, latency: LatencyModel, repeat: int) -> None:
    server = _ProcessServer(latency)
    try:
        sdk: openai.AsyncOpenAI = run(_make_sdk(server.base_url))
        print(f"(c) the first step of a fresh process (three AsyncOpenAI clients on one endpoint, "
              f"created just before it) and its second step, B={batch}, "
              f"FakeProviderServer({describe(latency)}); floor: the bare SDK of this (warm) "
              f"process replaying that step's requests; median of {repeat} processes")
        print(f"{'step':>6} {'wall ms':>9} {'floor ms':>9} {'ratio':>6} {'CPU ms':>8}")
        sdk_floor(sdk, *_warm_bodies(server, batch))  # warm the floor's own client
        server.take_requests()
        results: list[list[tuple[float, float, float]]] = [[], []]
        for _ in range(repeat):
            here, there = multiprocessing.Pipe()
            child = multiprocessing.get_context("spawn").Process(
                target=_cold_child, args=(server.base_url, batch, there), daemon=True
            )
            child.start()
            for step in range(2):
                wall, cpu, calls = here.recv()
                bodies = server.take_requests()
                groups = by_group([body["messages"] for body in bodies])
                check_groups(groups, batch, "cold")
                floor, _ = sdk_floor(sdk, bodies, groups)
                server.take_requests()
                results[step].append((wall, floor, cpu))
                here.send("next")
            child.join()
        for step, name in enumerate(("cold", "warm")):
            wall, floor, cpu = (statistics.median(r[i] for r in results[step]) for i in range(3))
            print(f"{name:>6} {wall * 1000:>9.1f} {floor * 1000:>9.1f} {wall / floor:>6.3f} "
                  f"{cpu * 1000:>8.1f}")
        run(sdk.close())
    finally:
        server.close()


def _warm_bodies(server: _ProcessServer, batch: int) -> tuple[list, dict]:
    """The requests of one step (sent by a throwaway client), to warm the floor's client."""
    model = AsyncOpenAI(MODEL, base_url=server.base_url, api_key="benchmark")
    training_step(model, batch)
    run(model.aclose())
    bodies = server.take_requests()
    return bodies, by_group([body["messages"] for body in bodies])


# --------------------------------------------------------------------------- (v) validation
def validation(samples: int, latency: LatencyModel, repeat: int) -> None:
    server = _ProcessServer(latency)
    try:
        model = AsyncOpenAI(MODEL, base_url=server.base_url, api_key="benchmark")
        sdk: openai.AsyncOpenAI = run(_make_sdk(server.base_url))
        print(f"(v) a validation pass (3 stages and the judge, no grad) over {samples} samples "
              f"in one batch, FakeProviderServer({describe(latency)}); floor: the bare SDK "
              f"replaying its 4 levels; median of {repeat}")
        print(f"{'samples':>8} {'LLM calls':>10} {'wall ms':>9} {'floor ms':>9} {'ratio':>6} "
              f"{'CPU ms':>8} {'floor CPU':>10}")
        waits = {"F1": [], "F2": ["F1"], "F3": ["F2"], "J": ["F3"]}
        runs = []
        for attempt in range(repeat + 1):  # the first run warms both clients up
            wall, cpu, calls = validation_pass(model, samples)
            bodies = server.take_requests()
            groups = by_group([body["messages"] for body in bodies])
            if {g: len(i) for g, i in groups.items() if i} != dict.fromkeys(waits, samples):
                raise RuntimeError(f"validation: unexpected calls per group {groups.keys()}")
            floor, floor_cpu = sdk_floor(sdk, bodies, {g: groups[g] for g in waits}, waits)
            server.take_requests()
            if attempt:
                runs.append((wall, floor, cpu, floor_cpu))
        wall, floor, cpu, floor_cpu = (statistics.median(r[i] for r in runs) for i in range(4))
        print(f"{samples:>8} {calls:>10} {wall * 1000:>9.1f} {floor * 1000:>9.1f} "
              f"{wall / floor:>6.3f} {cpu * 1000:>8.1f} {floor_cpu * 1000:>10.1f}")
        run(sdk.close())
        run(model.aclose())
    finally:
        server.close()


# --------------------------------------------------------------------------- main
def describe(latency: LatencyModel) -> str:
    text = (f"{latency.base * 1000:g} ms + {latency.per_prompt_token * 1000:g} ms/prompt token + "
            f"{latency.per_output_token * 1000:g} ms/output token")
    return text + (f" + up to {latency.jitter * 1000:g} ms jitter" if latency.jitter else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--latency", type=float, default=0.05, help="base seconds per request")
    parser.add_argument("--per-prompt-token", type=float, default=0.00004)
    parser.add_argument("--per-output-token", type=float, default=0.001)
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--repeat-large", type=int, default=3, help="repeats above B = 256")
    parser.add_argument("--cold-batch", type=int, default=32)
    parser.add_argument("--validation", type=int, default=1000, help="samples of part (v)")
    parser.add_argument("--only", nargs="+", choices=["a", "b", "c", "v"])
    args = parser.parse_args()
    latency = LatencyModel(args.latency, args.per_prompt_token, args.per_output_token,
                           args.jitter)
    print(f"one training step of a {STAGES}-stage chain: 6B + 6 LLM calls; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    runners: dict[str, Callable[[], None]] = {
        "a": lambda: scripted(args.batches, latency, args.repeat, args.repeat_large),
        "b": lambda: through_server(args.batches, latency, args.repeat, args.repeat_large),
        "c": lambda: cold(args.cold_batch, latency, args.repeat),
        "v": lambda: validation(args.validation, latency, args.repeat),
    }
    for name, runner in runners.items():
        if args.only is None or name in args.only:
            runner()


if __name__ == "__main__":
    main()

"""How many 64-sample training steps survive 30 % injected faults with the default retry policy.

Each trial is one training step of a real afnio program against ``FakeProviderServer`` through
afnio's ``AsyncOpenAI`` client (the official ``openai`` SDK underneath): a ChatCompletion stage
per prompt over the batch, an ``LMJudgeEvaluator`` loss (one call per sample),
``explanation.backward()`` and a ``TGD`` step. With one stage and B = 64 that is 2B + 2 = 130
requests in 4 dependent levels (64 forward, 64 judge, 1 gradient for the shared prompt, 1
optimizer call); ``--stages 3`` makes it 6B + 6 = 390 requests in 8 levels.

The server answers each request with a fault at ``--fault-rate``, drawn uniformly (seeded) from
``afnio.testing.fake_server.DEFAULT_FAULT_MIX``: 429 (with ``Retry-After``), 500, 503, a hang
until the client times out, invalid JSON, truncated JSON, a body that is not UTF-8, an HTML
page, a reply missing its fields, and a dropped connection.

The client runs the **default pipeline options** (retries, backoff, no concurrency cap); only
its HTTP ``timeout`` is lowered to ``--timeout`` seconds, so that a hung request costs seconds
instead of the default minute (the retry policy is the same either way).

``--max-retries N`` overrides the default retry count, to compare policies (e.g. the former
default of 3).

A trial succeeds when the step finishes and the optimizer rewrote the prompt; a failed trial
must raise a ``ModelError`` and leave the prompt unchanged. ``--outage`` also runs one step
against a server failing every request, to show the error it ends with.

Run:
    python benchmarks/fault_tolerance.py [--steps 50] [--batch 64] [--fault-rate 0.3]
        [--stages 1] [--timeout 2] [--seed 0] [--max-retries N] [--outage]
"""

from __future__ import annotations

import argparse
import collections
import logging
import statistics
import sys
import time
from typing import Any

from _chain import chain, order_questions, stage_prompts
from step_latency import reply

import afnio
from afnio.autodiff.evaluator import LMJudgeEvaluator
from afnio.models import ModelError, track_usage
from afnio.models.openai import AsyncOpenAI
from afnio.models.options import PipelineOptions
from afnio.optim import TGD
from afnio.testing import FakeProviderServer

MODEL = "gpt-4.1-nano"


def server_reply(body: dict[str, Any]) -> str:
    return reply(body["messages"])


def training_step(client: AsyncOpenAI, prompts: list[afnio.Variable], batch: int) -> None:
    """One forward -> judge -> backward -> optimizer step over ``prompts``."""
    optimizer = TGD(prompts, model_client=client)
    questions, targets, rubric = order_questions(batch)
    optimizer.zero_grad()
    x = chain(client, prompts, questions)
    _, explanation = LMJudgeEvaluator.apply(
        client, [{"role": "user", "content": [rubric]}], x, target=targets
    )
    explanation.backward()
    optimizer.step()


def one_trial(client: AsyncOpenAI, batch: int, stages: int) -> str | None:
    """Run a step; ``None`` if it finished with every prompt rewritten, else why not."""
    prompts = stage_prompts(stages)
    before = [p.data for p in prompts]
    try:
        training_step(client, prompts, batch)
    except ModelError as error:
        unchanged = [p.data for p in prompts] == before
        return (f"{type(error).__name__} (prompts {'unchanged' if unchanged else 'CHANGED'}): "
                f"{str(error)[:160]}")
    if any(p.data == old for p, old in zip(prompts, before)):
        return "finished without rewriting every prompt"
    return None


def trials(args: argparse.Namespace) -> int:
    defaults = PipelineOptions()
    retries = defaults.max_retries if args.max_retries is None else args.max_retries
    overridden = "" if args.max_retries is None else " (overridden)"
    print(f"{args.steps} steps of B={args.batch}, {args.stages} stage(s), fault rate "
          f"{args.fault_rate:.0%} (mixed), seed {args.seed}; client: default retry policy "
          f"(max_retries={retries}{overridden}, backoff {defaults.retry_base_delay} s doubling "
          f"to {defaults.retry_max_delay} s, jittered, Retry-After honoured), "
          f"timeout={args.timeout} s")
    failures, seconds = [], []
    with FakeProviderServer(reply=server_reply, fault_rate=args.fault_rate,
                            seed=args.seed) as server:
        client = AsyncOpenAI(MODEL, base_url=server.openai_base_url, api_key="sk-bench",
                             timeout=args.timeout, context_window=128_000, max_retries=retries)
        with track_usage() as used:
            for step in range(args.steps):
                start = time.perf_counter()
                failure = one_trial(client, args.batch, args.stages)
                seconds.append(time.perf_counter() - start)
                if failure is not None:
                    failures.append(f"step {step}: {failure}")
                print(f"  step {step:>3}: {'ok' if failure is None else 'FAILED'} in "
                      f"{seconds[-1]:.1f} s", flush=True)
        sent = len(server.requests)
        faults = collections.Counter(
            fault.kind if fault.kind != "status" else f"status {fault.status}"
            for fault in server.faults_applied
        )
    survived = args.steps - len(failures)
    print(f"\nsteps survived: {survived} / {args.steps} ({survived / args.steps:.1%})")
    print(f"requests answered: {used.requests}, sent (with retries): {sent}, faults injected: "
          f"{sum(faults.values())} ({sum(faults.values()) / max(sent, 1):.1%})")
    print("faults by kind: " + ", ".join(f"{kind} {n}" for kind, n in sorted(faults.items())))
    print(f"step wall time: median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s")
    for failure in failures:
        print("  " + failure)
    return 0 if survived >= 0.99 * args.steps else 1


def outage(args: argparse.Namespace) -> None:
    print("\none step (B=4) against a server failing every request, default retry policy:")
    with FakeProviderServer(reply=server_reply, fault_rate=1.0, seed=args.seed,
                            fault_mix=[500, 503, "html"]) as server:
        client = AsyncOpenAI(MODEL, base_url=server.openai_base_url, api_key="sk-bench",
                             timeout=args.timeout, context_window=128_000)
        start = time.perf_counter()
        failure = one_trial(client, 4, args.stages)
        print(f"  after {time.perf_counter() - start:.0f} s and {len(server.requests)} requests: "
              f"{failure}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-retries", type=int, default=None)
    parser.add_argument("--outage", action="store_true")
    args = parser.parse_args()
    # Every retry logs a warning (with the error text); thousands of them would bury the result.
    logging.getLogger("afnio.models.model").setLevel(logging.ERROR)
    status = trials(args)
    if args.outage:
        outage(args)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Wall time of one forward + backward of a 3-stage ChatCompletion chain, against its limit.

Each stage is a ChatCompletion whose input is the previous stage's output and whose shared system
prompt requires grad; an exact-match evaluator scores the last output. Every scripted request
takes ``--latency`` seconds. Forward is 3 sequential rounds of B concurrent requests; backward is
3 sequential rounds (a stage's gradient calls all run at once), so the critical path is
6 x latency. The ratio wall / limit shows how much of the time is overhead.

Run: ``python benchmarks/chain_latency.py [--batch 32] [--latency 0.05] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

from _chain import chain

import afnio
from afnio.autodiff.evaluator import ExactMatchEvaluator
from afnio.testing import ScriptedModel


def stage_reply(messages: list[dict[str, str]], **kwargs: object) -> str:
    stage = re.search(r"Stage (\d)", messages[0]["content"]).group(1)
    return f"s{stage}({messages[-1]['content']})"


def feedback_reply(messages: list[dict[str, str]], **kwargs: object) -> str:
    return "<FEEDBACK>Be more careful.</FEEDBACK>"


def run_once(batch: int, latency: float) -> tuple[float, float, int, int]:
    """One forward+backward; returns (forward s, backward s, forward calls, backward calls)."""
    forward_model = ScriptedModel(stage_reply, latency=latency)
    backward_model = ScriptedModel(feedback_reply, latency=latency)
    stage_prompts = [
        afnio.Variable(f"Stage {k} instructions.", role=f"system prompt of stage {k}",
                       requires_grad=True)
        for k in (1, 2, 3)
    ]
    questions = [f"q{i}" for i in range(batch)]
    targets = [f"s3(s2(s1({q})))" if i % 3 == 1 else "other" for i, q in enumerate(questions)]
    start = time.perf_counter()
    x = chain(forward_model, stage_prompts, afnio.Variable(questions, role="questions"),
              backward_model_client=backward_model)
    _, explanation = ExactMatchEvaluator.apply(x, targets)
    middle = time.perf_counter()
    explanation.backward()
    end = time.perf_counter()
    return middle - start, end - middle, forward_model.calls, backward_model.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    run_once(args.batch, 0.0)  # warm up the runtime loop and imports
    runs = [run_once(args.batch, args.latency) for _ in range(args.repeat)]
    walls = [forward + backward for forward, backward, _, _ in runs]
    limit = 6 * args.latency
    wall = statistics.median(walls)
    forward_calls, backward_calls = runs[0][2], runs[0][3]
    print(f"3-stage chain, B={args.batch}, latency={args.latency * 1000:.0f} ms, "
          f"{args.repeat} runs (median)")
    print(f"  forward  {statistics.median(r[0] for r in runs) * 1000:7.1f} ms   "
          f"(limit {3 * args.latency * 1000:.0f} ms, {forward_calls} LLM calls)")
    print(f"  backward {statistics.median(r[1] for r in runs) * 1000:7.1f} ms   "
          f"(limit {3 * args.latency * 1000:.0f} ms, {backward_calls} LLM calls)")
    print(f"  total    {wall * 1000:7.1f} ms   critical-path limit {limit * 1000:.0f} ms "
          f"(6 x {args.latency * 1000:.0f} ms)   ratio {wall / limit:.2f}")


if __name__ == "__main__":
    main()

"""A second identical epoch with the response cache on sends no request at all.

The pipeline: two ChatCompletion stages (each system prompt a Parameter), an LMJudgeEvaluator as
the loss, ``backward()`` and a ``TGD`` step, over ``--samples`` questions in batches of
``--batch``. Every model request goes through afnio's ``AsyncOpenAI`` (the official ``openai``
SDK) to a ``FakeProviderServer`` with ``--latency`` per request, so "requests sent" is what the
server received.

Three epochs, each starting from the same initial prompts with a fresh client and optimizer:

1. cache ``read_write`` on an empty cache in a temporary directory: every request is sent and
   stored;
2. the same epoch again, ``read_write``: every request is answered from the cache;
3. the same epoch in ``replay`` mode: only the cache may answer (a miss would raise).

Epochs 2 and 3 must send 0 requests and end with the same prompts as epoch 1.

Run: ``python benchmarks/cache_replay.py [--samples 24] [--batch 8] [--latency 0.05]``
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from typing import Any

from _chain import chain, stage_prompts

import afnio
from afnio.autodiff import prompts as autodiff_prompts
from afnio.autodiff.evaluator import LMJudgeEvaluator
from afnio.models import ResponseCache, track_usage
from afnio.models.cache import CachedResponse
from afnio.models.openai import AsyncOpenAI
from afnio.optim import TGD
from afnio.optim import prompts as optim_prompts
from afnio.testing import FakeProviderServer

STAGES = 2
_STAGE = re.compile(r"Stage (\d)")
_RULE = " Always give the delivery date."


def reply(body: dict[str, Any]) -> str:
    """A deterministic, well-formed reply to every kind of request of the pipeline."""
    messages = body["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    if system.startswith(optim_prompts.TGD_SYSTEM_PROMPT[:40]):
        old = re.search(r"<VARIABLE>\n(.*?)\n</VARIABLE>", messages[1]["content"], re.S).group(1)
        return f"<IMPROVED_VARIABLE>{old}{_RULE}</IMPROVED_VARIABLE>"
    if system.startswith(autodiff_prompts.GRADIENT_SYSTEM_PROMPT[:40]):
        return "<FEEDBACK>Ask for the delivery date explicitly.</FEEDBACK>"
    if autodiff_prompts.JUDGE_FORMAT_INSTRUCTION[:40] in messages[-1]["content"]:
        return '{"score": 0, "explanation": "The answer leaves out the delivery date."}'
    stage = _STAGE.match(system).group(1)
    return f"s{stage}({messages[-1]['content']})"


class CountingCache(ResponseCache):
    """A ResponseCache that counts the lookups it answered."""

    def __init__(self, path: str, mode: str) -> None:
        super().__init__(path, mode)
        self.hits = 0

    async def aget(self, key: str) -> CachedResponse | None:
        response = await super().aget(key)
        self.hits += response is not None
        return response


def epoch(client: AsyncOpenAI, questions: list[str], batch: int) -> list[str]:
    """One epoch from the initial prompts; returns the final prompts."""
    prompts = stage_prompts(STAGES)
    optimizer = TGD(prompts, model_client=client)
    rubric = afnio.Variable("Answer: {prediction}\nDoes it give a delivery date?",
                            role="judge rubric")
    for start in range(0, len(questions), batch):
        optimizer.zero_grad()
        x = afnio.Variable(questions[start:start + batch], role="customer questions")
        x = chain(client, prompts, x)
        _, explanation = LMJudgeEvaluator.apply(client, [{"role": "user", "content": [rubric]}], x)
        explanation.backward()
        optimizer.step()
    return [p.data for p in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    questions = [f"Where is order {i}?" for i in range(args.samples)]
    steps = -(-args.samples // args.batch)
    print(f"{STAGES}-stage pipeline + LM judge + TGD, {args.samples} samples in {steps} steps of "
          f"{args.batch}, FakeProviderServer latency {args.latency * 1000:.0f} ms")
    print(f"{'epoch':<22}{'seconds':>9}{'requests sent':>15}{'cache hits':>12}{'cache rows':>12}")
    with tempfile.TemporaryDirectory() as directory, FakeProviderServer(
        reply=reply, latency=args.latency
    ) as server:
        path = os.path.join(directory, "afnio_cache.sqlite")
        finals, sent_per_epoch = [], []
        for name, mode in (("1 read_write (cold)", "read_write"),
                           ("2 read_write (warm)", "read_write"),
                           ("3 replay", "replay")):
            cache = CountingCache(path, mode=mode)
            client = AsyncOpenAI("gpt-4.1-nano", base_url=server.openai_base_url,
                                 api_key="benchmark", cache=cache)
            server.reset()
            with track_usage() as used:
                started = time.perf_counter()
                finals.append(epoch(client, questions, args.batch))
                seconds = time.perf_counter() - started
            sent = len(server.requests)
            if sent != used.requests:
                raise RuntimeError(f"afnio counted {used.requests} requests, the server {sent}")
            sent_per_epoch.append(sent)
            print(f"{name:<22}{seconds:>9.3f}{sent:>15}{cache.hits:>12}{len(cache):>12}")
        if finals[1] != finals[0] or finals[2] != finals[0]:
            raise RuntimeError("the cached epochs ended with different prompts than the first")
        if sent_per_epoch[1:] != [0, 0]:
            raise RuntimeError(f"the cached epochs sent requests: {sent_per_epoch}")
    print(f"final prompt of stage 1 (the same after all three epochs): {finals[0][0]!r}")


if __name__ == "__main__":
    main()

"""Seconds per request on the embedded model when several prompts are scored at once.

Two ~850-token system prompts (three demonstrations each, as the main job's demonstration
search builds them), each with the same six validation messages. Sent all at once, the local
model serves them grouped by prompt (prefix affinity), so llama.cpp re-reads only the message
after the shared prefix; sent one at a time alternating between the two prompts, every request
re-reads its whole prompt. Run on an idle machine: llama.cpp slows down a lot when other
processes compete for the cores.

Run: python benchmarks/local_prefix.py
"""

from __future__ import annotations

import asyncio
import time

from afnio.models.local import LocalModel
from afnio.utils.datasets import FacilitySupport

MESSAGES = 6


def main() -> None:
    train, val = FacilitySupport("train"), FacilitySupport("val")
    systems = [
        "Read the message and say how the writer feels.\n\n" + "\n\n".join(
            f"Message: {train[i][0].data}\nSentiment: {train[i][1][1].data}"
            for i in range(start, start + 3)
        )
        for start in (0, 3)
    ]
    requests = [
        [{"role": "system", "content": system}, {"role": "user", "content": val[i][0].data}]
        for i in range(MESSAGES)
        for system in systems
    ]  # alternating between the two prompts
    model = LocalModel()
    print(f"system prompt tokens: {[model.count_tokens(s) for s in systems]}")
    model.chat([{"role": "user", "content": "hi"}], max_tokens=1)  # load the weights

    started = time.perf_counter()
    for messages in requests:
        model.chat(messages, max_tokens=8, temperature=0.0)
    alternating = (time.perf_counter() - started) / len(requests)

    async def together() -> None:
        await asyncio.gather(
            *[model.achat(m, max_tokens=8, temperature=0.0) for m in requests]
        )

    started = time.perf_counter()
    asyncio.run(together())
    grouped = (time.perf_counter() - started) / len(requests)
    print(f"{len(requests)} requests, one at a time alternating: {alternating:.2f} s/request")
    print(f"{len(requests)} requests, all at once (grouped):     {grouped:.2f} s/request")
    model.close()


if __name__ == "__main__":
    main()

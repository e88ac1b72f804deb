"""Textual gradients through plain Python steps: ``GradComponent`` and ``fun_to_grad_component``.

A small ticket-triage program with no LLM in its forward pass:

1. ``UrgencyTagger`` (a ``GradComponent`` subclass) tags a support message ``high`` when it
   contains one of a list of keywords, else ``routine``. The keyword list is a ``Parameter``
   passed in as an argument, so it is one of the component's predecessors.
2. ``ticket_title`` (a function turned into a component by ``fun_to_grad_component``) builds
   the ticket title ``"[URGENCY] subject"``. Its instructions are a ``doc_string``
   ``Parameter``: not passed to the function, but a trainable predecessor all the same.

The example shows:

* train vs eval mode: in training mode a component returns a traced ``Variable`` (with a
  ``grad_fn``); after ``.eval()`` it is just its ``call`` and returns the plain value;
* backward through both components: a ``DeterministicEvaluator`` explains each wrong title,
  and each component's backward engine (a ``ScriptedModel`` here) says how each of its inputs
  should change — the keyword list and the ``doc_string`` both receive gradients;
* one ``TGD`` step (a scripted optimizer model) rewriting both, after which the program tags
  every message correctly.

Everything is scripted, so it runs offline in about a second.

Run:
    python examples/grad_component.py
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

import afnio
from afnio import cognitive
from afnio.cognitive import (
    BackwardEngine,
    FunGradComponent,
    GradComponent,
    Parameter,
    ParameterType,
    fun_to_grad_component,
)
from afnio.optim import TGD
from afnio.testing import ScriptedModel

INITIAL_KEYWORDS = "urgent, emergency, immediately"
INITIAL_DOC_STRING = "Build the ticket title as '[URGENCY] subject'."
KEYWORDS_ROLE = "comma-separated keywords that mark a support message as urgent"
DOC_STRING_ROLE = "instructions of the ticket-title step"

# (subject, message, the urgency a human gave it)
TICKETS = [
    (
        "Water leak in the server room",
        "Water is leaking from the ceiling onto our servers and the floor is starting to flood.",
        "high",
    ),
    (
        "Quarterly cleaning schedule",
        "Could we move the quarterly deep clean to the first week of June?",
        "routine",
    ),
    (
        "No heating in building B",
        "Emergency: the heating failed overnight and building B is at 8 degrees.",
        "high",
    ),
]


# --------------------------------------------------------------------------- the components
class UrgencyTagger(GradComponent):
    """Tags a message ``high`` if it contains one of the keywords, else ``routine``."""

    def __init__(self) -> None:
        super().__init__(
            desc="Tags a support message 'high' when it contains one of the comma-separated "
            "keywords (case-insensitive), otherwise 'routine'."
        )

    def call(self, message: str, keywords: str) -> str:
        words = [word.strip().lower() for word in keywords.split(",") if word.strip()]
        return "high" if any(word in message.lower() for word in words) else "routine"


def make_ticket_title() -> FunGradComponent:
    """A fresh ``ticket_title`` component (built in a function so each run starts anew)."""

    @fun_to_grad_component(
        desc="Builds the title of a support ticket from its subject and urgency.",
        doc_string=Parameter(
            data=INITIAL_DOC_STRING,
            param_type=ParameterType.PROMPT,
            requires_opt=True,
            role_desc=DOC_STRING_ROLE,
        ),
    )
    def ticket_title(subject: str, urgency: str) -> str:
        return f"[{urgency.upper()}] {subject}"

    return ticket_title


class TicketTriage(cognitive.Module):
    """Tag each message's urgency, then title its ticket."""

    def __init__(self) -> None:
        super().__init__()
        self.keywords = Parameter(
            INITIAL_KEYWORDS, role=KEYWORDS_ROLE, param_type=ParameterType.HYPERPARAM
        )
        self.tagger = UrgencyTagger()
        self.title = make_ticket_title()

    def forward(self, subjects: Any, messages: Any) -> Any:
        urgency = self.tagger(messages, self.keywords)
        return self.title(subjects, urgency)


# --------------------------------------------------------------------------- scripted models
BACKWARD_FEEDBACK = {
    # The keyword list, as seen by the tagger's backward.
    KEYWORDS_ROLE: (
        "Add 'leak' and 'flood' to the keywords: the message about water leaking onto the "
        "servers was tagged routine although it stops work."
    ),
    # The doc_string, as seen by ticket_title's backward.
    DOC_STRING_ROLE: (
        "Name the two allowed tags, [HIGH] and [ROUTINE], and say that HIGH is for anything "
        "that stops work, such as a leak, a flood or an outage."
    ),
    # The tagger's output, as seen by ticket_title's backward.
    "UrgencyTagger response": "This message reports a leak that floods the room: it is high.",
}


def scripted_backward_reply(messages: list[dict[str, str]], **_: Any) -> str:
    """Feedback for the input the component gradient prompt puts under review."""
    user = messages[-1]["content"]
    role = re.search(r"Input under review: \[[^\]]+\] \((.+?)(?:, a \w+ parameter)?\)\n", user)
    return f"<FEEDBACK>{BACKWARD_FEEDBACK[role.group(1)]}</FEEDBACK>"


IMPROVED = {
    KEYWORDS_ROLE: "urgent, emergency, immediately, leak, flood, outage",
    DOC_STRING_ROLE: (
        "Build the ticket title as '[URGENCY] subject', where URGENCY is HIGH for anything "
        "that stops work (a leak, a flood, an outage) and ROUTINE otherwise."
    ),
}


def scripted_optimizer_reply(messages: list[dict[str, str]], **_: Any) -> str:
    """TGD's rewrite of whichever parameter the request names."""
    user = messages[-1]["content"]
    role = next(role for role in IMPROVED if f"The variable is the {role}" in user)
    return f"<IMPROVED_VARIABLE>{IMPROVED[role]}</IMPROVED_VARIABLE>"


# --------------------------------------------------------------------------- the run
def title_has_urgency(title: str, urgency: str) -> int:
    """1 when the title starts with the expected tag, else 0."""
    return int(title.startswith(f"[{urgency.upper()}]"))


@dataclass
class RunResult:
    """What :func:`run` observed."""

    train_output: Any
    eval_output: Any
    titles_before: list[str]
    titles_after: list[str]
    score_before: int
    score_after: int
    gradients: dict[str, list[str]]
    initial: dict[str, str]
    final: dict[str, str]
    backward_model: ScriptedModel
    optimizer_model: ScriptedModel


def run(verbose: bool = False) -> RunResult:
    """Show train/eval mode, backpropagate one batch of tickets, and take one TGD step."""
    say = print if verbose else (lambda *args, **kwargs: None)
    triage = TicketTriage()

    say("--- train vs eval mode ---")
    train_output = triage.title("Broken door", "routine")
    say(f"train: ticket_title('Broken door', 'routine') -> {train_output!r}, grad_fn "
        f"{train_output.grad_fn.name()}")
    triage.eval()
    eval_output = triage.title("Broken door", "routine")
    say(f"eval:  ticket_title('Broken door', 'routine') -> {eval_output!r} "
        f"({type(eval_output).__name__})")
    say(f"eval:  tagger('Leak!', keywords) -> {triage.tagger('Leak!', triage.keywords)!r}")
    triage.train()

    backward_model = ScriptedModel(scripted_backward_reply)
    engine = BackwardEngine(backward_model)
    triage.tagger.set_backward_engine(engine)
    triage.title.set_backward_engine(engine)
    optimizer_model = ScriptedModel(scripted_optimizer_reply)
    optimizer = TGD(triage.parameters(), model_client=optimizer_model)
    evaluator = cognitive.DeterministicEvaluator(
        eval_fn=title_has_urgency,
        eval_fn_purpose="1 if the ticket title starts with the expected urgency tag",
        success_fn=lambda score: score == 1,
    )

    subjects = afnio.Variable([s for s, _, _ in TICKETS], role="ticket subjects")
    messages = afnio.Variable([m for _, m, _ in TICKETS], role="support messages")
    expected = afnio.Variable([u for _, _, u in TICKETS], role="expected urgency")
    initial = {name: p.data for name, p in triage.named_parameters()}

    say("\n--- forward, evaluate, backward ---")
    titles = triage(subjects, messages)
    score, explanation = evaluator(titles, expected)
    titles_before, score_before = list(titles.data), score.data
    say(f"titles: {titles_before} | score {score_before}/{len(TICKETS)}")
    explanation.backward()
    gradients = {name: [str(g.data) for g in p.grad] for name, p in triage.named_parameters()}
    for name, texts in gradients.items():
        say(f"gradient of {name}: {texts}")

    optimizer.step()
    final = {name: p.data for name, p in triage.named_parameters()}
    with afnio.no_grad():
        titles_after = list(triage(subjects, messages).data)
    score_after = sum(title_has_urgency(t, u) for t, (_, _, u) in zip(titles_after, TICKETS))
    say(f"\n--- after one TGD step ---\ntitles: {titles_after} | score "
        f"{score_after}/{len(TICKETS)}")
    return RunResult(
        train_output, eval_output, titles_before, titles_after, score_before, score_after,
        gradients, initial, final, backward_model, optimizer_model,
    )


def main() -> int:
    result = run(verbose=True)
    for name, before in result.initial.items():
        after = result.final[name]
        print(f"\n--- {name} ---\nbefore: {before}\nafter:  {after}")
        print(f"changed: {'yes' if after != before else 'no'}")
    print(f"\nLLM requests: backward engine {result.backward_model.calls}, "
          f"optimizer {result.optimizer_model.calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

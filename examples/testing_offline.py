"""Unit-test your own afnio pipeline offline with ``afnio.testing``: no network, no API key.

Two tools, two levels:

* ``ScriptedModel`` is an in-process model client whose replies you write (a list, or a
  function of the messages). It records every request, so a test can assert exact call counts,
  the prompts that were sent and how many requests were in flight at once.
* ``FakeProviderServer`` is a real HTTP server on 127.0.0.1 speaking OpenAI's and Anthropic's
  wire formats. Point the real SDK client at it (``afnio.models.AsyncOpenAI(...,
  base_url=server.openai_base_url)``) to test the whole path — request bodies, usage,
  retries — and inject faults such as a ``429 Too Many Requests``.

The pipeline under test, ``ReplyDrafter``, drafts a reply to each support ticket; a reply must
quote its ticket number. The tests check one forward pass, one backward pass and one optimizer
step with scripted models, then a full training step through the fake server with a 429 on the
first request.

The same file is a pytest module and a script:

Run:
    python -m pytest examples/testing_offline.py -q    # as tests
    python examples/testing_offline.py                 # as a script, printing what it checks

With afnio installed, pytest also gets a ``fake_server`` fixture (a started
``FakeProviderServer``); ``test_training_step_through_the_openai_sdk`` uses it.
"""

from __future__ import annotations

import re
import sys

import afnio
from afnio import cognitive
from afnio.cognitive import Parameter, ParameterType
from afnio.models import AsyncOpenAI, ChatCompletionModel
from afnio.optim import TGD
from afnio.testing import FakeProviderServer, ScriptedModel, Turnstile

INITIAL_PROMPT = "Draft a short, polite reply to the customer."
IMPROVED_PROMPT = "Draft a short, polite reply to the customer and quote their ticket number."
FEEDBACK = "Tell the model to quote the customer's ticket number in every reply."

TICKETS = ["T-101", "T-102", "T-103"]
MESSAGES = [
    "The lift on floor 3 is stuck again.",
    "Please add a recycling bin to the kitchen.",
    "The meeting room projector does not turn on.",
]


# --------------------------------------------------------------------------- the pipeline
class ReplyDrafter(cognitive.Module):
    """The program under test: one LLM call per ticket, plus a deterministic check."""

    def __init__(self, model: ChatCompletionModel, backward_model: ChatCompletionModel) -> None:
        super().__init__()
        self.system_prompt = Parameter(
            INITIAL_PROMPT,
            role="system prompt for drafting replies to support tickets",
            param_type=ParameterType.PROMPT,
        )
        self.user_template = afnio.Variable(
            "Ticket {ticket}:\n{message}", role="user message holding the ticket"
        )
        self.draft = cognitive.ChatCompletion(
            model, backward_model_client=backward_model, temperature=0
        )
        self.check = cognitive.DeterministicEvaluator(
            eval_fn=lambda reply, ticket: int(ticket in reply),
            eval_fn_purpose="1 if the reply quotes the ticket number, else 0",
            success_fn=lambda score: score == 1,
        )

    def forward(self, tickets: afnio.Variable, messages: afnio.Variable) -> afnio.Variable:
        return self.draft(
            [
                {"role": "system", "content": [self.system_prompt]},
                {"role": "user", "content": [self.user_template]},
            ],
            inputs={"ticket": tickets, "message": messages},
        )

    def training_step(self, tickets: afnio.Variable, messages: afnio.Variable):
        return self.check(self(tickets, messages), tickets)


def answer(messages: list[dict[str, str]]) -> str:
    """A fake LLM for every role, told apart by the tag the request asks the answer in."""
    system, user = messages[0]["content"], messages[-1]["content"]
    if "<IMPROVED_VARIABLE>" in user:  # an optimizer (TGD) request
        return f"<IMPROVED_VARIABLE>{IMPROVED_PROMPT}</IMPROVED_VARIABLE>"
    if "<FEEDBACK>" in system:  # a backward (gradient) request
        return f"<FEEDBACK>{FEEDBACK}</FEEDBACK>"
    ticket = re.match(r"Ticket (\S+):", user).group(1)
    if "ticket number" in system:
        return f"Thanks for reporting this, we are on it (ticket {ticket})."
    return "Thanks for reporting this, we are on it."


def scripted() -> ScriptedModel:
    return ScriptedModel(lambda messages, **_: answer(messages))


def batch() -> tuple[afnio.Variable, afnio.Variable]:
    return (
        afnio.Variable(TICKETS, role="ticket numbers"),
        afnio.Variable(MESSAGES, role="support messages"),
    )


# --------------------------------------------------------------------------- scripted tests
def test_forward_sends_one_request_per_ticket() -> None:
    """Forward: one request per ticket, all in flight together, with the expected prompts."""
    # The turnstile holds the requests until all 3 are waiting: the overlap is certain.
    gate = Turnstile(expected=3)
    model = ScriptedModel(gate.wrap(lambda messages, **_: answer(messages)))
    drafter = ReplyDrafter(model, backward_model=scripted())
    replies = drafter(*batch())

    assert replies.data == ["Thanks for reporting this, we are on it."] * 3
    assert model.calls == 3
    assert model.max_in_flight == 3  # the batch is sent at once, not one by one
    for (messages, completion_args), ticket, text in zip(model.requests, TICKETS, MESSAGES):
        assert messages == [
            {"role": "system", "content": INITIAL_PROMPT},
            {"role": "user", "content": f"Ticket {ticket}:\n{text}"},
        ]
        assert completion_args == {"temperature": 0}


def test_backward_asks_once_for_the_shared_prompt() -> None:
    """Backward: the prompt shared by the batch costs one gradient request, not one per ticket;
    tickets that pass cost nothing."""
    backward_model = scripted()
    drafter = ReplyDrafter(scripted(), backward_model)
    score, explanation = drafter.training_step(*batch())
    assert score.data == 0
    explanation.backward()

    assert backward_model.calls == 1
    request = backward_model.requests[0][0][-1]["content"]
    assert all(ticket in request and text in request for ticket, text in zip(TICKETS, MESSAGES))
    assert [g.data for g in drafter.system_prompt.grad] == [FEEDBACK]

    drafter.system_prompt.data = IMPROVED_PROMPT  # a prompt that passes: nothing to send
    drafter.zero_grad()
    score, explanation = drafter.training_step(*batch())
    explanation.backward()
    assert score.data == 3
    assert backward_model.calls == 1
    assert drafter.system_prompt.grad == []


def train_one_step(model: ChatCompletionModel) -> tuple[str, str, int, int]:
    """One step of forward → backward → TGD with ``model`` in every role.

    Returns:
        (prompt before, prompt after, score before, score after).
    """
    drafter = ReplyDrafter(model, backward_model=model)
    optimizer = TGD(drafter.parameters(), model_client=model)
    before = drafter.system_prompt.data
    score, explanation = drafter.training_step(*batch())
    explanation.backward()
    optimizer.step()
    with afnio.no_grad():
        new_score, _ = drafter.training_step(*batch())
    return before, drafter.system_prompt.data, score.data, new_score.data


def test_optimizer_step_applies_the_feedback() -> None:
    """Optimizer: TGD sends the feedback to the optimizer model and writes its proposal."""
    model = scripted()
    before, after, score, new_score = train_one_step(model)

    assert (before, after) == (INITIAL_PROMPT, IMPROVED_PROMPT)
    assert (score, new_score) == (0, 3)
    # 3 drafts + 1 gradient + 1 rewrite + 3 drafts with the new prompt
    assert model.calls == 8
    tgd_request = model.requests[4][0][-1]["content"]
    assert FEEDBACK in tgd_request and INITIAL_PROMPT in tgd_request


# --------------------------------------------------------------------------- over the wire
def test_training_step_through_the_openai_sdk(fake_server: FakeProviderServer) -> None:
    """The same step through the real OpenAI SDK and a local fake server; the first request
    gets a 429, which the client retries."""
    fake_server.reply = lambda body: answer(body["messages"])
    fake_server.inject({"status": 429, "retry_after": 0})
    model = AsyncOpenAI(
        model="gpt-4.1-nano", base_url=fake_server.openai_base_url, api_key="test-key",
        retry_base_delay=0.001,
    )
    before, after, score, new_score = train_one_step(model)

    assert (before, after, score, new_score) == (INITIAL_PROMPT, IMPROVED_PROMPT, 0, 3)
    assert [fault.status for fault in fake_server.faults_applied] == [429]
    assert len(fake_server.requests) == 9  # 8 requests, one of them sent twice
    assert model.get_usage()["requests"] == 8  # usage counts answered requests
    first = fake_server.requests[0]
    assert first["model"] == "gpt-4.1-nano" and first["temperature"] == 0
    assert first["messages"][0] == {"role": "system", "content": INITIAL_PROMPT}


# --------------------------------------------------------------------------- as a script
def main() -> int:
    tests = [
        test_forward_sends_one_request_per_ticket,
        test_backward_asks_once_for_the_shared_prompt,
        test_optimizer_step_applies_the_feedback,
    ]
    for test in tests:
        test()
        print(f"passed: {test.__name__}")
    with FakeProviderServer() as server:
        test_training_step_through_the_openai_sdk(server)
        print(f"passed: test_training_step_through_the_openai_sdk "
              f"({len(server.requests)} HTTP requests, faults applied: "
              f"{[fault.status for fault in server.faults_applied]})")

    before, after, score, new_score = train_one_step(scripted())
    print(f"\nprompt before: {before}\nprompt after:  {after}")
    print(f"changed: {'yes' if after != before else 'no'} | tickets quoted: {score}/3 -> "
          f"{new_score}/3")
    return 0


if __name__ == "__main__":
    sys.exit(main())

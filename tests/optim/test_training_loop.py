"""A full training loop on a simulated task: feedback must really flow into the prompt.

The task: route support tickets to one of six teams. The scripted forward model answers a ticket
correctly only when the system prompt holds the routing rule for the ticket's keyword
("refund -> billing"); otherwise it answers "other". The scripted backward model reads the
failing samples of a batch and suggests the rule for the first one. The scripted optimizer model
adds every rule the feedback names to the prompt. Starting from a prompt with one rule, three
epochs of forward -> ExactMatchEvaluator -> backward -> TGD.step must reach >= 90 % accuracy.
"""

import random
import re

import afnio
from afnio.autodiff.evaluator import ExactMatchEvaluator
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.cognitive.parameter import Parameter
from afnio.optim import TGD
from afnio.testing import ScriptedModel

ROUTES = {
    "refund": "billing",
    "password": "account",
    "crash": "technical",
    "delivery": "shipping",
    "contract": "legal",
    "invoice": "finance",
}
TICKETS = [
    (f"Ticket {n}: question about my {keyword} (case {n})", team)
    for n, (keyword, team) in enumerate(list(ROUTES.items()) * 2)
]
RULE = re.compile(r"\b(\w+) -> (\w+)\b")


def keyword_of(text):
    return next(keyword for keyword in ROUTES if keyword in text)


def forward_reply(messages, **kwargs):
    system, user = messages[0]["content"], messages[-1]["content"]
    rules = dict(RULE.findall(system))
    return rules.get(keyword_of(user), "other")


def backward_reply(messages, **kwargs):
    prompt = messages[-1]["content"]
    for sample in re.findall(r"<SAMPLE.*?</SAMPLE>", prompt, re.S):
        target = re.search(r'Compared with the [^"]*"([^"]+)"', sample)
        if target:
            rule = f"{keyword_of(sample)} -> {target.group(1)}"
            return f"<FEEDBACK>Add the routing rule {rule}.</FEEDBACK>"
    return "<FEEDBACK></FEEDBACK>"


def optimizer_reply(messages, **kwargs):
    user = messages[-1]["content"]
    value = re.search(r"<VARIABLE>\n(.*?)\n</VARIABLE>", user, re.S).group(1)
    feedback = re.search(r"<FEEDBACK>\n(.*?)\n</FEEDBACK>", user, re.S).group(1)
    for keyword, team in RULE.findall(feedback):
        if f"{keyword} -> {team}" not in value:
            value += f"\n{keyword} -> {team}"
    return f"<IMPROVED_VARIABLE>\n{value}\n</IMPROVED_VARIABLE>"


def predict(system_prompt, forward_model, backward_model, tickets):
    messages = [
        {"role": "system", "content": [system_prompt]},
        {"role": "user", "content": [afnio.Variable("{ticket}", role="user message template")]},
    ]
    return ChatCompletion.apply(
        forward_model,
        messages,
        inputs={"ticket": [text for text, _ in tickets]},
        backward_model_client=backward_model,
    )


def accuracy(system_prompt, forward_model):
    with afnio.no_grad():
        answers = predict(system_prompt, forward_model, None, TICKETS)
        score, _ = ExactMatchEvaluator.apply(answers, [team for _, team in TICKETS])
    return score.data / len(TICKETS)


def test_three_epochs_of_tgd_lift_accuracy_above_90_percent():
    forward_model = ScriptedModel(forward_reply, model="forward", latency=0.01)
    backward_model = ScriptedModel(backward_reply, model="backward")
    optimizer_model = ScriptedModel(optimizer_reply, model="optimizer")
    system_prompt = Parameter(
        "Route the ticket to one team. Answer with the team name only.\nrefund -> billing",
        role="system prompt for ticket routing",
        param_type="prompt",
    )
    optimizer = TGD([system_prompt], model_client=optimizer_model, momentum=2)
    rng = random.Random(0)
    batch_size = 6

    history = [accuracy(system_prompt, forward_model)]
    step_calls = []
    for _ in range(3):
        order = list(TICKETS)
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for model in (forward_model, backward_model, optimizer_model):
                model.reset()
            optimizer.zero_grad()
            answers = predict(system_prompt, forward_model, backward_model, batch)
            _, explanation = ExactMatchEvaluator.apply(answers, [team for _, team in batch])
            explanation.backward()
            optimizer.step()
            failing = sum(answer != team for answer, (_, team) in zip(answers.data, batch))
            calls = (forward_model.calls, backward_model.calls, optimizer_model.calls)
            # One forward request per sample; the shared system prompt gets one backward call
            # and one optimizer call, and a batch without errors costs neither.
            assert calls == (batch_size, int(failing > 0), int(failing > 0))
            assert forward_model.max_in_flight == batch_size
            step_calls.append(calls)
        history.append(accuracy(system_prompt, forward_model))

    # Shown with `pytest -s` (and on failure).
    print(f"\naccuracy per epoch (epoch 0 = baseline): {[round(a, 3) for a in history]}")
    print(f"(forward, backward, optimizer) calls per step: {step_calls}")

    assert history[0] == 2 / 12
    assert history == sorted(history), "accuracy never drops"
    assert history[-1] >= 0.9
    for keyword, team in ROUTES.items():
        assert f"{keyword} -> {team}" in system_prompt.data
    assert len(optimizer.state[system_prompt]["momentum_buffer"]) <= 2

"""The simulated ticket-routing task of test_training_loop.py, with a *noisy* optimizer model.

Six keywords route to six teams. The forward model answers a ticket correctly only when the
system prompt holds the rule for its keyword ("refund -> billing"), else "other". The backward
model names the rule of the first failing sample of a batch. The noisy optimizer model, half
of the time, acts on the feedback (adds the rule it names); the other half it is harmful: it
drops every rule and adds the named keyword with a wrong team. Which half a request falls in is
a pure function of (seed, current value, feedback, proposal number, how many times that same
request was made before), so runs are reproducible and depend neither on the optimizer prompt's
wording nor on the order of concurrent requests, and a request made again after a rollback can
turn out differently, as with a sampling model.
"""

from __future__ import annotations

import hashlib
import random
import re

import afnio
from afnio.autodiff.evaluator import ExactMatchEvaluator
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.cognitive.parameter import Parameter

ROUTES = {
    "refund": "billing",
    "password": "account",
    "crash": "technical",
    "delivery": "shipping",
    "contract": "legal",
    "invoice": "finance",
}
TEAMS = sorted(set(ROUTES.values()))
TICKETS = [
    (f"Ticket {n}: question about my {keyword} (case {n})", team)
    for n, (keyword, team) in enumerate(list(ROUTES.items()) * 2)
]
INSTRUCTION = "Route the ticket to one team. Answer with the team name only."
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


def harmful(seed, value, feedback, attempt, repeat):
    digest = hashlib.sha256(f"{seed}|{value}|{feedback}|{attempt}|{repeat}".encode()).digest()
    return digest[0] % 2 == 1


def noisy_optimizer(seed):
    """The optimizer model: helpful or harmful, half and half (see the module docstring)."""
    seen = {}

    def reply(messages, **kwargs):
        user = messages[-1]["content"]
        value = re.search(r"<VARIABLE>\n(.*?)\n</VARIABLE>", user, re.S).group(1)
        if "This is paraphrase" in user:  # the same rules, listed in reverse order
            head, *rules = value.split("\n")
            return "<IMPROVED_VARIABLE>" + "\n".join([head, *reversed(rules)]) + (
                "</IMPROVED_VARIABLE>"
            )
        feedback = re.search(r"<FEEDBACK>\n(.*?)\n</FEEDBACK>", user, re.S).group(1)
        attempt = re.search(r"proposal (\d+) of", user)
        named = RULE.findall(feedback)
        key = (value, feedback, attempt.group(1) if attempt else "0")
        seen[key] = seen.get(key, 0) + 1
        if harmful(seed, *key, seen[key]):
            keyword, team = named[0]
            wrong = TEAMS[(TEAMS.index(team) + 1) % len(TEAMS)]
            return f"<IMPROVED_VARIABLE>{INSTRUCTION}\n{keyword} -> {wrong}</IMPROVED_VARIABLE>"
        for keyword, team in named:
            if f"{keyword} -> {team}" not in value:
                value += f"\n{keyword} -> {team}"
        return f"<IMPROVED_VARIABLE>{value}</IMPROVED_VARIABLE>"

    return reply


def new_prompt():
    return Parameter(
        f"{INSTRUCTION}\nrefund -> billing",
        role="system prompt for ticket routing",
        param_type="prompt",
    )


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


def accuracy_of(value, forward_model, tickets=TICKETS):
    """Accuracy of a prompt value (a fresh Variable: the parameter is not touched)."""
    with afnio.no_grad():
        prompt = afnio.Variable(value, role="system prompt for ticket routing")
        answers = predict(prompt, forward_model, None, tickets)
        score, _ = ExactMatchEvaluator.apply(answers, [team for _, team in tickets])
    return score.data / len(tickets)


def batches(seed, epochs, batch_size):
    """The batches of ``epochs`` shuffled passes over TICKETS (seeded)."""
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(TICKETS)
        rng.shuffle(order)
        yield [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def backward_on(prompt, forward_model, backward_model, batch):
    """Forward, exact-match evaluation and backward on one batch (gradients into ``prompt``)."""
    answers = predict(prompt, forward_model, backward_model, batch)
    _, explanation = ExactMatchEvaluator.apply(answers, [team for _, team in batch])
    explanation.backward()

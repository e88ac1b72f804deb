"""A training step through the real SDK survives every kind of fault, and a total outage ends in
a clear error with nothing changed."""

from __future__ import annotations

import re

import pytest

import afnio
from afnio import cognitive
from afnio.cognitive import Parameter
from afnio.models import ModelError, TransientError
from afnio.models.anthropic import AsyncAnthropic
from afnio.models.openai import AsyncOpenAI
from afnio.optim import TGD
from afnio.testing import FakeProviderServer
from afnio.testing.fake_server import DEFAULT_FAULT_MIX

FAST = {"retry_base_delay": 0.001, "retry_max_delay": 0.005}
QUESTIONS = [f"Where is order {i}?" for i in range(6)]


def answer(body):
    """Forward, gradient and optimizer replies, told apart by the tags the request asks for."""
    messages = body["messages"]
    system = body.get("system") or (messages[0]["content"] if messages[0]["role"] == "system"
                                    else "")
    user = messages[-1]["content"]
    if "<IMPROVED_VARIABLE>" in user:
        return "<IMPROVED_VARIABLE>Answer and give the delivery date.</IMPROVED_VARIABLE>"
    if "<FEEDBACK>" in system or "<FEEDBACK>" in user:
        return "<FEEDBACK>Always give the delivery date.</FEEDBACK>"
    number = re.search(r"order (\d+)", user).group(1)
    return f"About order {number}: soon."


class Support(cognitive.Module):
    def __init__(self, client):
        super().__init__()
        self.prompt = Parameter("Answer the customer.", role="system prompt for support")
        self.reply = cognitive.ChatCompletion(client, backward_model_client=client)
        self.check = cognitive.DeterministicEvaluator(
            eval_fn=lambda reply, _: int("Monday" in reply),
            eval_fn_purpose="1 if the reply gives the delivery day",
            success_fn=lambda score: score == 1,
        )

    def forward(self, questions):
        return self.reply([{"role": "system", "content": [self.prompt]},
                           {"role": "user", "content": ["{q}"]}], inputs={"q": questions})


def step(client):
    agent = Support(client)
    optimizer = TGD(agent.parameters(), model_client=client, momentum=1)
    questions = afnio.Variable(QUESTIONS, role="customer questions")
    _, explanation = agent.check(agent(questions), afnio.Variable(QUESTIONS, role="ids"))
    explanation.backward()
    optimizer.step()
    return agent.prompt.data, dict(optimizer.state)


def client_for(kind, server, **options):
    if kind == "openai":
        return AsyncOpenAI("gpt-4.1-nano", base_url=server.openai_base_url, api_key="sk-t-0000",
                           **options)
    return AsyncAnthropic("claude-haiku-4-5", base_url=server.anthropic_base_url,
                          api_key="sk-t-0000", **options)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_step_survives_every_fault_kind(kind):
    # Issue 14, defect 4: one malformed reply aborted the whole batch.
    with FakeProviderServer(reply=answer) as server:
        faults = [f if f.kind != "timeout" else {"kind": "timeout", "hang": 30}
                  for f in DEFAULT_FAULT_MIX]
        server.inject(*faults)
        client = client_for(kind, server, timeout=1.0, **FAST)
        prompt, state = step(client)
        assert server.pending_faults == 0 and len(server.faults_applied) == len(faults)
    assert prompt == "Answer and give the delivery date."
    assert client.get_usage()["requests"] == len(QUESTIONS) + 2  # forward, gradient, optimizer


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_total_outage_is_a_clear_error_and_changes_nothing(kind):
    with FakeProviderServer(reply=answer, fault_rate=1.0,
                            fault_mix=[500, 503, "html", "non_utf8"]) as server:
        client = client_for(kind, server, max_retries=3, **FAST)
        agent = Support(client)
        optimizer = TGD(agent.parameters(), model_client=client, momentum=1)
        with pytest.raises(ModelError) as raised:
            agent(afnio.Variable(QUESTIONS, role="customer questions"))
        assert isinstance(raised.value, TransientError)
        assert server.url in str(raised.value) and "HTTP" in str(raised.value)
        # The request that gave up made 1 + 3 attempts; its siblings were then cancelled.
        assert 4 <= len(server.requests) <= 4 * len(QUESTIONS)
    assert agent.prompt.data == "Answer the customer." and optimizer.state == {}


def test_an_outage_at_the_optimizer_step_leaves_the_prompt_as_it_was():
    def optimizer_down(body):
        if "<IMPROVED_VARIABLE>" in body["messages"][-1]["content"]:
            raise RuntimeError("optimizer backend down")  # the server answers 500
        return answer(body)

    with FakeProviderServer(reply=optimizer_down) as server:
        client = client_for("openai", server, max_retries=2, **FAST)
        agent = Support(client)
        optimizer = TGD(agent.parameters(), model_client=client, momentum=1)
        _, explanation = agent.check(agent(afnio.Variable(QUESTIONS, role="questions")),
                                     afnio.Variable(QUESTIONS, role="ids"))
        explanation.backward()
        with pytest.raises(TransientError, match="HTTP 500"):
            optimizer.step()
    assert agent.prompt.data == "Answer the customer."
    assert [g.data for g in agent.prompt.grad] == ["Always give the delivery date."]

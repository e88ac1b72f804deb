"""The 3-stage chain and an LM judge through the real OpenAI and Anthropic SDK clients, against
afnio's local FakeProviderServer (no network, no API key)."""

from __future__ import annotations

import json
import re

import pytest

import afnio
from afnio.autodiff import prompts
from afnio.autodiff.evaluator import ExactMatchEvaluator, LMJudgeEvaluator
from afnio.autodiff.feedback import fill_prompt
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.models.anthropic import AsyncAnthropic
from afnio.models.openai import AsyncOpenAI
from afnio.testing import FakeProviderServer, Turnstile

GRADIENT_SYSTEM = fill_prompt(prompts.GRADIENT_SYSTEM_PROMPT)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content)


def system_and_last_user(body: dict) -> tuple[str, str]:
    """The system text and the last user message of an OpenAI or Anthropic request body."""
    system = _text(body.get("system", ""))
    users = []
    for message in body["messages"]:
        if message["role"] == "system":
            system = _text(message["content"])
        elif message["role"] == "user":
            users.append(_text(message["content"]))
    return system, users[-1]


def reply(body: dict) -> str:
    system, last_user = system_and_last_user(body)
    if system == GRADIENT_SYSTEM:
        return "<FEEDBACK>be more careful</FEEDBACK>"
    stage = re.search(r"Stage (\d)", system)
    if stage:
        return f"s{stage.group(1)}({last_user})"
    prediction = re.search(r"Answer: (.*)", last_user).group(1)
    return json.dumps({"score": int("q1" in prediction), "explanation": f"{prediction} is off"})


def call_kind(body: dict) -> str:
    """``"shared"`` for a batch's shared gradient call, else ``"per sample"``."""
    shared = prompts.SHARED_GRADIENT_PROMPT.split("{", 1)[0]
    return "shared" if system_and_last_user(body)[1].startswith(shared) else "per sample"


def shared_call_first(kinds: list[str]) -> list[int]:
    """A Turnstile order: the shared call, then the others from the last to arrive."""
    return sorted(range(len(kinds)), key=lambda i: (kinds[i] != "shared", -i))


def make_client(provider: str, server: FakeProviderServer):
    if provider == "openai":
        return AsyncOpenAI("gpt-4.1-nano", base_url=server.openai_base_url, api_key="test")
    return AsyncAnthropic("claude-haiku-4-5", base_url=server.anthropic_base_url, api_key="test")


@pytest.fixture
def server():
    with FakeProviderServer(reply=reply) as fake:
        yield fake


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_three_stage_chain_through_sdk(provider, server):
    batch = 7
    forward_client, backward_client = make_client(provider, server), make_client(provider, server)
    stage_prompts = [
        afnio.Variable(
            f"Stage {k} instructions.", role=f"system prompt of stage {k}", requires_grad=True
        )
        for k in (1, 2, 3)
    ]
    questions = [f"q{i}" for i in range(batch)]
    x = afnio.Variable(questions, role="questions")
    # Each stage's requests are held on the server until the whole batch is waiting, so the
    # in-flight count below is certain (and the replies are released in reverse order).
    server.reply = Turnstile("reverse", expected=[batch] * 3, timeout=30).wrap(reply)
    for prompt in stage_prompts:
        x = ChatCompletion.apply(
            forward_client,
            [{"role": "system", "content": [prompt]}, {"role": "user", "content": ["{x}"]}],
            inputs={"x": x},
            backward_model_client=backward_client,
            temperature=0,
        )
    assert x.data == [f"s3(s2(s1({q})))" for q in questions]
    assert len(server.requests) == 3 * batch and server.max_in_flight == batch
    assert all(body["temperature"] == 0 for body in server.requests)
    targets = [out if i % 3 == 1 else "other" for i, out in enumerate(x.data)]
    score, explanation = ExactMatchEvaluator.apply(x, targets)
    failures = batch - len(range(1, batch, 3))
    assert score.data == batch - failures
    server.reset()
    # Stage 3's shared call and per-failure calls all wait together, then stage 2's, then 1's.
    # Each wave lets its shared call (the prompt's gradient) through first, then the per-sample
    # calls last to first: backward streams, so stage 2 starts once stage 3's per-sample
    # gradients are in, and a shared call still held then would overlap stage 2's wave.
    waves = [1 + failures, 1 + failures, 1]
    turnstile = Turnstile(shared_call_first, expected=waves, timeout=30)
    server.reply = turnstile.wrap(reply, key=call_kind)
    explanation.backward()
    assert len(server.requests) == 3 + 2 * failures
    assert server.max_in_flight == 1 + failures
    assert all("temperature" not in body for body in server.requests)
    for prompt in stage_prompts:
        assert [g.data for g in prompt.grad] == ["be more careful"]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_lm_judge_through_sdk(provider, server):
    judge = make_client(provider, server)
    prediction = afnio.Variable(
        ["q0 answer", "q1 answer", "q2 answer"], role="answers", requires_grad=True
    )
    rubric = afnio.Variable("Answer: {prediction}", role="judge template")
    extra = {"response_format": {"type": "json_object"}} if provider == "openai" else {}
    score, explanation = LMJudgeEvaluator.apply(
        judge,
        [{"role": "user", "content": [rubric]}],
        prediction,
        success_fn=lambda s: s == 1,
        **extra,
    )
    assert score.data == 1
    assert explanation.data == ["q0 answer is off", "q1 answer is off", "q2 answer is off"]
    if provider == "openai":
        assert all(body["response_format"] == {"type": "json_object"} for body in server.requests)
    explanation.backward()
    assert prediction.grad[0].data == ["q0 answer is off", "", "q2 answer is off"]
    assert len(server.requests) == 3

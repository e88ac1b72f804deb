"""Every gradient request fits its backward model's window; what cannot fit fails before sending.

The property drives random batch sizes, sample lengths and backward windows (256-4096 tokens).
Its oracle is independent of the chunking code: the same graph is differentiated once per sample
with an unlimited window, which measures the smallest request each sample can be sent in. If
each of those fits the small window, the small-window backward must succeed, with every request
inside the window and every sample's feedback in some request; otherwise it must fail with
ContextWindowError, and still no request that reached the model passed its window.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio.autodiff import ContextWindowError
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.testing import ScriptedModel

FEEDBACK_TOKEN = re.compile(r"fb-\d+-end")
RESERVE = 32


def critic(window: int) -> ScriptedModel:
    """A backward model that names, in its feedback, the sample tokens its prompt contained."""

    def reply(messages, **kwargs):
        seen = sorted(set(FEEDBACK_TOKEN.findall(messages[-1]["content"])))
        return f"<FEEDBACK>covers {' '.join(seen) or 'merged parts'}</FEEDBACK>"

    return ScriptedModel(reply, context_window=window, max_tokens=RESERVE)


def run_backward(texts: list[str], feedback: list[str], window: int):
    backward_model = critic(window)
    prompt = afnio.Variable("Classify the ticket.", role="system prompt", requires_grad=True)
    template = afnio.Variable("Ticket: {ticket}", role="user message template")
    out = ChatCompletion.apply(
        ScriptedModel(lambda messages, **kw: "routine"),
        [{"role": "system", "content": [prompt]}, {"role": "user", "content": [template]}],
        inputs={"ticket": afnio.Variable(texts, role="tickets")},
        backward_model_client=backward_model,
    )
    try:
        out.backward(afnio.Variable(feedback))
        error = None
    except ContextWindowError as exc:
        error = exc
    return backward_model, prompt, error


def smallest_request_tokens(text: str, feedback: str) -> int:
    """Prompt tokens of the request about this one sample alone (measured, unlimited window)."""
    model, _, error = run_backward([text], [feedback], 10**6)
    assert error is None
    (messages, _), = model.requests
    return model.count_message_tokens(messages)


@st.composite
def batches(draw):
    size = draw(st.integers(1, 16))
    words = st.integers(1, 120)
    texts = [" ".join(f"w{i}x{k}" for k in range(draw(words))) for i in range(size)]
    feedback = [
        f"fb-{i}-end " + " ".join(f"detail{i}y{k}" for k in range(draw(st.integers(0, 60))))
        for i in range(size)
    ]
    window = draw(st.integers(256, 4096))
    return texts, feedback, window


@given(batches())
def test_gradient_requests_fit_the_window_or_fail_before_passing_it(batch):
    texts, feedback, window = batch
    model, prompt, error = run_backward(texts, feedback, window)
    for messages, _ in model.requests:
        assert model.count_message_tokens(messages) + RESERVE <= window
    feasible = all(
        smallest_request_tokens(text, fb) + RESERVE <= window for text, fb in zip(texts, feedback)
    )
    if not feasible:
        assert error is not None and error.available == window - RESERVE
        return
    assert error is None, f"backward failed although every sample fits alone: {error}"
    sent = " ".join(messages[-1]["content"] for messages, _ in model.requests)
    assert set(FEEDBACK_TOKEN.findall(sent)) == {f"fb-{i}-end" for i in range(len(texts))}
    assert len(prompt.grad) == 1 and prompt.grad[0].data


def test_a_forward_prompt_too_long_for_its_model_fails_before_anything_is_sent():
    model = ScriptedModel(["x"], context_window=300, max_tokens=20)
    prompt = afnio.Variable("Classify.", role="system prompt for triage", requires_grad=True)
    texts = afnio.Variable(["short", "word " * 400], role="tickets")
    with pytest.raises(ContextWindowError) as info:
        ChatCompletion.apply(
            model, [{"role": "system", "content": [prompt]},
                    {"role": "user", "content": ["{t}"]}], inputs={"t": texts})
    message = str(info.value)
    assert "ChatCompletion" in message and "batch element 1" in message
    assert "input {t} (tickets)" in message and info.value.available == 280
    assert model.calls == 0

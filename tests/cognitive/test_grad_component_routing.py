"""Routing properties of GradComponent / FunGradComponent backward.

Every batch element's feedback is its own token (``fb3``); the backward engine answers with the
feedback tokens it was shown, released by a :class:`~afnio.testing.Turnstile` in adversarial
order. A batched input must get, at element i, exactly element i's tokens; a scalar input (the
trainable ``doc_string``) one gradient over every sample with feedback; with the engine disabled,
the feedback passes through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio.cognitive import FunGradComponent, GradComponent, Parameter
from afnio.models import registry
from afnio.testing import ScriptedModel, Turnstile, completion_orders

FB_TOKEN = re.compile(r"\bfb\d+\b")


@pytest.fixture(autouse=True)
def no_global_backward_client() -> Iterator[None]:
    registry.set_backward_model_client(None)
    yield


def _unique(tokens):
    return list(dict.fromkeys(tokens))


def engine_reply(messages, **kwargs):
    prompt = "\n".join(m["content"] for m in messages)
    return f"<FEEDBACK>grad[{','.join(_unique(FB_TOKEN.findall(prompt)))}]</FEEDBACK>"


class Pair(GradComponent):
    """Joins two texts; async, so batch elements run concurrently."""

    async def acall(self, left: str, right: str) -> str:
        return f"{left}+{right}"


def draw_feedback(data, n):
    keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="feedback")
    return [f"fb{i}" if k else "" for i, k in enumerate(keep)]


@given(st.integers(1, 12), completion_orders(), st.booleans(), st.data())
def test_fun_grad_component_routes_per_element_and_shared_gradients(n, order, trainable_doc,
                                                                     data):
    gate = Turnstile(order)
    model = ScriptedModel(gate.wrap(engine_reply))
    doc = Parameter("Echo the question.", role="instructions", requires_grad=trainable_doc)
    echo = FunGradComponent(fun=lambda q, c: f"{q}|{c}", desc="Echoes", doc_string=doc)
    echo.set_backward_engine(model_client=model)
    questions = afnio.Variable([f"q{i}" for i in range(n)], role="questions", requires_grad=True)
    contexts = afnio.Variable([f"c{i}" for i in range(n)], role="contexts")
    out = echo(questions, contexts)
    assert out.data == [f"q{i}|c{i}" for i in range(n)]
    feedback = draw_feedback(data, n)
    out.backward(afnio.Variable(feedback))
    live = [i for i, text in enumerate(feedback) if text]
    if not live:
        assert questions.grad == [] and doc.grad == [] and model.calls == 0
        return
    assert [g.data for g in questions.grad] == [
        [f"grad[{text}]" if text else "" for text in feedback]
    ]
    if trainable_doc:
        assert [g.data for g in doc.grad] == [f"grad[{','.join(feedback[i] for i in live)}]"]
    assert model.calls == len(live) + trainable_doc
    assert contexts.grad == []


@given(st.integers(1, 12), completion_orders(), st.data())
def test_custom_component_routes_each_input_and_each_element(n, order, data):
    gate = Turnstile(order)
    model = ScriptedModel(gate.wrap(engine_reply))
    pair = Pair("Joins two texts", model_client=model)
    left = afnio.Variable([f"l{i}" for i in range(n)], role="left texts", requires_grad=True)
    right = afnio.Variable("r", role="shared right text", requires_grad=True)
    out = pair(left, right)
    assert out.data == [f"l{i}+r" for i in range(n)]
    feedback = draw_feedback(data, n)
    out.backward(afnio.Variable(feedback))
    live = [i for i, text in enumerate(feedback) if text]
    if not live:
        assert left.grad == [] and right.grad == [] and model.calls == 0
        return
    assert [g.data for g in left.grad] == [[f"grad[{text}]" if text else "" for text in feedback]]
    assert [g.data for g in right.grad] == [f"grad[{','.join(feedback[i] for i in live)}]"]
    assert model.calls == len(live) + 1


@given(st.integers(1, 12), st.data())
def test_pass_through_backward_routes_feedback_unchanged(n, data):
    doc = Parameter("Echo.", role="instructions", requires_grad=True)
    echo = FunGradComponent(fun=lambda q: q, desc="Echoes", doc_string=doc)
    echo.disable_backward_engine()
    questions = afnio.Variable([f"q{i}" for i in range(n)], role="questions", requires_grad=True)
    out = echo(questions)
    feedback = draw_feedback(data, n)
    out.backward(afnio.Variable(feedback))
    live = [i for i, text in enumerate(feedback) if text]
    if not live:
        assert questions.grad == [] and doc.grad == []
        return
    assert [g.data for g in questions.grad] == [feedback]
    (shared,) = doc.grad
    assert FB_TOKEN.findall(shared.data) == [feedback[i] for i in live]

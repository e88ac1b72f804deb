"""Routing properties of the evaluators: sample i's score, explanation and feedback stay sample i's.

Every prediction, target and feedback carries its own token; the LM judge and the backward model
answer with the tokens they were shown; a :class:`~afnio.testing.Turnstile` releases the judge's
and the backward model's calls in adversarial order.
"""

from __future__ import annotations

import json
import re

from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio.autodiff import prompts
from afnio.autodiff.evaluator import (
    DeterministicEvaluator,
    ExactMatchEvaluator,
    LMJudgeEvaluator,
)
from afnio.testing import ScriptedModel, Turnstile, completion_orders

TOKEN = re.compile(r"\b[vt]\d+(?:e\d+)?\b")
FB_TOKEN = re.compile(r"\bfb\d+\b")
_before, _after = prompts.MARKED_VARIABLE.split("{text}")
MARKED = re.compile(re.escape(_before) + r"(.*?)" + re.escape(_after), re.DOTALL)
GOOD = "zzgood"


def _unique(tokens):
    return list(dict.fromkeys(tokens))


def judge_reply(messages, **kwargs):
    """Score 1 when the request shows the GOOD word; the explanation lists the tokens seen."""
    text = "\n".join(m["content"] for m in messages)
    score = int(GOOD in text)
    seen = " ".join(_unique(TOKEN.findall(text)))
    return json.dumps({"score": score, "explanation": f"saw {seen}"})


def backward_reply(messages, **kwargs):
    prompt = "\n".join(m["content"] for m in messages)
    targets = [TOKEN.search(text) for text in MARKED.findall(prompt)]
    target = next((match.group(0) for match in targets if match), "?")
    tokens = ",".join(_unique(FB_TOKEN.findall(prompt)))
    return f"<FEEDBACK>grad[var={target};fb={tokens}]</FEEDBACK>"


samples = st.lists(st.booleans(), min_size=1, max_size=16)  # per sample: does it match/pass?


def feedback_for(n, keep):
    return [f"fb{i}" if k else "" for i, k in enumerate(keep)]


@given(samples, st.data())
def test_deterministic_evaluators_route_scores_and_feedback_per_sample(matches, data):
    n = len(matches)
    predictions = [f"v1e{i}" for i in range(n)]
    targets = [p if ok else f"t2e{i}" for i, (p, ok) in enumerate(zip(predictions, matches))]
    keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    feedback = feedback_for(n, keep)
    for evaluator in ("exact", "deterministic"):
        prediction = afnio.Variable(predictions, role="answers", requires_grad=True)
        if evaluator == "exact":
            score, explanation = ExactMatchEvaluator.apply(prediction, targets)
        else:
            score, explanation = DeterministicEvaluator.apply(
                prediction, targets, lambda p, t: p == t, "equality", lambda s: s == 1)
        assert score.data == sum(matches)
        for i, text in enumerate(explanation.data):
            assert set(TOKEN.findall(text)) == {predictions[i], targets[i]}
        explanation.backward(afnio.Variable(feedback))
        routed = ["" if ok else fb for ok, fb in zip(matches, feedback)]
        # All-empty feedback is no gradient at all.
        assert [g.data for g in prediction.grad] == ([routed] if any(routed) else [])


@st.composite
def judge_cases(draw):
    n = draw(st.integers(1, 12))
    good = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    as_list = draw(st.booleans())
    with_context = draw(st.booleans())
    return n, good, keep, as_list, with_context


@given(judge_cases(), completion_orders(), completion_orders(), st.booleans())
def test_lm_judge_routes_scores_explanations_and_gradients(case, judge_order, back_order,
                                                           eval_mode):
    n, good, keep, as_list, with_context = case
    texts = [f"v1e{i} {GOOD if ok else 'meh'}" for i, ok in enumerate(good)]
    if as_list:
        prediction = [afnio.Variable(t, role=f"answer {i}", requires_grad=True)
                      for i, t in enumerate(texts)]
    else:
        prediction = afnio.Variable(texts, role="answers", requires_grad=True)
    rubric = afnio.Variable("v0 rates {prediction}" + (" given {context}" if with_context else ""),
                            role="judge rubric", requires_grad=True)
    context = afnio.Variable([f"v3e{i}" for i in range(n)], role="contexts", requires_grad=True)
    judge = ScriptedModel(Turnstile(judge_order).wrap(judge_reply))
    backward = ScriptedModel(Turnstile(back_order).wrap(backward_reply))
    score, explanation = LMJudgeEvaluator.apply(
        judge, [{"role": "user", "content": [rubric]}], prediction,
        inputs={"context": context} if with_context else None,
        success_fn=lambda s: s == 1, eval_mode=eval_mode, backward_model_client=backward,
    )
    assert score.data == sum(good)
    assert judge.calls == n
    shown = [["v0", f"v1e{i}"] + ([f"v3e{i}"] if with_context else []) for i in range(n)]
    explanations = [f"saw {' '.join(tokens)}" for tokens in shown]
    assert explanation.data == explanations

    feedback = feedback_for(n, keep)
    explanation.backward(afnio.Variable(feedback))
    routed = ["" if ok else fb for ok, fb in zip(good, feedback)]
    if as_list:
        assert [[g.data for g in p.grad] for p in prediction] == [
            [text] if text else [] for text in routed
        ]
    else:
        assert [g.data for g in prediction.grad] == ([routed] if any(routed) else [])
    live = [i for i, text in enumerate(routed) if text]
    if eval_mode or not live:
        assert rubric.grad == [] and context.grad == []
        assert backward.calls == 0
        return
    assert [g.data for g in rubric.grad] == [f"grad[var=v0;fb={','.join(routed[i] for i in live)}]"]
    if with_context:
        assert [g.data for g in context.grad] == [
            [f"grad[var=v3e{i};fb={routed[i]}]" if routed[i] else "" for i in range(n)]
        ]
    assert backward.calls == 1 + (len(live) if with_context else 0)

"""The functional API and its module wrappers."""

from __future__ import annotations

import pytest

import afnio
import afnio.cognitive.functional as F
from afnio.cognitive import (
    Add,
    ChatCompletion,
    DeterministicEvaluator,
    ExactMatchEvaluator,
    LMJudgeEvaluator,
    Module,
    Parameter,
    Split,
    Sum,
)
from afnio.testing import ScriptedModel


def test_basic_functions_build_the_graph() -> None:
    x = afnio.Variable("a,b", role="csv", requires_grad=True)
    first, second = F.split(x, ",")
    assert (first.data, second.data) == ("a", "b") and first.grad_fn.name() == "SplitBackward"
    joined = F.add(first, second)
    assert joined.data == "ab" and joined.grad_fn.name() == "AddBackward"
    total = F.sum([afnio.Variable(1, requires_grad=True), afnio.Variable(2)])
    assert total.data == 3 and total.grad_fn.name() == "SumBackward"
    joined.backward(afnio.Variable("swap them"))
    assert [g.data for g in x.grad] == ["[part 0] swap them\n\n[part 1] swap them"]


def test_basic_op_modules() -> None:
    x = afnio.Variable("a b c", role="words", requires_grad=True)
    assert [p.data for p in Split()(x)] == ["a", "b", "c"]
    assert [p.data for p in Split(" ", 1)(x)] == ["a", "b c"]
    assert repr(Split(",")) == "Split(sep=',', maxsplit=-1)"
    assert Add()(x, "!").data == "a b c!"
    assert Sum()([afnio.Variable(1), afnio.Variable(2)]).data == 3


def test_chat_completion_module_registers_client_and_merges_arguments() -> None:
    client = ScriptedModel(["Paris"])
    chat = ChatCompletion(client, temperature=0, max_tokens=5)
    assert chat.forward_model_client is client
    assert list(chat.state_dict()) == ["forward_model_client", "completion_args"]
    prompt = Parameter("Capital of {country}?", role="question template")
    out = chat([{"role": "user", "content": [prompt]}], inputs={"country": "France"}, max_tokens=9)
    assert out.data == "Paris" and out.grad_fn.name() == "ChatCompletionBackward"
    assert client.requests[0][1] == {"temperature": 0, "max_tokens": 9}
    assert client.requests[0][0][-1]["content"] == "Capital of France?"
    assert "scripted/scripted" in repr(chat)
    with pytest.raises(TypeError, match="forward_model_client"):
        ChatCompletion("openai/gpt-4o")


def test_chat_completion_module_uses_its_backward_client() -> None:
    backward = ScriptedModel(["<FEEDBACK>Ask for the capital only.</FEEDBACK>"])
    chat = ChatCompletion(
        ScriptedModel(["Paris"]),
        backward_model_client=backward,
        backward_completion_args={"temperature": 0},
    )
    prompt = Parameter("Capital of France?", role="question")
    chat([{"role": "user", "content": [prompt]}]).backward(afnio.Variable("Too wordy."))
    assert backward.calls == 1 and backward.requests[0][1] == {"temperature": 0}
    assert [g.data for g in prompt.grad] == ["Ask for the capital only."]
    assert "backward_completion_args" in chat.state_dict()


def test_evaluator_functions_and_modules_agree() -> None:
    prediction = afnio.Variable(["cat", "dog"], role="labels", requires_grad=True)
    target = afnio.Variable(["cat", "cow"], role="gold labels")
    score, explanation = F.exact_match_evaluator(prediction, target)
    module_score, module_explanation = ExactMatchEvaluator()(prediction, target)
    assert score.data == module_score.data == 1
    assert explanation.data == module_explanation.data and "dog" in explanation.data[1]

    evaluator = DeterministicEvaluator(
        lambda p, t: len(p) == len(t),
        "same length",
        success_fn=bool,
        reduction_fn=max,
        reduction_fn_purpose="best sample",
    )
    assert evaluator(prediction, target)[0].data == 1
    assert "eval_fn" in evaluator._functions and "eval_fn" not in evaluator.state_dict()
    score, _ = F.deterministic_evaluator(
        prediction, target, lambda p, t: int(p == t), "exact match"
    )
    assert score.data == 1


def test_lm_judge_module() -> None:
    judge_client = ScriptedModel(['{"score": 1, "explanation": "Correct."}'])
    messages = [
        {"role": "system", "content": [Parameter("Judge the answer.", role="judge prompt")]},
        {"role": "user", "content": [afnio.Variable("{prediction}", role="judge input")]},
    ]
    judge = LMJudgeEvaluator(judge_client, messages, temperature=0)
    assert "messages" in judge._chats
    assert list(judge.state_dict()) == ["messages", "forward_model_client", "completion_args"]
    prediction = afnio.Variable("Paris", role="answer", requires_grad=True)
    score, explanation = judge(prediction)
    assert score.data == 1 and judge_client.calls == 1
    assert judge_client.requests[0][1] == {"temperature": 0}
    functional_score, _ = F.lm_judge_evaluator(judge_client, messages, prediction)
    assert functional_score.data == 1
    assert isinstance(judge, Module)

"""Evaluators: scores, explanations, reductions, success_fn skipping and eval_mode routing."""

from __future__ import annotations

import json
import re
import statistics

import pytest

import afnio
from afnio.autodiff import prompts
from afnio.autodiff.evaluator import (
    DeterministicEvaluator,
    ExactMatchEvaluator,
    LMJudgeEvaluator,
    parse_judgement,
)
from afnio.autodiff.feedback import Unreadable, fill_prompt, fill_template
from afnio.autodiff.lm_ops import ChatCompletion, ReplyParseError
from afnio.models import registry
from afnio.testing import ScriptedModel, Turnstile

GRADIENT_SYSTEM = fill_prompt(prompts.GRADIENT_SYSTEM_PROMPT)
MARKED = re.compile(r"<VARIABLE>(.*?)</VARIABLE>", re.DOTALL)


def echo_marked(messages, **kwargs):
    return f"<FEEDBACK>change {MARKED.search(messages[-1]['content']).group(1)}</FEEDBACK>"


@pytest.fixture
def no_global_backward():
    registry.set_backward_model_client(None)


# --------------------------------------------------------------------------- deterministic
def test_exact_match_scores_explanations_and_gradients():
    prediction = afnio.Variable(["a", "b", "c"], role="labels", requires_grad=True)
    target = afnio.Variable(["a", "x", "c"], role="gold labels")
    score, explanation = ExactMatchEvaluator.apply(prediction, target)
    assert score.data == 2 and score.batch_size is None
    assert score.grad_fn is not None and explanation.grad_fn is not None
    assert explanation.grad_fn.name() == "ExactMatchEvaluatorBackward"
    assert explanation.batch_size == 3
    assert explanation.data[1] == (
        'Compared with the gold labels "x", the labels "b" gets a score of 0 from exact match. '
        "This does not count as a success."
    )
    assert "score of 1" in explanation.data[0]
    assert "This counts as a success." in explanation.data[0]
    explanation.backward()
    (grad,) = prediction.grad
    assert grad.data == ["", explanation.data[1], ""]
    assert grad.role == "feedback to labels"


def test_exact_match_scalar_and_reduction():
    prediction = afnio.Variable("Paris", role="capital", requires_grad=True)
    score, explanation = ExactMatchEvaluator.apply(prediction, "Paris")
    assert score.data == 1 and explanation.batch_size is None
    explanation.backward()
    assert prediction.grad == []  # success: nothing to say
    batch = afnio.Variable(["1", "2", "3", "4"], role="digits")
    mean_score, _ = ExactMatchEvaluator.apply(batch, ["1", "2", "0", "0"], statistics.mean, "mean")
    assert mean_score.data == 0.5 and "mean of the exact match scores" in mean_score.role


def test_deterministic_evaluator_custom_fn_success_and_reduction():
    prediction = afnio.Variable(["short", "much too long", "ok"], role="titles", requires_grad=True)
    score, explanation = DeterministicEvaluator.apply(
        prediction,
        5,
        lambda text, limit: max(0, limit - len(text)),
        "characters under limit",
        lambda s: s > 0,
        min,
        "minimum",
    )
    assert score.data == 0 and score.role.startswith("minimum of the characters under limit")
    assert [("does not count" in e) for e in explanation.data] == [True, True, False]
    explanation.backward()
    assert prediction.grad[0].data[:2] == explanation.data[:2] and prediction.grad[0].data[2] == ""


def test_deterministic_evaluator_without_success_fn_gives_feedback_everywhere():
    prediction = afnio.Variable(["a", "b"], role="letters", requires_grad=True)
    _, explanation = DeterministicEvaluator.apply(
        prediction, ["a", "c"], lambda p, t: p == t, "equality", None, sum, "summation"
    )
    assert "success" not in explanation.data[0]
    explanation.backward()
    assert all(prediction.grad[0].data)


def test_scalar_prediction_broadcast_against_batch_target_merges_feedback():
    prediction = afnio.Variable("x", role="guess", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(prediction, ["x", "y", "z"])
    explanation.backward()
    text = prediction.grad[0].data
    assert prediction.grad[0].batch_size is None
    assert "[sample 1]" in text and "[sample 2]" in text and "[sample 0]" not in text


def test_explicit_gradient_on_explanation_is_routed_and_score_gradient_is_ignored():
    prediction = afnio.Variable(["a", "b"], role="letters", requires_grad=True)
    score, explanation = ExactMatchEvaluator.apply(prediction, ["z", "z"])
    explanation.backward(afnio.Variable(["say z", ""]), retain_graph=True)
    assert prediction.grad[0].data == ["say z", ""]
    score.backward()
    assert len(prediction.grad) == 1


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: ExactMatchEvaluator.apply("a", "a"), TypeError, "'prediction' must be a Variable"),
        (
            lambda: ExactMatchEvaluator.apply(
                afnio.Variable(["a", "b"], role="p"), afnio.Variable(["a"], role="t")
            ),
            ValueError,
            "'p' has 2 elements but 't' has 1",
        ),
        (lambda: ExactMatchEvaluator.apply(afnio.Variable("a"), {"x": 1}), TypeError, "'target'"),
        (
            lambda: DeterministicEvaluator.apply(
                afnio.Variable("a"), "a", lambda p, t: "yes", "vibes"
            ),
            TypeError,
            "eval_fn (vibes) result",
        ),
        (
            lambda: ExactMatchEvaluator.apply(afnio.Variable("a"), "a", lambda s: "all", "text"),
            TypeError,
            "reduction_fn (text) result",
        ),
        (
            lambda: DeterministicEvaluator.apply(afnio.Variable("a"), "a", "not callable", "x"),
            TypeError,
            "'eval_fn' must be callable",
        ),
    ],
)
def test_deterministic_errors(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value) and "Evaluator" in str(info.value)


# --------------------------------------------------------------------------- LM judge
def judge_replies(messages, **kwargs):
    """Score 1 when the prediction equals the target, else 0, from the rendered prompt."""
    text = messages[-1]["content"]
    prediction = re.search(r"Prediction: (.*)\n", text).group(1)
    target = re.search(r"Target: (.*)\n", text).group(1)
    ok = prediction == target
    return json.dumps({"score": int(ok), "explanation": "fine" if ok else f"{prediction} is wrong"})


def rubric_message(requires_grad=False):
    rubric = afnio.Variable("Judge strictly.", role="judge rubric", requires_grad=requires_grad)
    body = afnio.Variable("Prediction: {prediction}\nTarget: {target}\n", role="judge template")
    return rubric, [{"role": "system", "content": [rubric]}, {"role": "user", "content": [body]}]


def test_judge_scores_explanations_and_format_instruction():
    judge = ScriptedModel(Turnstile("reverse", expected=3, timeout=30).wrap(judge_replies))
    prediction = afnio.Variable(["a", "b", "c"], role="answers", requires_grad=True)
    _, messages = rubric_message()
    score, explanation = LMJudgeEvaluator.apply(
        judge, messages, prediction, ["a", "x", "y"], temperature=0
    )
    assert score.data == 1 and explanation.data == ["fine", "b is wrong", "c is wrong"]
    assert judge.calls == 3 and judge.max_in_flight == 3
    request, kwargs = judge.requests[0]
    assert kwargs == {"temperature": 0}
    assert request[-1]["content"].endswith(
        fill_template(
            prompts.JUDGE_FORMAT_INSTRUCTION,
            {"max_sentences": str(afnio.get_settings().max_feedback_sentences)},
        )
    )
    assert '{"score": <number>' in request[-1]["content"]
    assert explanation.role.startswith("explanation by a language-model judge of answers")


def test_judge_success_fn_skips_and_eval_mode_routes_to_prediction_only(no_global_backward):
    judge = ScriptedModel(judge_replies)
    upstream = ScriptedModel(lambda m, **kw: m[-1]["content"])
    backward_model = ScriptedModel(echo_marked)
    instructions = afnio.Variable("Answer.", role="answer prompt", requires_grad=True)
    answers = ChatCompletion.apply(
        upstream,
        [{"role": "system", "content": [instructions]}, {"role": "user", "content": ["{q}"]}],
        inputs={"q": ["a", "b", "c"]},
        backward_model_client=backward_model,
    )
    rubric, messages = rubric_message(requires_grad=True)
    _, explanation = LMJudgeEvaluator.apply(
        judge,
        messages,
        answers,
        ["a", "x", "c"],
        success_fn=lambda s: s == 1,
    )
    explanation.backward()
    assert rubric.grad == []  # eval_mode=True: the judge's own prompt gets nothing
    assert [g.data for g in instructions.grad] == ["change Answer."]
    # Only the failed sample reached the upstream op's backward prompt.
    (prompt,) = [m[-1]["content"] for m, _ in backward_model.requests]
    assert "b is wrong" in prompt and "fine" not in prompt and "Below are the 1 samples" in prompt
    assert judge.calls == 3


def test_judge_eval_mode_false_also_trains_the_judge():
    judge = ScriptedModel(judge_replies)
    backward_model = ScriptedModel(echo_marked)
    prediction = afnio.Variable(["a", "b"], role="answers", requires_grad=True)
    strictness = afnio.Variable("very", role="strictness", requires_grad=True)
    rubric, messages = rubric_message(requires_grad=True)
    messages[0]["content"].append(afnio.Variable("Be {level} strict.", role="strictness line"))
    score, explanation = LMJudgeEvaluator.apply(
        judge,
        messages,
        prediction,
        ["a", "x"],
        inputs={"level": strictness},
        success_fn=lambda s: s == 1,
        eval_mode=False,
        backward_model_client=backward_model,
    )
    grads = explanation.grad_fn.apply([None, afnio.Variable(explanation.data)])
    # Flat order: rubric, strictness line, judge template, prediction, strictness.
    rubric_grad, line_grad, template_grad, prediction_grad, strictness_grad = grads
    assert line_grad is None and template_grad is None  # they do not require grad
    assert prediction_grad.data == ["", "b is wrong"]
    assert rubric_grad.data == "change Judge strictly."
    assert strictness_grad.data == "change very"
    # Shared judge Variables each get one call over the failed sample.
    assert backward_model.calls == 2
    assert all("b is wrong" in m[-1]["content"] for m, _ in backward_model.requests)


def test_judge_accepts_tagged_reply_and_scalar_prediction():
    judge = ScriptedModel(["<SCORE>7.5</SCORE><EXPLANATION>Mostly right.</EXPLANATION>"])
    prediction = afnio.Variable("essay", role="essay", requires_grad=True)
    score, explanation = LMJudgeEvaluator.apply(
        judge, [{"role": "user", "content": ["Grade: {prediction}"]}], prediction
    )
    assert score.data == 7.5 and explanation.data == "Mostly right."
    explanation.backward()
    assert prediction.grad[0].data == "Mostly right."


def test_judge_malformed_reply_is_retried_then_raises_quoting_it():
    judge = ScriptedModel(["Looks good to me!"])
    prediction = afnio.Variable("x", role="answer")
    with pytest.raises(ReplyParseError) as info:
        LMJudgeEvaluator.apply(judge, [{"role": "user", "content": ["{prediction}"]}], prediction)
    assert "'Looks good to me!'" in str(info.value) and "LMJudgeEvaluator" in str(info.value)
    assert "'answer'" in str(info.value)
    assert judge.calls == 3
    retry = judge.requests[1][0]
    assert retry[-2]["content"] == "Looks good to me!" and '"score"' in retry[-1]["content"]


def test_judge_malformed_then_valid_reply():
    judge = ScriptedModel(
        ['{"score": "high", "explanation": "?"}', '{"score": "0.25", "explanation": "weak"}']
    )
    score, explanation = LMJudgeEvaluator.apply(
        judge, [{"role": "user", "content": ["{prediction}"]}], afnio.Variable("x")
    )
    assert score.data == 0.25 and explanation.data == "weak" and judge.calls == 2


def test_judge_argument_errors():
    messages = [{"role": "user", "content": ["{prediction} {target}"]}]
    with pytest.raises(ValueError, match=r"may not use the names \['target'\]"):
        LMJudgeEvaluator.apply(
            ScriptedModel(), messages, afnio.Variable("a"), "b", inputs={"target": "c"}
        )
    with pytest.raises(ValueError, match=r"no input for placeholder\(s\) \['target'\]"):
        LMJudgeEvaluator.apply(ScriptedModel(), messages, afnio.Variable("a"))
    with pytest.raises(TypeError, match="forward_model_client"):
        LMJudgeEvaluator.apply(None, messages, afnio.Variable("a"), "b")


def test_exact_match_compares_values_not_objects():
    built = "".join(["c", "at"])  # equal to "cat", but another object
    prediction = afnio.Variable([built, "dog"], role="labels", requires_grad=True)
    score, _ = ExactMatchEvaluator.apply(prediction, ["cat", "cow"])
    assert score.data == 1


# The last "user" is built at run time: equal to the literal, but not the same object.
@pytest.mark.parametrize("last_role", ["assistant", "system", "".join(["us", "er"])])
def test_the_judge_format_instruction_joins_a_last_user_message_or_follows_as_one(last_role):
    judge = ScriptedModel(['{"score": 1, "explanation": "fine"}'])
    messages = [{"role": "user", "content": ["Grade: {prediction}"]},
                {"role": last_role, "content": ["Be strict."]}]
    LMJudgeEvaluator.apply(judge, messages, afnio.Variable("x", role="answer"))
    ((request, _),) = judge.requests
    instruction = fill_template(
        prompts.JUDGE_FORMAT_INSTRUCTION,
        {"max_sentences": str(afnio.get_settings().max_feedback_sentences)},
    )
    if last_role == "user":
        assert len(request) == 2 and request[-1]["content"] == "Be strict.\n\n" + instruction
    else:
        assert request[1] == {"role": last_role, "content": "Be strict."}
        assert request[2] == {"role": "user", "content": instruction}


@pytest.mark.parametrize(("prediction", "about"), [
    (afnio.Variable("omega", role="answer"), "about 'answer'"),
    (afnio.Variable(["alpha", "omega"], role="answers"), "about sample 1 of 'answers'"),
])
def test_an_unreadable_judgement_names_the_sample_it_was_about(prediction, about):
    judge = ScriptedModel(
        lambda messages, **kw: "Looks good to me!" if "omega" in messages[0]["content"]
        else '{"score": 1, "explanation": "fine"}'
    )
    with pytest.raises(ReplyParseError, match=f"LMJudgeEvaluator: the judge's reply {about}"):
        LMJudgeEvaluator.apply(judge, [{"role": "user", "content": ["{prediction}"]}], prediction)


@pytest.mark.parametrize("eval_mode", [True, False])
def test_the_judges_target_never_gets_a_gradient(eval_mode):
    judge = ScriptedModel(judge_replies)
    prediction = afnio.Variable(["a", "b"], role="answers", requires_grad=True)
    target = afnio.Variable(["a", "x"], role="gold answers", requires_grad=True)
    _, messages = rubric_message()
    _, explanation = LMJudgeEvaluator.apply(
        judge, messages, prediction, target, eval_mode=eval_mode,
        backward_model_client=ScriptedModel(echo_marked),
    )
    explanation.backward()
    assert target.grad == []
    assert [g.data for g in prediction.grad] == [["fine", "b is wrong"]]


@pytest.mark.parametrize("reply", ["<SCORE>1</SCORE>", "<EXPLANATION>Good.</EXPLANATION>",
                                   '{"score": 1}', '{"explanation": "Good."}'])
def test_a_judgement_needs_both_a_score_and_an_explanation(reply):
    with pytest.raises(Unreadable, match='not one JSON object with "score" and "explanation"'):
        parse_judgement(reply)


def test_deterministic_scores_and_explanations_are_named_after_the_prediction():
    labels = afnio.Variable(["a"], role="labels", requires_grad=True)
    score, explanation = ExactMatchEvaluator.apply(labels, ["a"])
    assert score.role == "summation of the exact match scores of labels"
    assert explanation.role == "explanation of the exact match score of labels"
    score, explanation = ExactMatchEvaluator.apply(afnio.Variable(["a"]), ["a"])
    assert score.role == "summation of the exact match scores of prediction"


def test_an_unreadable_score_is_quoted_in_its_first_40_characters():
    score = "about " + "seven out of ten, more or less " * 3
    with pytest.raises(Unreadable) as info:
        parse_judgement(f"<SCORE>{score}</SCORE><EXPLANATION>Fine.</EXPLANATION>")
    assert str(info.value) == f"the score {score[:40]!r} is not a finite number"


def test_a_gradient_on_the_score_alone_reaches_nothing():
    prediction = afnio.Variable(["a", "b"], role="labels", requires_grad=True)
    score, _ = ExactMatchEvaluator.apply(prediction, ["a", "x"])
    # Called directly, the node gets no explanation gradient at all: nothing for the prediction.
    assert score.grad_fn.apply([afnio.Variable("score higher"), None]) == [None]
    score, _ = ExactMatchEvaluator.apply(prediction, ["a", "x"])
    score.backward(afnio.Variable("score higher"))  # through the engine
    assert prediction.grad == []

    judge, backward_model = ScriptedModel(judge_replies), ScriptedModel(echo_marked)
    rubric, messages = rubric_message(requires_grad=True)
    score, _ = LMJudgeEvaluator.apply(judge, messages, prediction, ["a", "x"], eval_mode=False,
                                      backward_model_client=backward_model)
    score.backward(afnio.Variable("score higher"))
    assert prediction.grad == [] and rubric.grad == [] and backward_model.calls == 0

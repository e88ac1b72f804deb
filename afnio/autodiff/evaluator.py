"""Evaluators: differentiable losses that return a ``(score, explanation)`` pair.

``score`` is a number reduced over the batch by ``reduction_fn``; ``explanation`` keeps one text
per sample. Calling ``explanation.backward()`` (no argument: the explanation *is* the loss) sends
each sample's explanation back to the prediction as its feedback — except for samples where
``success_fn(score)`` is true, which get empty feedback and so cost no downstream LLM call. The
score's own gradient is not used (a number carries no textual feedback), and the target, being
the reference, never gets a gradient.

Example:
    >>> import afnio
    >>> prediction = afnio.Variable(["4", "5"], role="answers", requires_grad=True)
    >>> score, explanation = ExactMatchEvaluator.apply(prediction, ["4", "4"])
    >>> score.data
    1
    >>> explanation.backward()
    >>> prediction.grad[0].data[0]
    ''
    >>> print(prediction.grad[0].data[1])
    Compared with the target "4", the answers "5" gets a score of 0 from exact match. This does not count as a success.
"""  # noqa: E501

from __future__ import annotations

import contextlib
import json
import math
import numbers
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from afnio._variable import Variable
from afnio.autodiff import prompts
from afnio.autodiff.basic_ops import broadcast_elements, broadcast_size
from afnio.autodiff.feedback import (
    BackwardModel,
    Unreadable,
    ask,
    extract,
    fill_prompt,
    fill_template,
    gather_all,
)
from afnio.autodiff.function import Function, FunctionCtx
from afnio.autodiff.graph import gradient_role, reduce_to_scalar
from afnio.autodiff.lm_ops import (
    BoundMessages,
    GradientRequest,
    Slot,
    check_clients,
    check_forward_fits,
    feedback_texts,
)
from afnio.models.model import ChatCompletionModel

__all__ = ["DeterministicEvaluator", "ExactMatchEvaluator", "LMJudgeEvaluator"]

Number = int | float
SuccessFn = Callable[[Any], bool]
ReductionFn = Callable[[list], Any]


def _number(op: str, what: str, value: Any) -> Number:
    """``value`` as an int or float (a bool counts as 0/1)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{op}: {what} must be a number, got {type(value).__name__} ({value!r:.80})")


def _quoted(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def _reduce(op: str, reduction_fn: ReductionFn, purpose: str, scores: list[Number]) -> Number:
    if not callable(reduction_fn):
        raise TypeError(f"{op}: argument 'reduction_fn' must be callable, got {reduction_fn!r}")
    return _number(op, f"reduction_fn ({purpose}) result", reduction_fn(scores))


def _successes(op: str, success_fn: SuccessFn | None, scores: list[Number]) -> list[bool]:
    if success_fn is None:
        return [False] * len(scores)
    if not callable(success_fn):
        raise TypeError(f"{op}: argument 'success_fn' must be callable or None, got {success_fn!r}")
    return [bool(success_fn(score)) for score in scores]


def _pack(values: list, batched: bool) -> Any:
    return values if batched else values[0]


def _filtered_feedback(grad: Variable | None, successes: list[bool]) -> list[str]:
    """Feedback per sample from the explanation's gradient; ``""`` for successful samples."""
    texts = feedback_texts(grad, len(successes))
    return ["" if success else text for text, success in zip(texts, successes)]


def _shaped_for(variable: Variable, feedback: list[str], batched: bool) -> Variable | None:
    """Per-sample feedback shaped like ``variable`` (a shared scalar gets it merged), or None
    when every sample's feedback is empty."""
    if not any(feedback):
        return None
    role = gradient_role(variable.role)
    if variable.is_batched:
        return Variable(list(feedback), role=role)
    if batched:
        return Variable(reduce_to_scalar(Variable(list(feedback))), role=role)
    return Variable(feedback[0], role=role)


# --------------------------------------------------------------------------- deterministic
def _deterministic_forward(
    ctx: FunctionCtx,
    op: str,
    prediction: Variable,
    target: Any,
    eval_fn: Callable[[Any, Any], Any],
    eval_fn_purpose: str,
    success_fn: SuccessFn | None,
    reduction_fn: ReductionFn,
    reduction_fn_purpose: str,
) -> tuple[Variable, Variable]:
    if not isinstance(prediction, Variable):
        raise TypeError(
            f"{op}: argument 'prediction' must be a Variable, got {type(prediction).__name__}"
        )
    if not isinstance(target, Variable):
        try:
            target = Variable(target, role="target")
        except TypeError as exc:
            raise TypeError(f"{op}: argument 'target': {exc}") from None
    if not callable(eval_fn):
        raise TypeError(f"{op}: argument 'eval_fn' must be callable, got {eval_fn!r}")
    size = broadcast_size(op, [prediction, target])
    batched = size is not None
    predictions = broadcast_elements(prediction, size)
    targets = broadcast_elements(target, size)
    scores = [
        _number(op, f"eval_fn ({eval_fn_purpose}) result for sample {i}", eval_fn(p, t))
        for i, (p, t) in enumerate(zip(predictions, targets))
    ]
    successes = _successes(op, success_fn, scores)
    verdicts = [
        ""
        if success_fn is None
        else (prompts.DETERMINISTIC_SUCCESS if ok else prompts.DETERMINISTIC_FAILURE)
        for ok in successes
    ]
    explanations = [
        fill_template(
            prompts.DETERMINISTIC_EXPLANATION,
            {
                "prediction_role": prediction.role or "prediction",
                "prediction": _quoted(p),
                "target_role": target.role or "target",
                "target": _quoted(t),
                "eval_fn_purpose": eval_fn_purpose,
                "score": str(s),
                "verdict": verdict,
            },
        )
        for p, t, s, verdict in zip(predictions, targets, scores, verdicts)
    ]
    score = _reduce(op, reduction_fn, reduction_fn_purpose, scores)
    what = prediction.role or "prediction"
    ctx.prediction = prediction
    ctx.successes = successes
    ctx.batched = batched
    return (
        Variable(score, role=f"{reduction_fn_purpose} of the {eval_fn_purpose} scores of {what}"),
        Variable(
            _pack(explanations, batched),
            role=f"explanation of the {eval_fn_purpose} score of {what}",
        ),
    )


def _prediction_gradient(ctx: FunctionCtx, explanation_grad: Variable | None) -> Variable | None:
    if not ctx.needs_input_grad[0]:
        return None
    feedback = _filtered_feedback(explanation_grad, ctx.successes)
    return _shaped_for(ctx.prediction, feedback, ctx.batched)


class DeterministicEvaluator(Function):
    """Score predictions with a Python function; explain each score from a template (no LLM).

    ``DeterministicEvaluator.apply(prediction, target, eval_fn, eval_fn_purpose, success_fn,
    reduction_fn, reduction_fn_purpose)``.

    Args:
        prediction: The Variable being evaluated (scalar or batch).
        target: The reference: a Variable or raw data (a scalar broadcasts over a batch).
        eval_fn: ``eval_fn(prediction_element, target_element) -> number`` per sample (a bool
            counts as 0/1).
        eval_fn_purpose: What ``eval_fn`` measures, e.g. ``"exact match"`` (quoted in
            explanations).
        success_fn: ``success_fn(score) -> bool``; a successful sample gets empty feedback.
            ``None``: no sample counts as a success.
        reduction_fn: Reduces the list of per-sample scores to the scalar score (a scalar
            prediction is a batch of one).
        reduction_fn_purpose: What ``reduction_fn`` does, e.g. ``"summation"``.

    Returns:
        ``(score, explanation)``: the reduced score, and one explanation per sample.

    Example:
        >>> import afnio
        >>> p = afnio.Variable(["ab", "abc"], role="summaries", requires_grad=True)
        >>> score, why = DeterministicEvaluator.apply(
        ...     p, 3, lambda pred, limit: len(pred) <= limit, "length within limit",
        ...     lambda s: s == 1, min, "minimum")
        >>> score.data
        1
        >>> print(why.data[0])
        Compared with the target 3, the summaries "ab" gets a score of 1 from length within limit. This counts as a success.
    """  # noqa: E501

    inline_backward = True

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        prediction: Variable,
        target: Any,
        eval_fn: Callable[[Any, Any], Any],
        eval_fn_purpose: str,
        success_fn: SuccessFn | None = None,
        reduction_fn: ReductionFn = sum,
        reduction_fn_purpose: str = "summation",
    ) -> tuple[Variable, Variable]:
        return _deterministic_forward(
            ctx, "DeterministicEvaluator", prediction, target, eval_fn, eval_fn_purpose,
            success_fn, reduction_fn, reduction_fn_purpose,
        )

    @staticmethod
    def backward(
        ctx: FunctionCtx, score_grad: Variable, explanation_grad: Variable
    ) -> tuple[Variable | None, None]:
        return _prediction_gradient(ctx, explanation_grad), None


def _exact_match(prediction: Any, target: Any) -> int:
    return int(prediction == target)


def _is_match(score: Any) -> bool:
    return score == 1


class ExactMatchEvaluator(Function):
    """1 for a sample equal to its target, else 0; feedback only for the samples that differ.

    ``ExactMatchEvaluator.apply(prediction, target, reduction_fn=sum,
    reduction_fn_purpose="summation")``.

    Example:
        >>> import afnio
        >>> p = afnio.Variable(["cat", "dog"], role="labels", requires_grad=True)
        >>> score, why = ExactMatchEvaluator.apply(p, afnio.Variable(["cat", "cow"], role="gold"))
        >>> score.data
        1
        >>> print(why.data[1])
        Compared with the gold "cow", the labels "dog" gets a score of 0 from exact match. This does not count as a success.
    """  # noqa: E501

    inline_backward = True

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        prediction: Variable,
        target: Any,
        reduction_fn: ReductionFn = sum,
        reduction_fn_purpose: str = "summation",
    ) -> tuple[Variable, Variable]:
        return _deterministic_forward(
            ctx, "ExactMatchEvaluator", prediction, target, _exact_match, "exact match",
            _is_match, reduction_fn, reduction_fn_purpose,
        )

    @staticmethod
    def backward(
        ctx: FunctionCtx, score_grad: Variable, explanation_grad: Variable
    ) -> tuple[Variable | None, None]:
        return _prediction_gradient(ctx, explanation_grad), None


# --------------------------------------------------------------------------- LM judge
_JUDGE = "LMJudgeEvaluator"
_MESSAGES_ARG, _PREDICTION_ARG, _TARGET_ARG, _INPUTS_ARG = 1, 2, 3, 4


def _with_format_instruction(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    instruction = fill_prompt(prompts.JUDGE_FORMAT_INSTRUCTION)
    messages = [dict(message) for message in messages]
    if messages[-1]["role"] == "user":
        messages[-1]["content"] = messages[-1]["content"] + "\n\n" + instruction
    else:
        messages.append({"role": "user", "content": instruction})
    return messages


_JUDGEMENT_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "number"}, "explanation": {"type": "string"}},
    "required": ["score", "explanation"],
}


def _finite_number(text: str) -> int | float | None:
    for kind in (int, float):
        try:
            number = kind(text.strip())
        except ValueError:
            continue
        return number if math.isfinite(number) else None
    return None


def parse_judgement(reply: str) -> tuple[int | float, str]:
    """``(score, explanation)`` from a judge's reply: a JSON object ``{"score": <number>,
    "explanation": <text>}`` or the tags ``<SCORE>…</SCORE>`` and ``<EXPLANATION>…</EXPLANATION>``.

    Raises:
        Unreadable: When either part is missing or the score is not a finite number.

    Example:
        >>> parse_judgement('```json\\n{"score": 0.5, "explanation": "Half right."}\\n```')
        (0.5, 'Half right.')
        >>> parse_judgement("<SCORE>1</SCORE><EXPLANATION>Correct.</EXPLANATION>")
        (1, 'Correct.')
    """
    score_text, explanation = extract(reply, "SCORE"), extract(reply, "EXPLANATION")
    if score_text is None or explanation is None:
        raise Unreadable('the reply is not one JSON object with "score" and "explanation"')
    score = _finite_number(score_text)
    if score is None:
        raise Unreadable(f"the score {score_text[:40]!r} is not a finite number")
    return score, explanation


class LMJudgeEvaluator(Function):
    """A language model scores and explains each prediction.

    ``LMJudgeEvaluator.apply(forward_model_client, messages, prediction, target=None,
    inputs=None, success_fn=None, reduction_fn=sum, reduction_fn_purpose="summation",
    eval_mode=True, **completion_args)``.

    The judge's ``messages`` follow :class:`~afnio.autodiff.lm_ops.ChatCompletion`'s rules and
    must use the placeholder ``{prediction}`` (and ``{target}`` when a target is given); the other
    placeholders come from ``inputs``. afnio appends an instruction asking for one JSON object
    ``{"score": <number>, "explanation": <text>}`` per sample; a reply it can't read is retried,
    then raises :class:`~afnio.autodiff.lm_ops.ReplyParseError` quoting the reply.

    Backward sends each sample's explanation feedback straight to the prediction (no LLM call).
    With ``eval_mode=False`` the judge's own ``messages``/``inputs`` Variables that require grad
    also get gradients, computed as :class:`~afnio.autodiff.lm_ops.ChatCompletion` computes them
    (backward model calls). ``backward_model_client=`` / ``backward_completion_args=`` override
    the global backward settings for that.

    Returns:
        ``(score, explanation)``: ``reduction_fn`` over the per-sample scores, and one
        explanation per sample.

    Example:
        >>> import afnio
        >>> from afnio.testing import ScriptedModel
        >>> judge = ScriptedModel(['{"score": 0, "explanation": "Not polite."}'])
        >>> reply = afnio.Variable("No.", role="reply to customer", requires_grad=True)
        >>> rubric = afnio.Variable("Is this reply polite? {prediction}", role="judge rubric")
        >>> score, why = LMJudgeEvaluator.apply(
        ...     judge, [{"role": "user", "content": [rubric]}], reply)
        >>> score.data, why.data
        (0, 'Not polite.')
        >>> why.backward()
        >>> reply.grad[0].data
        'Not polite.'
    """

    @staticmethod
    async def forward(
        ctx: FunctionCtx,
        forward_model_client: ChatCompletionModel,
        messages: list[dict[str, Any]],
        prediction: Variable,
        target: Any = None,
        inputs: dict[str, Any] | None = None,
        success_fn: SuccessFn | None = None,
        reduction_fn: ReductionFn = sum,
        reduction_fn_purpose: str = "summation",
        eval_mode: bool = True,
        *,
        backward_model_client: ChatCompletionModel | None = None,
        backward_completion_args: dict[str, Any] | None = None,
        **completion_args: Any,
    ) -> tuple[Variable, Variable]:
        check_clients(
            _JUDGE, forward_model_client, backward_model_client, backward_completion_args
        )
        if not isinstance(prediction, (Variable, str, list, tuple)):
            raise TypeError(
                f"{_JUDGE}: argument 'prediction' must be a Variable, a str or a list, got "
                f"{type(prediction).__name__}"
            )
        if inputs is not None and not isinstance(inputs, dict):
            raise TypeError(
                f"{_JUDGE}: argument 'inputs' must be a dict or None, got {type(inputs).__name__}"
            )
        reserved = {"prediction", "target"} & set(inputs or {})
        if reserved:
            raise ValueError(
                f"{_JUDGE}: argument 'inputs' may not use the names {sorted(reserved)}; pass them "
                "as the 'prediction' and 'target' arguments"
            )
        all_inputs: dict[str, Any] = {"prediction": prediction}
        arguments = {"prediction": _PREDICTION_ARG}
        if target is not None:
            all_inputs["target"] = target
            arguments["target"] = _TARGET_ARG
        all_inputs.update(inputs or {})
        arguments.update({name: _INPUTS_ARG for name in inputs or {}})
        bound = BoundMessages(
            _JUDGE, messages, all_inputs, _MESSAGES_ARG, arguments,
            input_paths={"prediction": (_PREDICTION_ARG,), "target": (_TARGET_ARG,)},
        )
        requests = [_with_format_instruction(bound.render(p)) for p in bound.positions]
        check_forward_fits(bound, forward_model_client, requests, completion_args)
        repair = fill_prompt(prompts.JUDGE_FORMAT_CORRECTION)
        what = prediction.role if isinstance(prediction, Variable) and prediction.role else (
            "the prediction"
        )

        def judge(position: int | None, request: list[dict[str, str]]) -> Any:
            sample = "" if position is None else f"sample {position} of "
            return ask(
                forward_model_client,
                request,
                parse_judgement,
                what=f"{_JUDGE}: the judge's reply about {sample}{what!r}",
                repair=repair,
                completion_args=completion_args,
                schema=("judgement", _JUDGEMENT_SCHEMA),
            )

        judgements = await gather_all(
            [judge(position, request) for position, request in zip(bound.positions, requests)]
        )
        scores = [score for score, _ in judgements]
        explanations = [explanation for _, explanation in judgements]
        successes = _successes(_JUDGE, success_fn, scores)
        score = _reduce(_JUDGE, reduction_fn, reduction_fn_purpose, scores)
        batched = bound.batch_size is not None
        ctx.bound = bound
        ctx.successes = successes
        ctx.replies = [json.dumps({"score": s, "explanation": e}) for s, e in judgements]
        ctx.eval_mode = bool(eval_mode)
        ctx.backward = BackwardModel.capture(backward_model_client, backward_completion_args)
        explanation_role = f"explanation by a language-model judge of {what}"
        ctx.explanation_role = explanation_role
        return (
            Variable(score, role=f"{reduction_fn_purpose} of the judge's scores of {what}"),
            Variable(_pack(explanations, batched), role=explanation_role),
        )

    @staticmethod
    async def backward(
        ctx: FunctionCtx, score_grad: Variable, explanation_grad: Variable
    ) -> AsyncIterator[tuple[tuple, Variable | None]]:
        # Streams: the prediction's feedback (no LLM call) leaves at once; with eval_mode=False
        # each judge Variable's gradient follows as soon as its requests are answered.
        bound: BoundMessages = ctx.bound
        feedback = _filtered_feedback(explanation_grad, ctx.successes)
        batched = bound.batch_size is not None
        if ctx.needs_input_grad[_PREDICTION_ARG]:
            for slot in bound.slots:
                if slot.argument == _PREDICTION_ARG:
                    yield slot.path, _slot_feedback(slot, feedback, batched)
        if ctx.eval_mode:
            return
        wanted = [
            slot.argument in (_MESSAGES_ARG, _INPUTS_ARG)
            and ctx.needs_input_grad[slot.argument]
            and slot.variable.requires_grad
            for slot in bound.slots
        ]
        request = GradientRequest(bound, ctx.replies, ctx.explanation_role, feedback, ctx.backward)
        async with contextlib.aclosing(request.stream(wanted)) as gradients:
            async for slot, gradient in gradients:
                yield slot.path, gradient


def _slot_feedback(slot: Slot, feedback: Sequence[str], batched: bool) -> Variable | None:
    """The judge's per-sample feedback for one prediction slot, shaped like its Variable."""
    if not slot.variable.requires_grad:
        return None
    if slot.element is not None:  # one scalar Variable of a list: its own sample's feedback
        return _shaped_for(slot.variable, [feedback[slot.element]], batched=False)
    return _shaped_for(slot.variable, list(feedback), batched)


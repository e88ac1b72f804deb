"""Functional forms of afnio's differentiable operations (``torch.nn.functional`` style).

Each function calls the matching :class:`~afnio.autodiff.Function`'s ``apply``; the module
wrappers in :mod:`afnio.cognitive.modules` call these.

Example:
    >>> import afnio
    >>> import afnio.cognitive.functional as F
    >>> x = afnio.Variable("a b", role="words", requires_grad=True)
    >>> [part.data for part in F.split(x)]
    ['a', 'b']
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Any

from afnio._variable import Variable
from afnio.autodiff.basic_ops import Add, Split, Sum
from afnio.autodiff.evaluator import DeterministicEvaluator, ExactMatchEvaluator, LMJudgeEvaluator
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.models.model import ChatCompletionModel

__all__ = [
    "add",
    "chat_completion",
    "deterministic_evaluator",
    "exact_match_evaluator",
    "lm_judge_evaluator",
    "split",
    "sum",
]


def add(x: Any, y: Any) -> Variable:
    """``x + y``: numbers add, strings concatenate, batches element-wise with broadcasting.

    Example:
        >>> import afnio
        >>> add(afnio.Variable("Hi "), afnio.Variable("Ann")).data
        'Hi Ann'
    """
    return Add.apply(x, y)


def sum(variables: Sequence[Variable]) -> Variable:  # noqa: A001 - mirrors torch.sum
    """Sum a list of Variables: numbers add, texts are joined under ``[role]`` headers.

    Example:
        >>> import afnio
        >>> sum([afnio.Variable(1), afnio.Variable(2)]).data
        3
    """
    return Sum.apply(variables)


def split(x: Variable, sep: str | None = None, maxsplit: int = -1) -> tuple[Variable, ...]:
    """Split text like ``str.split`` into a tuple of Variables (element-wise for batches).

    Example:
        >>> import afnio
        >>> [p.data for p in split(afnio.Variable("a,b"), ",")]
        ['a', 'b']
    """
    return Split.apply(x, sep, maxsplit)


def chat_completion(
    forward_model_client: ChatCompletionModel,
    messages: list[dict[str, Any]],
    inputs: dict[str, Any] | None = None,
    **completion_args: Any,
) -> Variable:
    """Ask a chat model, one request per batch element; differentiable with textual gradients.

    ``completion_args`` go to the model, except afnio's own ``backward_model_client`` and
    ``backward_completion_args`` (see :class:`afnio.autodiff.lm_ops.ChatCompletion`).

    Example:
        >>> import afnio
        >>> from afnio.testing import ScriptedModel
        >>> prompt = afnio.Variable("Capital of {country}?", role="question template")
        >>> chat_completion(ScriptedModel(["Paris"]), [{"role": "user", "content": [prompt]}],
        ...                 inputs={"country": "France"}).data
        'Paris'
    """
    return ChatCompletion.apply(forward_model_client, messages, inputs, **completion_args)


def deterministic_evaluator(
    prediction: Variable,
    target: Any,
    eval_fn: Callable[[Any, Any], Any],
    eval_fn_purpose: str,
    success_fn: Callable[[Any], bool] | None = None,
    reduction_fn: Callable[[list], Any] = builtins.sum,
    reduction_fn_purpose: str = "summation",
) -> tuple[Variable, Variable]:
    """Score ``prediction`` against ``target`` with ``eval_fn``; returns ``(score,
    explanation)`` (see :class:`afnio.autodiff.evaluator.DeterministicEvaluator`).

    Example:
        >>> import afnio
        >>> score, _ = deterministic_evaluator(
        ...     afnio.Variable(["a", "bb"], role="answers"), afnio.Variable(["a", "b"]),
        ...     lambda p, t: int(p == t), "exact match")
        >>> score.data
        1
    """
    return DeterministicEvaluator.apply(
        prediction, target, eval_fn, eval_fn_purpose, success_fn, reduction_fn,
        reduction_fn_purpose,
    )


def exact_match_evaluator(
    prediction: Variable,
    target: Any,
    reduction_fn: Callable[[list], Any] = builtins.sum,
    reduction_fn_purpose: str = "summation",
) -> tuple[Variable, Variable]:
    """1 per sample equal to its target, reduced by ``reduction_fn``; returns ``(score,
    explanation)``.

    Example:
        >>> import afnio
        >>> score, _ = exact_match_evaluator(afnio.Variable(["cat", "dog"]), ["cat", "cow"])
        >>> score.data
        1
    """
    return ExactMatchEvaluator.apply(prediction, target, reduction_fn, reduction_fn_purpose)


def lm_judge_evaluator(
    forward_model_client: ChatCompletionModel,
    messages: list[dict[str, Any]],
    prediction: Variable,
    target: Any = None,
    inputs: dict[str, Any] | None = None,
    success_fn: Callable[[Any], bool] | None = None,
    reduction_fn: Callable[[list], Any] = builtins.sum,
    reduction_fn_purpose: str = "summation",
    eval_mode: bool = True,
    **completion_args: Any,
) -> tuple[Variable, Variable]:
    """A language model scores and explains each prediction; returns ``(score, explanation)``
    (see :class:`afnio.autodiff.evaluator.LMJudgeEvaluator`)."""
    return LMJudgeEvaluator.apply(
        forward_model_client, messages, prediction, target, inputs, success_fn, reduction_fn,
        reduction_fn_purpose, eval_mode, **completion_args,
    )

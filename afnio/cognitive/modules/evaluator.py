"""Module wrappers of the evaluators: :class:`DeterministicEvaluator`,
:class:`ExactMatchEvaluator` and :class:`LMJudgeEvaluator` (each returns ``(score,
explanation)``; call ``explanation.backward()`` to backpropagate).

Example:
    >>> import afnio
    >>> from afnio.cognitive import ExactMatchEvaluator
    >>> score, explanation = ExactMatchEvaluator()(
    ...     afnio.Variable(["cat", "dog"], role="labels"), afnio.Variable(["cat", "cow"]))
    >>> score.data
    1
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

from afnio._variable import Variable
from afnio.cognitive import functional as F
from afnio.cognitive.modules.module import Module, is_chat
from afnio.models.model import ChatCompletionModel

__all__ = ["DeterministicEvaluator", "ExactMatchEvaluator", "LMJudgeEvaluator"]


class DeterministicEvaluator(Module):
    """Score predictions with a Python function; explanations come from a template (no LLM).

    Args:
        eval_fn: ``eval_fn(prediction_element, target_element) -> number``.
        eval_fn_purpose: What ``eval_fn`` measures (quoted in explanations).
        success_fn: ``success_fn(score) -> bool``; successful samples get no feedback.
        reduction_fn: Reduces the per-sample scores (default ``sum``).
        reduction_fn_purpose: What the reduction does (quoted in explanations).
    """

    def __init__(
        self,
        eval_fn: Callable[[Any, Any], Any],
        eval_fn_purpose: str,
        success_fn: Callable[[Any], bool] | None = None,
        reduction_fn: Callable[[list], Any] = builtins.sum,
        reduction_fn_purpose: str = "summation",
    ) -> None:
        super().__init__()
        self.register_function("eval_fn", eval_fn)
        self.register_function("success_fn", success_fn)
        self.register_function("reduction_fn", reduction_fn)
        self.eval_fn_purpose = eval_fn_purpose
        self.reduction_fn_purpose = reduction_fn_purpose

    def forward(self, prediction: Variable, target: Any) -> tuple[Variable, Variable]:
        return F.deterministic_evaluator(
            prediction, target, self.eval_fn, self.eval_fn_purpose, self.success_fn,
            self.reduction_fn, self.reduction_fn_purpose,
        )

    def extra_repr(self) -> str:
        return f"eval_fn_purpose={self.eval_fn_purpose!r}"


class ExactMatchEvaluator(Module):
    """1 per sample equal to its target, else 0, reduced by ``reduction_fn``.

    Args:
        reduction_fn: Reduces the per-sample scores (default ``sum``).
        reduction_fn_purpose: What the reduction does (quoted in explanations).
    """

    def __init__(
        self,
        reduction_fn: Callable[[list], Any] = builtins.sum,
        reduction_fn_purpose: str = "summation",
    ) -> None:
        super().__init__()
        self.register_function("reduction_fn", reduction_fn)
        self.reduction_fn_purpose = reduction_fn_purpose

    def forward(self, prediction: Variable, target: Any) -> tuple[Variable, Variable]:
        return F.exact_match_evaluator(
            prediction, target, self.reduction_fn, self.reduction_fn_purpose
        )


class LMJudgeEvaluator(Module):
    """A language model scores and explains each prediction.

    Args:
        forward_model_client: The judge model (registered as ``forward_model_client``).
        messages: The judge's messages, using ``{prediction}`` (and ``{target}``); registered
            as the chat ``messages`` when their contents are Variables.
        success_fn: ``success_fn(score) -> bool``; successful samples get no feedback.
        reduction_fn: Reduces the per-sample scores (default ``sum``).
        reduction_fn_purpose: What the reduction does.
        eval_mode: Send gradients to the prediction only (``False``: also to the judge's own
            messages/inputs that require grad).
        **completion_args: Sent with every judge request (registered as ``completion_args``),
            plus afnio's ``backward_model_client`` / ``backward_completion_args``.
    """

    def __init__(
        self,
        forward_model_client: ChatCompletionModel,
        messages: list[dict[str, Any]],
        success_fn: Callable[[Any], bool] | None = None,
        reduction_fn: Callable[[list], Any] = builtins.sum,
        reduction_fn_purpose: str = "summation",
        eval_mode: bool = True,
        **completion_args: Any,
    ) -> None:
        super().__init__()
        if not isinstance(forward_model_client, ChatCompletionModel):
            raise TypeError(
                "LMJudgeEvaluator: argument 'forward_model_client' must be a "
                f"ChatCompletionModel, got {type(forward_model_client).__name__}"
            )
        self.register_model("forward_model_client", forward_model_client)
        backward_client = completion_args.pop("backward_model_client", None)
        if backward_client is not None:
            self.register_model("backward_model_client", backward_client)
        if is_chat(messages):
            self.register_chat("messages", messages)
        else:
            self.messages = messages
        self.register_function("success_fn", success_fn)
        self.register_function("reduction_fn", reduction_fn)
        self.reduction_fn_purpose = reduction_fn_purpose
        self.eval_mode = eval_mode
        self.register_completion_config("completion_args", dict(completion_args))

    def forward(
        self,
        prediction: Variable,
        target: Any = None,
        inputs: dict[str, Any] | None = None,
        **completion_args: Any,
    ) -> tuple[Variable, Variable]:
        arguments = {**(self.completion_args or {}), **completion_args}
        if self._models.get("backward_model_client") is not None:
            arguments.setdefault("backward_model_client", self.backward_model_client)
        return F.lm_judge_evaluator(
            self.forward_model_client, self.messages, prediction, target, inputs,
            self.success_fn, self.reduction_fn, self.reduction_fn_purpose, self.eval_mode,
            **arguments,
        )

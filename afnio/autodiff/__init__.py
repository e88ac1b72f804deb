"""Automatic differentiation for text: Functions, the graph, the engine and grad modes."""

from afnio.autodiff.basic_ops import Add, Clone, Select, Slice, Split, Sum, Unbind
from afnio.autodiff.engine import abackward, agrad, backward, grad
from afnio.autodiff.evaluator import (
    DeterministicEvaluator,
    ExactMatchEvaluator,
    LMJudgeEvaluator,
)
from afnio.autodiff.feedback import (
    ContextWindowError,
    FeedbackFormatWarning,
    ReplyParseError,
    get_feedback_stats,
    get_gradient_token_budget,
    reset_feedback_stats,
    set_gradient_token_budget,
)
from afnio.autodiff.function import Function, FunctionCtx, variable_paths
from afnio.autodiff.grad_mode import (
    enable_grad,
    inference_mode,
    is_grad_enabled,
    no_grad,
    set_grad_enabled,
)
from afnio.autodiff.graph import AccumulateGrad, GradientEdge, Node
from afnio.autodiff.lm_ops import ChatCompletion

__all__ = [
    "AccumulateGrad",
    "Add",
    "ChatCompletion",
    "Clone",
    "ContextWindowError",
    "DeterministicEvaluator",
    "ExactMatchEvaluator",
    "FeedbackFormatWarning",
    "LMJudgeEvaluator",
    "ReplyParseError",
    "get_feedback_stats",
    "get_gradient_token_budget",
    "reset_feedback_stats",
    "set_gradient_token_budget",
    "Function",
    "FunctionCtx",
    "GradientEdge",
    "Node",
    "Select",
    "Slice",
    "Split",
    "Sum",
    "Unbind",
    "abackward",
    "agrad",
    "backward",
    "enable_grad",
    "grad",
    "inference_mode",
    "is_grad_enabled",
    "no_grad",
    "set_grad_enabled",
    "variable_paths",
]

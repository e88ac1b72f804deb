"""Automatic differentiation for text: Functions, the graph, the engine and grad modes."""

from afnio.autodiff.basic_ops import Add, Split, Sum
from afnio.autodiff.engine import abackward, backward
from afnio.autodiff.function import Function, FunctionCtx
from afnio.autodiff.grad_mode import (
    enable_grad,
    inference_mode,
    is_grad_enabled,
    no_grad,
    set_grad_enabled,
)
from afnio.autodiff.graph import AccumulateGrad, GradientEdge, Node

__all__ = [
    "AccumulateGrad",
    "Add",
    "Function",
    "FunctionCtx",
    "GradientEdge",
    "Node",
    "Split",
    "Sum",
    "abackward",
    "backward",
    "enable_grad",
    "inference_mode",
    "is_grad_enabled",
    "no_grad",
    "set_grad_enabled",
]

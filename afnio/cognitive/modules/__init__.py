"""The module classes of :mod:`afnio.cognitive`."""

from afnio.cognitive.modules.basic_ops import Add, Split, Sum
from afnio.cognitive.modules.container import ModuleDict, ModuleList, Sequential
from afnio.cognitive.modules.evaluator import (
    DeterministicEvaluator,
    ExactMatchEvaluator,
    LMJudgeEvaluator,
)
from afnio.cognitive.modules.grad_component import (
    BackwardEngine,
    ComponentResponse,
    FunGradComponent,
    GradComponent,
    fun_to_grad_component,
)
from afnio.cognitive.modules.lm_ops import ChatCompletion
from afnio.cognitive.modules.module import (
    IncompatibleKeys,
    Module,
    register_module_forward_hook,
    register_module_forward_pre_hook,
)

__all__ = [
    "Add",
    "BackwardEngine",
    "ComponentResponse",
    "ChatCompletion",
    "DeterministicEvaluator",
    "ExactMatchEvaluator",
    "FunGradComponent",
    "GradComponent",
    "IncompatibleKeys",
    "LMJudgeEvaluator",
    "Module",
    "ModuleDict",
    "ModuleList",
    "Sequential",
    "Split",
    "Sum",
    "fun_to_grad_component",
    "register_module_forward_hook",
    "register_module_forward_pre_hook",
]

"""The layer afnio programs are written in: Parameters, Modules, containers, op modules and
GradComponents (``torch.nn`` for text).

Example:
    >>> from afnio.cognitive import Module, Parameter
    >>> class Agent(Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.system_prompt = Parameter("Answer briefly.", role="system prompt")
    >>> list(Agent().state_dict())
    ['system_prompt']
"""

from afnio.cognitive import functional
from afnio.cognitive.modules import (
    Add,
    BackwardEngine,
    ChatCompletion,
    ComponentResponse,
    DeterministicEvaluator,
    ExactMatchEvaluator,
    FunGradComponent,
    GradComponent,
    IncompatibleKeys,
    LMJudgeEvaluator,
    Module,
    ModuleDict,
    ModuleList,
    Sequential,
    Split,
    Sum,
    fun_to_grad_component,
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from afnio.cognitive.parameter import Parameter, ParameterType

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
    "Parameter",
    "ParameterType",
    "Sequential",
    "Split",
    "Sum",
    "fun_to_grad_component",
    "register_module_forward_hook",
    "register_module_forward_pre_hook",
    "functional",
]

"""afnio: optimize LLM programs with textual gradients, the PyTorch way.

A prompt is a :class:`~afnio.cognitive.Parameter`; running your program builds a graph;
an evaluator explains what went wrong; ``explanation.backward()`` asks a model how every input
should change; ``optimizer.step()`` rewrites the prompts.

Example:
    >>> import afnio
    >>> x = afnio.Variable("Summarize the ticket.", role="system prompt", requires_grad=True)
    >>> y = x + " Be brief."
    >>> y.backward(afnio.Variable("mention the deadline"))
    >>> x.grad[0].data
    'mention the deadline'
"""

from afnio import autodiff, cognitive, models, optim, utils
from afnio._settings import Settings, get_settings, set_settings, settings
from afnio._variable import Variable
from afnio.autodiff.grad_mode import (
    enable_grad,
    inference_mode,
    is_grad_enabled,
    no_grad,
    set_grad_enabled,
)
from afnio.cognitive import Parameter
from afnio.models import get_client, get_usage, reset_usage, track_usage
from afnio.models.registry import (
    get_backward_model_client,
    get_backward_model_completion_args,
    set_backward_model_client,
)
from afnio.serialization import load, save

__version__ = "0.1.0"

__all__ = [
    "Parameter",
    "Settings",
    "Variable",
    "autodiff",
    "cognitive",
    "enable_grad",
    "get_backward_model_client",
    "get_backward_model_completion_args",
    "get_client",
    "get_settings",
    "get_usage",
    "inference_mode",
    "is_grad_enabled",
    "load",
    "models",
    "no_grad",
    "optim",
    "reset_usage",
    "save",
    "set_backward_model_client",
    "set_grad_enabled",
    "set_settings",
    "settings",
    "track_usage",
    "utils",
]

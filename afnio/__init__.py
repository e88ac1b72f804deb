"""afnio: optimize LLM programs with textual gradients, the PyTorch way.

Example:
    >>> import afnio
    >>> x = afnio.Variable("Summarize the ticket.", role="system prompt", requires_grad=True)
    >>> y = x + " Be brief."
    >>> y.backward(afnio.Variable("mention the deadline"))
    >>> x.grad[0].data
    'mention the deadline'
"""

from afnio._variable import Variable
from afnio.autodiff.grad_mode import (
    enable_grad,
    inference_mode,
    is_grad_enabled,
    no_grad,
    set_grad_enabled,
)

__version__ = "0.1.0"

__all__ = [
    "Variable",
    "enable_grad",
    "inference_mode",
    "is_grad_enabled",
    "no_grad",
    "set_grad_enabled",
]

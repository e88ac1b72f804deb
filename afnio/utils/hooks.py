"""Hook handles, as ``torch.utils.hooks``: what every ``register_*hook`` returns.

Example:
    >>> import afnio
    >>> from afnio.utils.hooks import RemovableHandle
    >>> x = afnio.Variable("hi", requires_grad=True)
    >>> isinstance(x.register_hook(lambda grad: None), RemovableHandle)
    True
"""

from afnio._hooks import RemovableHandle

__all__ = ["RemovableHandle"]

"""Handles for registered hooks, shaped like ``torch.utils.hooks.RemovableHandle``.

Every ``register_*hook`` method of afnio (on Variables, Modules and the module-wide hooks)
returns a :class:`RemovableHandle`. ``handle.remove()`` unregisters the hook; the handle is also
a context manager that removes the hook when the block ends.

Example:
    >>> from collections import OrderedDict
    >>> hooks = OrderedDict()
    >>> handle = RemovableHandle(hooks)
    >>> hooks[handle.id] = print
    >>> with handle:
    ...     len(hooks)
    1
    >>> len(hooks)
    0
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from typing import Any

__all__ = ["RemovableHandle", "add_hook", "check_callable"]

_ids = itertools.count()


class RemovableHandle:
    """Removes one hook from the registry it was added to.

    The handle keeps only a weak reference to the registry, so it never keeps a Variable, a
    Module or a graph alive. Removing twice, or after the registry is gone, does nothing.

    Args:
        hooks_dict: The ordered mapping the hook is stored in under :attr:`id`.

    Attributes:
        id: The key of the hook in its registry; unique across the process.

    Example:
        >>> from collections import OrderedDict
        >>> hooks = OrderedDict()
        >>> handle = RemovableHandle(hooks)
        >>> hooks[handle.id] = len
        >>> handle.remove()
        >>> dict(hooks)
        {}
    """

    def __init__(self, hooks_dict: OrderedDict) -> None:
        self.id: int = next(_ids)
        self._registry = weakref.ref(hooks_dict)

    def remove(self) -> None:
        """Unregister the hook (a no-op when it is already gone)."""
        registry = self._registry()
        if registry is not None:
            registry.pop(self.id, None)

    def __enter__(self) -> RemovableHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"<RemovableHandle id={self.id}>"


def add_hook(hooks: OrderedDict, hook: Any, prepend: bool = False) -> RemovableHandle:
    """Store ``hook`` in ``hooks`` under a new handle's id and return the handle.

    Args:
        hooks: The ordered registry (hooks run in its order).
        hook: What to store (a callable, or a record describing one).
        prepend: Put the hook first instead of last.

    Example:
        >>> from collections import OrderedDict
        >>> hooks = OrderedDict()
        >>> _ = add_hook(hooks, "second"); _ = add_hook(hooks, "first", prepend=True)
        >>> list(hooks.values())
        ['first', 'second']
    """
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    if prepend:
        hooks.move_to_end(handle.id, last=False)
    return handle


def check_callable(hook: Any, where: str) -> None:
    """Raise ``TypeError`` naming ``where`` unless ``hook`` is callable.

    Example:
        >>> check_callable(print, "register_hook")
    """
    if not callable(hook):
        raise TypeError(f"{where}: the hook must be callable, got {type(hook).__name__}")


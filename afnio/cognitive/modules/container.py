"""Containers of modules: :class:`Sequential`, :class:`ModuleList` and :class:`ModuleDict`.

They index, slice and name their entries as ``torch.nn`` does: list entries are registered
under ``"0"``, ``"1"``, … and renumbered after a deletion.

Example:
    >>> from afnio.cognitive import ModuleList, Module
    >>> layers = ModuleList([Module(), Module()])
    >>> [name for name, _ in layers.named_children()]
    ['0', '1']
    >>> type(layers[:1]).__name__, len(layers[:1])
    ('ModuleList', 1)
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from afnio.cognitive.modules.module import Module

__all__ = ["ModuleDict", "ModuleList", "Sequential"]


def _check_module(container: str, module: Any) -> Module:
    if not isinstance(module, Module):
        raise TypeError(f"{container}: {type(module).__name__} is not a Module subclass")
    return module


def _absolute_index(container: Module, index: Any) -> int:
    index = operator.index(index)
    size = len(container._modules)
    if not -size <= index < size:
        raise IndexError(f"index {index} is out of range")
    return index + size if index < 0 else index


def _insert(container: Module, index: int, module: Module) -> None:
    """Put ``module`` at position ``index`` (``0 <= index <= len``) of a numbered container,
    shifting the entries after it up by one."""
    for i in range(len(container._modules), index, -1):
        container._modules[str(i)] = container._modules[str(i - 1)]
    container._modules[str(index)] = module


def _renumber(container: Module) -> None:
    modules = list(container._modules.values())
    container._modules.clear()
    container._modules.update((str(i), module) for i, module in enumerate(modules))


class Sequential(Module):
    """Modules run one after the other: each one's output is the next one's input.

    Args:
        *args: Modules (named ``"0"``, ``"1"``, …), or a single ``OrderedDict`` of name to
            module.

    Example:
        >>> from afnio.cognitive import Sequential, Module
        >>> class Exclaim(Module):
        ...     def forward(self, text):
        ...         return text + "!"
        >>> Sequential(Exclaim(), Exclaim())("hi")
        'hi!!'
    """

    def __init__(self, *args: Any) -> None:
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for name, module in args[0].items():
                self.add_module(name, _check_module("Sequential", module))
        else:
            for index, module in enumerate(args):
                self.add_module(str(index), _check_module("Sequential", module))

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return type(self)(OrderedDict(list(self._modules.items())[index]))
        return list(self._modules.values())[_absolute_index(self, index)]

    def __setitem__(self, index: int, module: Module) -> None:
        key = list(self._modules)[_absolute_index(self, index)]
        setattr(self, key, _check_module("Sequential", module))

    def __delitem__(self, index: int | slice) -> None:
        keys = list(self._modules)
        if isinstance(index, slice):
            for key in keys[index]:
                delattr(self, key)
        else:
            delattr(self, keys[_absolute_index(self, index)])
        _renumber(self)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __add__(self, other: Sequential) -> Sequential:
        if not isinstance(other, Sequential):
            raise ValueError(
                "add operator supports only objects of Sequential class, but "
                f"{type(other).__name__} is given."
            )
        return Sequential(*self, *other)

    def append(self, module: Module) -> Sequential:
        """Add ``module`` at the end; return ``self``."""
        self.add_module(str(len(self)), _check_module("Sequential.append", module))
        return self

    def extend(self, modules: Iterable[Module]) -> Sequential:
        """Append every module of ``modules``; return ``self``."""
        for module in modules:
            self.append(module)
        return self

    def insert(self, index: int, module: Module) -> Sequential:
        """Insert ``module`` before position ``index``; return ``self``.

        Raises:
            IndexError: If ``index`` is outside ``[-len, len]``.
        """
        _check_module("Sequential.insert", module)
        size = len(self._modules)
        if not -size <= index <= size:
            raise IndexError(f"Index out of range: {index}")
        _insert(self, index + size if index < 0 else index, module)
        return self

    def pop(self, index: int | slice) -> Any:
        """Remove and return the module(s) at ``index``."""
        value = self[index]
        del self[index]
        return value

    def forward(self, input: Any) -> Any:  # noqa: A002 - torch's argument name
        for module in self:
            input = module(input)
        return input


class ModuleList(Module):
    """A list of modules, registered as ``"0"``, ``"1"``, ….

    Args:
        modules: Initial modules.
    """

    def __init__(self, modules: Iterable[Module] | None = None) -> None:
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _string_index(self, index: Any) -> str:
        return str(_absolute_index(self, index))

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return type(self)(list(self._modules.values())[index])
        return self._modules[self._string_index(index)]

    def __setitem__(self, index: int, module: Module) -> None:
        setattr(self, self._string_index(index), _check_module("ModuleList", module))

    def __delitem__(self, index: int | slice) -> None:
        if isinstance(index, slice):
            for position in range(len(self._modules))[index]:
                delattr(self, str(position))
        else:
            delattr(self, self._string_index(index))
        _renumber(self)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __iadd__(self, modules: Iterable[Module]) -> ModuleList:
        return self.extend(modules)

    def __add__(self, other: Iterable[Module]) -> ModuleList:
        return ModuleList([*self, *other])

    def append(self, module: Module) -> ModuleList:
        """Add ``module`` at the end; return ``self``."""
        self.add_module(str(len(self)), _check_module("ModuleList.append", module))
        return self

    def extend(self, modules: Iterable[Module]) -> ModuleList:
        """Append every module of ``modules``; return ``self``.

        Raises:
            TypeError: If ``modules`` is not iterable or holds a non-Module.
        """
        if not isinstance(modules, Iterable):
            raise TypeError(
                "ModuleList.extend should be called with an iterable, but got "
                + type(modules).__name__
            )
        offset = len(self)
        for i, module in enumerate(list(modules)):
            self.add_module(str(offset + i), _check_module("ModuleList.extend", module))
        return self

    def insert(self, index: int, module: Module) -> None:
        """Insert ``module`` before position ``index``."""
        _check_module("ModuleList.insert", module)
        size = len(self._modules)
        _insert(self, max(0, index + size) if index < 0 else min(index, size), module)

    def pop(self, index: int | slice) -> Any:
        """Remove and return the module(s) at ``index``."""
        value = self[index]
        del self[index]
        return value

    def __dir__(self) -> list[str]:
        return [key for key in super().__dir__() if not key.isdigit()]


class ModuleDict(Module):
    """An ordered dict of modules, registered under their keys.

    Args:
        modules: A mapping or an iterable of ``(name, module)`` pairs.
    """

    def __init__(
        self, modules: Mapping[str, Module] | Iterable[tuple[str, Module]] | None = None
    ) -> None:
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        self.add_module(key, module)

    def __delitem__(self, key: str) -> None:
        del self._modules[key]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __contains__(self, key: object) -> bool:
        return key in self._modules

    def clear(self) -> None:
        """Remove every module."""
        self._modules.clear()

    def pop(self, key: str) -> Module:
        """Remove the module under ``key`` and return it."""
        value = self[key]
        del self[key]
        return value

    def keys(self) -> Iterable[str]:
        """The keys, in insertion order."""
        return self._modules.keys()

    def items(self) -> Iterable[tuple[str, Module]]:
        """The ``(key, module)`` pairs, in insertion order."""
        return self._modules.items()

    def values(self) -> Iterable[Module]:
        """The modules, in insertion order."""
        return self._modules.values()

    def update(self, modules: Mapping[str, Module] | Iterable[tuple[str, Module]]) -> None:
        """Add or replace modules from a mapping or from ``(key, module)`` pairs.

        Raises:
            TypeError: If ``modules`` is neither, or a pair is malformed.
            ValueError: If a pair does not have two elements.
        """
        if isinstance(modules, (Mapping, ModuleDict)):
            for key, module in modules.items():
                self[key] = module
            return
        if not isinstance(modules, Iterable):
            raise TypeError(
                "ModuleDict.update should be called with an iterable of key/value pairs, but got "
                + type(modules).__name__
            )
        for index, pair in enumerate(modules):
            if not isinstance(pair, Iterable) or isinstance(pair, str):
                raise TypeError(
                    f"ModuleDict update sequence element #{index} should be Iterable; is "
                    + type(pair).__name__
                )
            pair = list(pair)
            if len(pair) != 2:
                raise ValueError(
                    f"ModuleDict update sequence element #{index} has length {len(pair)}; 2 is "
                    "required"
                )
            self[pair[0]] = pair[1]

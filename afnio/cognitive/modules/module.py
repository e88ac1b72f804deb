"""Module: the base class of every afnio program, shaped like ``torch.nn.Module``.

Attributes assigned on a Module are registered by type: a :class:`Parameter` becomes a parameter,
a Module a sub-module, a :class:`~afnio.models.model.ChatCompletionModel` a model client, and a
list of chat messages whose contents are Variables a chat. Buffers, completion configs and
functions are registered explicitly. Registered state is what ``parameters()``,
``state_dict()`` and ``load_state_dict()`` see.

State-dict keys follow torch: ``"<submodule path>.<attribute name>"``. Model clients are stored
under their attribute name as ``{"class": ..., "config": ...}`` (never an API key); loading keeps
the module's live clients unless asked to rebuild them (``load_clients=True``); completion
configs are stored as a copy of their dict; chats as their messages with detached Variables.
Functions are code, so they are not part of the state dict.

Example:
    >>> import afnio
    >>> from afnio.cognitive import Module, Parameter
    >>> class Greeter(Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.greeting = Parameter("Hello", role="greeting")
    ...     def forward(self, name):
    ...         return self.greeting + name
    >>> greeter = Greeter()
    >>> greeter(afnio.Variable(" Ann", role="name")).data
    'Hello Ann'
    >>> list(greeter.state_dict())
    ['greeting']
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

from afnio._hooks import RemovableHandle, add_hook, check_callable
from afnio._variable import Variable
from afnio.autodiff.function import flatten_variables
from afnio.cognitive.parameter import Parameter
from afnio.models.model import ChatCompletionModel, client_from_config, client_to_config

__all__ = [
    "IncompatibleKeys",
    "Module",
    "is_chat",
    "register_module_forward_hook",
    "register_module_forward_pre_hook",
]

T = TypeVar("T", bound="Module")

_EXTRA_STATE_KEY_SUFFIX = "_extra_state"

_REGISTRIES = (
    "_parameters",
    "_buffers",
    "_modules",
    "_chats",
    "_models",
    "_completion_configs",
    "_functions",
)


class _ForwardHook(NamedTuple):
    """A registered forward (pre-)hook and how to call it."""

    fn: Callable[..., Any]
    with_kwargs: bool = False
    always_call: bool = False


# Hooks of every Module call (torch: ``torch.nn.modules.module.register_module_forward_*``).
_global_forward_pre_hooks: OrderedDict[int, _ForwardHook] = OrderedDict()
_global_forward_hooks: OrderedDict[int, _ForwardHook] = OrderedDict()


def register_module_forward_pre_hook(hook: Callable[..., Any]) -> RemovableHandle:
    """Register ``hook(module, args) -> None | new args`` before the call of *every* Module.

    Global hooks run before each module's own pre-hooks and behave like
    :meth:`Module.register_forward_pre_hook`. They suit tracing and logging across a whole
    program (every LLM op, evaluator and component call), as torch's debugging hooks do.

    Returns:
        A handle whose ``remove()`` unregisters the hook (also a context manager).

    Raises:
        TypeError: If ``hook`` is not callable.

    Example:
        >>> from afnio.cognitive import Module
        >>> class Echo(Module):
        ...     def forward(self, text):
        ...         return text
        >>> calls = []
        >>> with register_module_forward_pre_hook(lambda m, args: calls.append(type(m).__name__)):
        ...     _ = Echo()("hi")
        >>> calls
        ['Echo']
    """
    check_callable(hook, "register_module_forward_pre_hook")
    return add_hook(_global_forward_pre_hooks, _ForwardHook(hook))


def register_module_forward_hook(
    hook: Callable[..., Any], *, with_kwargs: bool = False, always_call: bool = False
) -> RemovableHandle:
    """Register ``hook(module, args, output) -> None | new output`` after the call of *every*
    Module.

    Global hooks run before each module's own forward hooks and behave like
    :meth:`Module.register_forward_hook`.

    Args:
        hook: The hook (``hook(module, args, kwargs, output)`` with ``with_kwargs=True``).
        with_kwargs: Also pass the call's keyword arguments.
        always_call: Also run when the call raises (its output is then ``None``).

    Returns:
        A handle whose ``remove()`` unregisters the hook (also a context manager).

    Raises:
        TypeError: If ``hook`` is not callable.

    Example:
        >>> from afnio.cognitive import Module
        >>> class Echo(Module):
        ...     def forward(self, text):
        ...         return text
        >>> with register_module_forward_hook(lambda m, args, out: out + "!"):
        ...     Echo()("hi")
        'hi!'
    """
    check_callable(hook, "register_module_forward_hook")
    return add_hook(_global_forward_hooks, _ForwardHook(hook, with_kwargs, always_call))


def _hook_name(hook: _ForwardHook) -> str:
    return getattr(hook.fn, "__qualname__", type(hook.fn).__name__)


class IncompatibleKeys(NamedTuple):
    """What :meth:`Module.load_state_dict` returns: keys it could not match."""

    missing_keys: list[str]
    unexpected_keys: list[str]

    def __repr__(self) -> str:
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return (
            f"IncompatibleKeys(missing_keys={self.missing_keys}, "
            f"unexpected_keys={self.unexpected_keys})"
        )

    __str__ = __repr__


def is_chat(value: Any) -> bool:
    """Whether ``value`` looks like chat messages: a non-empty list of ``{"role", "content"}``
    dicts whose contents are Variables (a Variable or a list of Variables).

    Example:
        >>> is_chat([{"role": "system", "content": [Variable("Be brief.")]}])
        True
        >>> is_chat([{"role": "system", "content": "Be brief."}])
        False
    """
    if not isinstance(value, list) or not value:
        return False
    for message in value:
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            return False
        if not isinstance(message["role"], str):
            return False
        content = message["content"]
        if isinstance(content, Variable):
            continue
        if not isinstance(content, list) or not all(isinstance(v, Variable) for v in content):
            return False
    return True


def _addindent(text: str, spaces: int) -> str:
    lines = text.split("\n")
    if len(lines) == 1:
        return text
    return lines[0] + "\n" + "\n".join(" " * spaces + line for line in lines[1:])


def _detach_chat(messages: list[dict[str, Any]], keep_vars: bool) -> list[dict[str, Any]]:
    def convert(content: Any) -> Any:
        if isinstance(content, Variable):
            return content if keep_vars else content.detach()
        return [v if keep_vars else v.detach() for v in content]

    return [{"role": m["role"], "content": convert(m["content"])} for m in messages]


def _saved_form(kind: str, value: Any, keep_vars: bool) -> Any:
    """How a registered value of ``kind`` (see ``Module._local_state``) goes into a state dict."""
    if kind in ("parameter", "buffer"):
        return value if keep_vars else value.detach()
    if kind == "chat":
        return _detach_chat(value, keep_vars)
    if kind == "model":
        return client_to_config(value)
    return copy.deepcopy(value)


def _shape_name(variable: Variable) -> str:
    return "a scalar" if variable.batch_size is None else "a batch"


class Module:
    """Base class of afnio programs and their building blocks.

    Subclass it, call ``super().__init__()`` first, assign Parameters, sub-modules and model
    clients as attributes, and write :meth:`forward`. Calling the module runs ``forward``.
    Modules start in training mode.

    Attributes:
        training: Whether the module is in training mode (see :meth:`train` / :meth:`eval`).
        automatic_optimization: Read by the Trainer: when True it runs ``zero_grad``,
            ``backward`` and ``step`` itself around ``training_step``.

    Example:
        >>> from afnio.cognitive import Module, Parameter
        >>> class Agent(Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.prompt = Parameter("Answer briefly.", role="system prompt")
        >>> [name for name, _ in Agent().named_parameters()]
        ['prompt']
    """

    training: bool
    automatic_optimization: bool = True

    def __init__(self) -> None:
        object.__setattr__(self, "training", True)
        for registry in _REGISTRIES:
            object.__setattr__(self, registry, OrderedDict())
        object.__setattr__(self, "_non_persistent_buffers_set", set())
        object.__setattr__(self, "_forward_pre_hooks", OrderedDict())
        object.__setattr__(self, "_forward_hooks", OrderedDict())

    # ------------------------------------------------------------------ calling
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The computation of the module. Every subclass that is called must override it.

        Raises:
            RuntimeError: When the subclass does not define ``forward``.
        """
        raise RuntimeError(
            f'Module [{type(self).__name__}] is missing the required "forward" function'
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call_with_hooks(self.forward, args, kwargs)

    def _call_with_hooks(self, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run ``call(*args, **kwargs)`` between the forward pre-hooks and forward hooks.

        Every Module subclass's ``__call__`` goes through here (``GradComponent`` passes its
        own training/eval dispatch as ``call``), so hooks see every call, as in torch.
        """
        state = self.__dict__
        if not (
            state["_forward_pre_hooks"]
            or state["_forward_hooks"]
            or _global_forward_pre_hooks
            or _global_forward_hooks
        ):
            return call(*args, **kwargs)
        forward_hooks = [*_global_forward_hooks.items(), *state["_forward_hooks"].items()]
        called: set[int] = set()
        output = None
        try:
            args, kwargs = self._run_forward_pre_hooks(args, kwargs)
            output = call(*args, **kwargs)
            for hook_id, hook in forward_hooks:
                called.add(hook_id)
                output = self._run_forward_hook(hook, args, kwargs, output)
            return output
        except Exception:
            # As in torch: hooks registered with always_call=True still see the failed call.
            # Their own errors are reported as warnings, and the original error propagates.
            for hook_id, hook in forward_hooks:
                if not hook.always_call or hook_id in called:
                    continue
                try:
                    output = self._run_forward_hook(hook, args, kwargs, output)
                except Exception as exc:  # reported as a warning; the first error is raised
                    warnings.warn(
                        f"forward hook {_hook_name(hook)} of {type(self).__name__} (registered "
                        f"with always_call=True) raised {type(exc).__name__}: {exc}; it ran "
                        "because the call had already failed, and that first error is the one "
                        "raised",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            raise

    def _run_forward_pre_hooks(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hooks = [*_global_forward_pre_hooks.values(), *self._forward_pre_hooks.values()]
        for hook in hooks:
            if hook.with_kwargs:
                result = hook.fn(self, args, kwargs)
                if result is None:
                    continue
                if not (
                    isinstance(result, tuple)
                    and len(result) == 2
                    and isinstance(result[0], (tuple, list))
                    and isinstance(result[1], dict)
                ):
                    raise RuntimeError(
                        f"forward pre-hook {_hook_name(hook)} of {type(self).__name__} "
                        "(with_kwargs=True) must return None or a tuple (new_args, new_kwargs), "
                        f"got {result!r:.100}"
                    )
                args, kwargs = tuple(result[0]), result[1]
            else:
                result = hook.fn(self, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        return args, kwargs

    def _run_forward_hook(self, hook: _ForwardHook, args: tuple, kwargs: dict, output: Any) -> Any:
        if hook.with_kwargs:
            result = hook.fn(self, args, kwargs, output)
        else:
            result = hook.fn(self, args, output)
        return output if result is None else result

    def register_forward_pre_hook(
        self,
        hook: Callable[..., Any],
        *,
        prepend: bool = False,
        with_kwargs: bool = False,
    ) -> RemovableHandle:
        """Register a hook that runs before every call of this module, as in torch.

        The hook is ``hook(module, args) -> None | new args`` (a non-tuple result becomes a
        one-element tuple), or with ``with_kwargs=True``
        ``hook(module, args, kwargs) -> None | (new_args, new_kwargs)``. Hooks run in
        registration order, after the global ones (:func:`register_module_forward_pre_hook`);
        each sees what the previous one returned. ``args`` are the positional arguments as
        given to ``__call__`` (Variables, not their data).

        Args:
            hook: The hook.
            prepend: Run this hook before the module's already registered pre-hooks.
            with_kwargs: Pass (and allow replacing) the keyword arguments too.

        Returns:
            A handle whose ``remove()`` unregisters the hook (also a context manager).

        Raises:
            TypeError: If ``hook`` is not callable.

        Example:
            >>> import afnio
            >>> class Echo(Module):
            ...     def forward(self, text):
            ...         return text
            >>> echo = Echo()
            >>> _ = echo.register_forward_pre_hook(lambda module, args: args[0] + " please")
            >>> echo(afnio.Variable("answer", role="request")).data
            'answer please'
        """
        check_callable(hook, f"{type(self).__name__}.register_forward_pre_hook")
        return add_hook(self._forward_pre_hooks, _ForwardHook(hook, with_kwargs), prepend)

    def register_forward_hook(
        self,
        hook: Callable[..., Any],
        *,
        prepend: bool = False,
        with_kwargs: bool = False,
        always_call: bool = False,
    ) -> RemovableHandle:
        """Register a hook that runs after every call of this module, as in torch.

        The hook is ``hook(module, args, output) -> None | new output``, or with
        ``with_kwargs=True`` ``hook(module, args, kwargs, output)``; ``args``/``kwargs`` are
        those the call ran with (after the pre-hooks). Returning a value replaces the output
        for later hooks and the caller. Hooks run in registration order, after the global ones
        (:func:`register_module_forward_hook`). A GradComponent in eval mode returns plain
        values, so its hooks see those.

        Args:
            hook: The hook.
            prepend: Run this hook before the module's already registered forward hooks.
            with_kwargs: Pass the keyword arguments too.
            always_call: Also run when the call (or a hook before it) raises; ``output`` is
                then what had been computed so far (``None`` when ``forward`` failed). An error
                in such a hook becomes a ``RuntimeWarning``; the original error propagates.

        Returns:
            A handle whose ``remove()`` unregisters the hook (also a context manager).

        Raises:
            TypeError: If ``hook`` is not callable.

        Example:
            >>> class Echo(Module):
            ...     def forward(self, text):
            ...         return text
            >>> echo = Echo()
            >>> with echo.register_forward_hook(lambda module, args, out: out.upper()):
            ...     echo("hi")
            'HI'
            >>> echo("hi")
            'hi'
        """
        check_callable(hook, f"{type(self).__name__}.register_forward_hook")
        record = _ForwardHook(hook, with_kwargs, always_call)
        return add_hook(self._forward_hooks, record, prepend)

    # ------------------------------------------------------------------ registration
    def _check_name(self, kind: str, registry: str, name: Any) -> None:
        if registry not in self.__dict__:
            raise AttributeError(f"cannot assign {kind} before Module.__init__() call")
        if not isinstance(name, str):
            raise TypeError(f"{kind} name should be a string. Got {type(name).__name__}")
        if "." in name:
            raise KeyError(f'{kind} name can\'t contain ".", got: {name}')
        if name == "":
            raise KeyError(f'{kind} name can\'t be empty string ""')
        if hasattr(self, name) and name not in self.__dict__[registry]:
            raise KeyError(f"attribute '{name}' already exists")

    def _remove_everywhere_but(self, name: str, keep: str) -> None:
        if keep != "__dict__":
            self.__dict__.pop(name, None)
        for registry in _REGISTRIES:
            if registry != keep:
                self.__dict__[registry].pop(name, None)
        if keep != "_buffers":
            self._non_persistent_buffers_set.discard(name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Add a parameter, reachable as ``self.<name>``.

        Args:
            name: The attribute name.
            param: The Parameter, or ``None`` (kept as a slot, skipped by ``parameters()`` and
                ``state_dict()``).

        Raises:
            TypeError: If ``param`` is not a Parameter or None.
            ValueError: If ``param`` is not a leaf.
            KeyError: For an invalid name or a name already used by a plain attribute.
        """
        self._check_name("parameter", "_parameters", name)
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(
                f"cannot assign '{type(param).__name__}' object to parameter '{name}' "
                "(afnio.cognitive.Parameter or None required)"
            )
        if param is not None and param.grad_fn is not None:
            raise ValueError(
                f"Cannot assign non-leaf Variable to parameter '{name}'. Model parameters must be "
                f"created explicitly. To express '{name}' as a function of another Variable, "
                "compute the value in the forward() method."
            )
        self._parameters[name] = param

    def register_buffer(
        self, name: str, variable: Variable | None, persistent: bool = True
    ) -> None:
        """Add a buffer: module state that is not a trainable parameter.

        Args:
            name: The attribute name.
            variable: The Variable, or ``None``.
            persistent: Whether the buffer is part of ``state_dict()``.

        Raises:
            TypeError: If ``variable`` is not a Variable or None.
            KeyError: For an invalid name or a name already used by another attribute.
        """
        self._check_name("buffer", "_buffers", name)
        if variable is not None and not isinstance(variable, Variable):
            raise TypeError(
                f"cannot assign '{type(variable).__name__}' object to buffer '{name}' "
                "(afnio.Variable or None required)"
            )
        self._buffers[name] = variable
        if persistent:
            self._non_persistent_buffers_set.discard(name)
        else:
            self._non_persistent_buffers_set.add(name)

    def register_module(self, name: str, module: Module | None) -> None:
        """Add a sub-module, reachable as ``self.<name>``.

        Raises:
            TypeError: If ``module`` is not a Module or None.
            KeyError: For an invalid name or a name already used by another attribute.
        """
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        self._check_name("module", "_modules", name)
        self._modules[name] = module

    add_module = register_module

    def register_chat(self, name: str, messages: list[dict[str, Any]] | None) -> None:
        """Add chat messages (``[{"role": str, "content": [Variable, ...]}, ...]``).

        Their Variables are saved in ``state_dict()`` under ``name``.

        Raises:
            TypeError: If ``messages`` is not chat messages or None.
        """
        self._check_name("chat", "_chats", name)
        if messages is not None and not is_chat(messages):
            raise TypeError(
                f"cannot assign '{type(messages).__name__}' object to chat '{name}' (a list of "
                '{"role": str, "content": [Variable, ...]} dicts or None required)'
            )
        self._chats[name] = messages

    def register_model(self, name: str, model: ChatCompletionModel | None) -> None:
        """Add a model client. Assigning a ChatCompletionModel attribute does the same.

        The client is saved in ``state_dict()`` under ``name`` as its class and configuration
        (never its API key). ``load_state_dict()`` keeps the live client, or rebuilds it from a
        differing saved configuration when called with ``load_clients=True``.

        Raises:
            TypeError: If ``model`` is not a ChatCompletionModel or None.
        """
        self._check_name("model", "_models", name)
        if model is not None and not isinstance(model, ChatCompletionModel):
            raise TypeError(
                f"cannot assign '{type(model).__name__}' object to model '{name}' "
                "(afnio.models.ChatCompletionModel or None required)"
            )
        self._models[name] = model

    def register_completion_config(self, name: str, config: dict[str, Any] | None) -> None:
        """Add completion arguments (e.g. ``{"temperature": 0}``), saved in ``state_dict()``.

        Raises:
            TypeError: If ``config`` is not a dict or None.
        """
        self._check_name("completion config", "_completion_configs", name)
        if config is not None and not isinstance(config, dict):
            raise TypeError(
                f"cannot assign '{type(config).__name__}' object to completion config '{name}' "
                "(dict or None required)"
            )
        self._completion_configs[name] = config

    def register_function(self, name: str, function: Callable | None) -> None:
        """Add a function (e.g. an evaluator's ``eval_fn``). Functions are not saved in state
        dicts.

        Raises:
            TypeError: If ``function`` is not callable or None.
        """
        self._check_name("function", "_functions", name)
        if function is not None and not callable(function):
            raise TypeError(
                f"cannot assign '{type(function).__name__}' object to function '{name}' "
                "(a callable or None required)"
            )
        self._functions[name] = function

    # ------------------------------------------------------------------ attribute protocol
    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails; registries live in __dict__.
        state = self.__dict__
        for registry in _REGISTRIES:
            if registry in state and name in state[registry]:
                return state[registry][name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        state = self.__dict__
        if "_parameters" not in state:
            kinds = ((Parameter, "parameters"), (Module, "module"), (ChatCompletionModel, "model"))
            for cls, kind in kinds:
                if isinstance(value, cls):
                    raise AttributeError(f"cannot assign {kind} before Module.__init__() call")
            object.__setattr__(self, name, value)
            return
        if isinstance(value, Parameter):
            self._remove_everywhere_but(name, "_parameters")
            self.register_parameter(name, value)
        elif name in self._parameters:
            if value is not None:
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as parameter '{name}' "
                    "(afnio.cognitive.Parameter or None expected)"
                )
            self.register_parameter(name, value)
        elif isinstance(value, Module):
            self._remove_everywhere_but(name, "_modules")
            self._modules[name] = value
        elif name in self._modules:
            if value is not None:
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as child module '{name}' "
                    "(afnio.cognitive.Module or None expected)"
                )
            self._modules[name] = value
        elif name in self._buffers:
            if value is not None and not isinstance(value, Variable):
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as buffer '{name}' "
                    "(afnio.Variable or None expected)"
                )
            self._buffers[name] = value
        elif isinstance(value, ChatCompletionModel):
            self._remove_everywhere_but(name, "_models")
            self._models[name] = value
        elif name in self._models:
            self.register_model(name, value)
        elif name in self._chats:
            self.register_chat(name, value)
        elif name in self._completion_configs:
            self.register_completion_config(name, value)
        elif name in self._functions:
            self.register_function(name, value)
        elif is_chat(value):
            self._remove_everywhere_but(name, "_chats")
            self._chats[name] = value
        else:
            object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for registry in _REGISTRIES:
            items = self.__dict__[registry]
            if name in items:
                del items[name]
                self._non_persistent_buffers_set.discard(name)
                return
        object.__delattr__(self, name)

    def __dir__(self) -> list[str]:
        keys = list(dir(type(self))) + list(self.__dict__)
        for registry in _REGISTRIES:
            keys.extend(self.__dict__[registry])
        return sorted(key for key in set(keys) if not key[0].isdigit())

    # ------------------------------------------------------------------ iteration
    def named_modules(
        self, memo: set[Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Module]]:
        """Yield ``(name, module)`` for this module and every descendant, depth first.

        Args:
            memo: Modules already yielded (used by the recursion).
            prefix: Prepended to every name.
            remove_duplicate: Yield a module reachable through several paths only once.
        """
        if memo is None:
            memo = set()
        if self in memo:
            return
        if remove_duplicate:
            memo.add(self)
        yield prefix, self
        for name, module in self._modules.items():
            if module is None:
                continue
            child_prefix = prefix + ("." if prefix else "") + name
            yield from module.named_modules(memo, child_prefix, remove_duplicate)

    def modules(self) -> Iterator[Module]:
        """Yield this module and every descendant once, depth first."""
        for _, module in self.named_modules():
            yield module

    def named_children(self) -> Iterator[tuple[str, Module]]:
        """Yield ``(name, module)`` for each direct sub-module (each module once)."""
        seen: set[Module] = set()
        for name, module in self._modules.items():
            if module is not None and module not in seen:
                seen.add(module)
                yield name, module

    def children(self) -> Iterator[Module]:
        """Yield each direct sub-module once."""
        for _, module in self.named_children():
            yield module

    def _named_members(
        self,
        members: Callable[[Module], Any],
        prefix: str,
        recurse: bool,
        remove_duplicate: bool,
    ) -> Iterator[tuple[str, Any]]:
        seen: set[int] = set()
        modules = (
            self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
            if recurse
            else [(prefix, self)]
        )
        for module_prefix, module in modules:
            for name, value in members(module):
                if value is None or id(value) in seen:
                    continue
                if remove_duplicate:
                    seen.add(id(value))
                yield module_prefix + ("." if module_prefix else "") + name, value

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Parameter]]:
        """Yield ``(name, parameter)`` pairs in registration order, sub-modules depth first.

        Args:
            prefix: Prepended to every name.
            recurse: Include the parameters of sub-modules.
            remove_duplicate: Yield a shared parameter only once (under its first name).
        """
        return self._named_members(
            lambda module: module._parameters.items(), prefix, recurse, remove_duplicate
        )

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        """Yield every parameter once (what an optimizer receives)."""
        for _, param in self.named_parameters(recurse=recurse):
            yield param

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Variable]]:
        """Yield ``(name, buffer)`` pairs, like :meth:`named_parameters`."""
        return self._named_members(
            lambda module: module._buffers.items(), prefix, recurse, remove_duplicate
        )

    def buffers(self, recurse: bool = True) -> Iterator[Variable]:
        """Yield every buffer once."""
        for _, buffer in self.named_buffers(recurse=recurse):
            yield buffer

    def named_models(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, ChatCompletionModel]]:
        """Yield ``(name, model_client)`` pairs, like :meth:`named_parameters`."""
        return self._named_members(
            lambda module: module._models.items(), prefix, recurse, remove_duplicate
        )

    def named_chats(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """Yield ``(name, messages)`` pairs, like :meth:`named_parameters`."""
        return self._named_members(
            lambda module: module._chats.items(), prefix, recurse, remove_duplicate
        )

    def get_submodule(self, target: str) -> Module:
        """Return the sub-module at the dotted path ``target`` (``""`` is ``self``).

        Raises:
            AttributeError: If a step of the path is missing or not a Module.
        """
        module: Module = self
        if target == "":
            return module
        for item in target.split("."):
            if not hasattr(module, item):
                raise AttributeError(f"{module._get_name()} has no attribute `{item}`")
            module = getattr(module, item)
            if not isinstance(module, Module):
                raise AttributeError(f"`{item}` is not an afnio.cognitive.Module")
        return module

    def get_parameter(self, target: str) -> Parameter:
        """Return the parameter at the dotted path ``target`` (e.g. ``"agent.system_prompt"``).

        Raises:
            AttributeError: If the path is missing or does not name a Parameter.
        """
        module_path, _, name = target.rpartition(".")
        module = self.get_submodule(module_path)
        if not hasattr(module, name):
            raise AttributeError(f"{module._get_name()} has no attribute `{name}`")
        param = getattr(module, name)
        if not isinstance(param, Parameter):
            raise AttributeError(f"`{name}` is not an afnio.cognitive.Parameter")
        return param

    # ------------------------------------------------------------------ modes and grads
    def train(self: T, mode: bool = True) -> T:
        """Set training mode on this module and every descendant; return ``self``.

        Raises:
            ValueError: If ``mode`` is not a bool.
        """
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for module in self.children():
            module.train(mode)
        return self

    def eval(self: T) -> T:
        """Set evaluation mode (``train(False)``); return ``self``."""
        return self.train(False)

    def requires_grad_(self: T, requires_grad: bool = True) -> T:
        """Set ``requires_grad`` on every parameter; return ``self``."""
        for param in self.parameters():
            param.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients of every parameter, as ``torch.nn.Module.zero_grad``.

        ``grad`` is a list and stays one (everything that reads it keeps working); the two
        modes differ, as in torch, in what happens to a reference to the old gradients.

        Args:
            set_to_none: ``True`` (default, torch's default): give each parameter a new empty
                list (``p.grad = None`` does the same), so a list read before keeps its
                gradients. ``False``: empty each list in place, so every holder of it sees
                ``[]`` (torch zeroes the tensor in place).

        Example:
            >>> import afnio
            >>> class Agent(Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.prompt = Parameter("Be brief.", role="system prompt")
            >>> agent = Agent()
            >>> agent.prompt.append_grad(afnio.Variable("too short"))
            >>> kept = agent.prompt.grad
            >>> agent.zero_grad()
            >>> agent.prompt.grad, len(kept)
            ([], 1)
        """
        for param in self.parameters():
            if set_to_none:
                param.grad = None
            else:
                param.grad.clear()

    empty_grad = zero_grad

    def apply(self: T, fn: Callable[[Module], Any]) -> T:
        """Call ``fn`` on every sub-module (children first) and then on ``self``; return
        ``self``."""
        for module in self.children():
            module.apply(fn)
        fn(self)
        return self

    # ------------------------------------------------------------------ state dict
    def get_extra_state(self) -> Any:
        """Return extra state to save in the state dict. Override together with
        :meth:`set_extra_state`; the default has none.

        Raises:
            RuntimeError: When called on a module that did not override it.
        """
        raise RuntimeError(
            "Reached a code path in Module.get_extra_state() that should never be called: "
            f"{type(self).__name__} does not define extra state"
        )

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned. Override together with it.

        Raises:
            RuntimeError: When called on a module that did not override it.
        """
        raise RuntimeError(
            "Reached a code path in Module.set_extra_state() that should never be called: "
            f"{type(self).__name__} does not define extra state"
        )

    def _has_extra_state(self) -> bool:
        return type(self).get_extra_state is not Module.get_extra_state

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name, (kind, value) in self._local_state().items():
            destination[prefix + name] = _saved_form(kind, value, keep_vars)
        if self._has_extra_state():
            destination[prefix + _EXTRA_STATE_KEY_SUFFIX] = self.get_extra_state()

    def state_dict(
        self, destination: dict | None = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """Return the module's state as an ordered mapping from dotted names to values.

        Parameters and persistent buffers are detached Variables (the live objects with
        ``keep_vars=True``); chats are their messages; model clients are
        ``{"class": ..., "config": ...}`` descriptions without secrets; completion configs are
        dict copies; ``"_extra_state"`` holds :meth:`get_extra_state` where overridden.

        Args:
            destination: A mapping to fill (a new ``OrderedDict`` by default).
            prefix: Prepended to every key.
            keep_vars: Return the live Variables instead of detached copies.
        """
        if destination is None:
            destination = OrderedDict()
        self._save_to_state_dict(destination, prefix, keep_vars)
        for name, module in self._modules.items():
            if module is not None:
                module.state_dict(
                    destination=destination, prefix=prefix + name + ".", keep_vars=keep_vars
                )
        return destination

    def _local_state(self) -> dict[str, tuple[str, Any]]:
        """This module's own saved entries, in state-dict order: ``{name: (kind, value)}``."""
        local: dict[str, tuple[str, Any]] = {}
        for name, param in self._parameters.items():
            if param is not None:
                local[name] = ("parameter", param)
        for name, buffer in self._buffers.items():
            if buffer is not None and name not in self._non_persistent_buffers_set:
                local[name] = ("buffer", buffer)
        for name, messages in self._chats.items():
            if messages is not None:
                local[name] = ("chat", messages)
        for name, model in self._models.items():
            if model is not None:
                local[name] = ("model", model)
        for name, config in self._completion_configs.items():
            if config is not None:
                local[name] = ("completion config", config)
        return local

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
        assign: bool,
        actions: list[Callable[[], None]],
        load_clients: bool = False,
    ) -> None:
        """Check this module's entries of ``state_dict`` and queue the updates in ``actions``.

        Nothing is changed here: :meth:`load_state_dict` runs the actions only when no module
        reported an error, so a failing load leaves the module untouched.
        """
        local = self._local_state()
        for name, (kind, current) in local.items():
            key = prefix + name
            if key in state_dict:
                if kind == "model":
                    action = self._load_model(name, key, current, state_dict[key], error_msgs,
                                              load_clients)
                    if action is not None:
                        actions.append(action)
                    continue
                loader = getattr(self, f"_load_{kind.replace(' ', '_')}")
                action = loader(name, key, current, state_dict[key], assign, error_msgs)
                if action is not None:
                    actions.append(action)
            elif strict:
                missing_keys.append(key)
        extra_key = prefix + _EXTRA_STATE_KEY_SUFFIX
        if type(self).set_extra_state is not Module.set_extra_state:
            if extra_key in state_dict:
                value = state_dict[extra_key]
                actions.append(lambda: self.set_extra_state(value))
            elif strict:
                missing_keys.append(extra_key)
        elif strict and extra_key in state_dict:
            unexpected_keys.append(extra_key)
        if strict:
            for key in state_dict:
                if not key.startswith(prefix) or key == extra_key:
                    continue
                head, *rest = key[len(prefix) :].split(".", 1)
                if rest and head not in self._modules:
                    unexpected_keys.append(key)
                elif not rest and head not in local:
                    unexpected_keys.append(key)

    def _load_variable(
        self, kind: str, name: str, key: str, current: Variable, value: Any, assign: bool,
        error_msgs: list[str],
    ) -> Callable[[], None] | None:
        if not isinstance(value, Variable):
            error_msgs.append(
                f'While copying the {kind} named "{key}", expected afnio.Variable from '
                f"checkpoint but received {type(value).__name__}"
            )
            return None
        if value.batch_size is None and current.is_batched or (
            value.is_batched and current.batch_size is None
        ):
            error_msgs.append(
                f"size mismatch for {key}: copying a {kind} that is {_shape_name(value)} from "
                f"checkpoint, the {kind} in current model is {_shape_name(current)}."
            )
            return None
        if not assign:
            data = list(value.data) if value.is_batched else value.data

            def copy_data() -> None:
                current.data = data

            return copy_data
        if kind == "parameter":
            replacement = value if isinstance(value, Parameter) else Parameter(
                value.data, role=value.role or current.role, requires_grad=current.requires_grad
            )
            return lambda: self.register_parameter(name, replacement)
        return lambda: self._buffers.__setitem__(name, value)

    def _load_parameter(self, name, key, current, value, assign, error_msgs):
        return self._load_variable("parameter", name, key, current, value, assign, error_msgs)

    def _load_buffer(self, name, key, current, value, assign, error_msgs):
        return self._load_variable("buffer", name, key, current, value, assign, error_msgs)

    def _load_chat(self, name, key, current, value, assign, error_msgs):
        if not is_chat(value):
            error_msgs.append(
                f'While copying the chat named "{key}", expected chat messages from checkpoint '
                f"but received {type(value).__name__}"
            )
            return None
        if assign:
            messages = _detach_chat(value, keep_vars=True)
            return lambda: self._chats.__setitem__(name, messages)
        targets = list(flatten_variables([m["content"] for m in current]))
        sources = list(flatten_variables([m["content"] for m in value]))
        roles = [m["role"] for m in current] == [m["role"] for m in value]
        if not roles or len(targets) != len(sources):
            error_msgs.append(
                f"structure mismatch for {key}: the chat in the checkpoint has "
                f"{len(value)} messages with {len(sources)} Variables, the chat in current model "
                f"has {len(current)} messages with {len(targets)} Variables."
            )
            return None
        for target, source in zip(targets, sources):
            if target.is_batched != source.is_batched:
                error_msgs.append(
                    f"size mismatch for {key}: a Variable with role {target.role!r} is "
                    f"{_shape_name(target)} in current model but {_shape_name(source)} in "
                    "the checkpoint."
                )
                return None
        pairs = [(t, list(s.data) if s.is_batched else s.data) for t, s in zip(targets, sources)]

        def copy_chat() -> None:
            for target, data in pairs:
                target.data = data

        return copy_chat

    def _load_model(self, name, key, current, value, error_msgs, load_clients):
        if not isinstance(value, Mapping) or "class" not in value:
            error_msgs.append(
                f'While loading the model client named "{key}", expected a '
                '{"class": ..., "config": ...} description from checkpoint but received '
                f"{type(value).__name__}"
            )
            return None
        if not load_clients or client_to_config(current) == dict(value):
            return None  # the live client stays, with its endpoint, cache, limits and key
        try:
            client = client_from_config(dict(value))
        except (ValueError, TypeError) as exc:
            error_msgs.append(f'While loading the model client named "{key}": {exc}')
            return None
        return lambda: self._models.__setitem__(name, client)

    def _load_completion_config(self, name, key, current, value, assign, error_msgs):
        if not isinstance(value, Mapping):
            error_msgs.append(
                f'While loading the completion config named "{key}", expected a dict from '
                f"checkpoint but received {type(value).__name__}"
            )
            return None
        config = copy.deepcopy(dict(value))
        return lambda: self._completion_configs.__setitem__(name, config)

    def load_state_dict(
        self,
        state_dict: Mapping[str, Any],
        strict: bool = True,
        assign: bool = False,
        *,
        load_clients: bool = False,
    ) -> IncompatibleKeys:
        """Copy state from ``state_dict`` into this module and its descendants.

        All entries are checked before anything changes: if the load fails, the module is left
        exactly as it was. Only data is taken: prompts, chats, buffers, completion configs. The
        module's model clients stay as they are unless ``load_clients=True``.

        Args:
            state_dict: A mapping as returned by :meth:`state_dict`.
            strict: Require the keys to match this module's keys exactly.
            assign: Replace the module's Variables (and chats) with the loaded objects instead of
                copying their data in.
            load_clients: Rebuild each model client whose saved description differs from the
                live one, from that description: its class (afnio's own clients, or ones
                registered with :func:`~afnio.models.register_client_class`) and its whole
                config, endpoint (``base_url``), cache path and model file included. Only for
                state dicts you trust: a file's endpoint receives your API key.

        Returns:
            ``IncompatibleKeys(missing_keys, unexpected_keys)``, also when ``strict=False``.

        Raises:
            TypeError: If ``state_dict`` is not a mapping.
            RuntimeError: With torch's ``Error(s) in loading state_dict for <Class>:`` text when
                keys don't match under ``strict`` or a value can't be loaded.

        Example:
            >>> from afnio.cognitive import Module, Parameter
            >>> class Agent(Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.prompt = Parameter("Be brief.", role="system prompt")
            >>> agent = Agent()
            >>> _ = agent.load_state_dict({"prompt": Parameter("Be kind.", role="system prompt")})
            >>> agent.prompt.data
            'Be kind.'
        """
        keys, actions = self._prepare_load_state_dict(
            state_dict, strict=strict, assign=assign, load_clients=load_clients
        )
        for action in actions:
            action()
        return keys

    def _prepare_load_state_dict(
        self,
        state_dict: Mapping[str, Any],
        *,
        strict: bool = True,
        assign: bool = False,
        load_clients: bool = False,
    ) -> tuple[IncompatibleKeys, list[Callable[[], None]]]:
        """Check a whole state dict and return the updates that load it, changing nothing.

        :meth:`load_state_dict` is this followed by running the updates; the Trainer calls it
        to check a checkpoint's agent and optimizers before touching either.

        Raises:
            TypeError, RuntimeError: As :meth:`load_state_dict`.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"Expected state_dict to be dict-like, got {type(state_dict).__name__}."
            )
        missing_keys: list[str] = []
        unexpected_keys: list[str] = []
        error_msgs: list[str] = []
        actions: list[Callable[[], None]] = []

        def load(module: Module, prefix: str = "") -> None:
            # As in torch, the key lists are always computed; `strict` only decides whether
            # they are errors.
            module._load_from_state_dict(
                state_dict, prefix, True, missing_keys, unexpected_keys, error_msgs, assign,
                actions, load_clients,
            )
            for name, child in module._modules.items():
                if child is not None:
                    load(child, prefix + name + ".")

        load(self)
        if strict:
            if unexpected_keys:
                error_msgs.insert(
                    0,
                    "Unexpected key(s) in state_dict: {}. ".format(
                        ", ".join(f'"{key}"' for key in unexpected_keys)
                    ),
                )
            if missing_keys:
                error_msgs.insert(
                    0,
                    "Missing key(s) in state_dict: {}. ".format(
                        ", ".join(f'"{key}"' for key in missing_keys)
                    ),
                )
        if error_msgs:
            raise RuntimeError(
                "Error(s) in loading state_dict for {}:\n\t{}".format(
                    type(self).__name__, "\n\t".join(error_msgs)
                )
            )
        return IncompatibleKeys(missing_keys, unexpected_keys), actions

    # ------------------------------------------------------------------ printing
    def _get_name(self) -> str:
        return type(self).__name__

    def extra_repr(self) -> str:
        """Extra text shown inside this module's ``repr`` (override to add details)."""
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        extra_lines = extra.split("\n") if extra else []
        child_lines = [
            f"({name}): {_addindent(repr(module), 2)}" for name, module in self._modules.items()
        ]
        lines = extra_lines + child_lines
        text = self._get_name() + "("
        if lines:
            if len(extra_lines) == 1 and not child_lines:
                text += extra_lines[0]
            else:
                text += "\n  " + "\n  ".join(lines) + "\n"
        return text + ")"

    # ------------------------------------------------------------------ Trainer hooks
    def _hook_missing(self, hook: str) -> RuntimeError:
        return RuntimeError(
            f"{type(self).__name__}.{hook}() is not defined: override {hook} in your Module "
            "subclass to use it with the Trainer"
        )

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """One training step for the Trainer: return ``(score, explanation)`` Variables, or a
        dict with key ``"loss"`` holding that pair plus optional extra metrics.

        Raises:
            RuntimeError: Unless overridden.
        """
        raise self._hook_missing("training_step")

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        """One validation step for the Trainer (same return shape as :meth:`training_step`).

        Raises:
            RuntimeError: Unless overridden.
        """
        raise self._hook_missing("validation_step")

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        """One test step for the Trainer (same return shape as :meth:`training_step`).

        Raises:
            RuntimeError: Unless overridden.
        """
        raise self._hook_missing("test_step")

    def configure_optimizers(self) -> Any:
        """Return the optimizer (or a list of optimizers) the Trainer should use.

        Raises:
            RuntimeError: Unless overridden.
        """
        raise self._hook_missing("configure_optimizers")

    def optimizers(self) -> Any:
        """The optimizer(s) the Trainer set up from :meth:`configure_optimizers`: the optimizer
        itself when there is one, else the list.

        Raises:
            RuntimeError: Before the Trainer has set them.
        """
        optimizers = self.__dict__.get("_optimizers")
        if optimizers is None:
            raise RuntimeError(
                f"{type(self).__name__}.optimizers(): no optimizers are attached yet; the Trainer "
                "attaches the result of configure_optimizers() when fitting starts"
            )
        if isinstance(optimizers, (list, tuple)) and len(optimizers) == 1:
            return optimizers[0]
        return optimizers

"""User-definable differentiable operations: :class:`Function` and its context.

Example:
    >>> import afnio
    >>> from afnio.autodiff import Function
    >>> class Shout(Function):
    ...     @staticmethod
    ...     def forward(ctx, text):
    ...         return afnio.Variable(text.data.upper(), role=f"shouted {text.role}")
    ...     @staticmethod
    ...     def backward(ctx, grad_output):
    ...         return grad_output
    >>> x = afnio.Variable("hello", role="greeting", requires_grad=True)
    >>> y = Shout.apply(x)
    >>> y.data, y.grad_fn.name()
    ('HELLO', 'ShoutBackward')
    >>> y.backward(afnio.Variable("too loud"))
    >>> x.grad[0].data
    'too loud'
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

from afnio._runtime import run
from afnio._variable import Variable
from afnio.autodiff.grad_mode import _grad_enabled, is_grad_enabled
from afnio.autodiff.graph import (
    FREED_GRAPH_MESSAGE,
    GradientEdge,
    Node,
    empty_gradient,
    gradient_edge,
)

__all__ = ["Function", "FunctionCtx", "BackwardFunction", "flatten_variables", "variable_paths"]


def flatten_variables(value: Any) -> Iterator[Variable]:
    """Yield the Variables inside ``value``, depth-first through lists, tuples and dict values.

    Example:
        >>> a, b, c = Variable("a"), Variable("b"), Variable("c")
        >>> [v.data for v in flatten_variables([a, {"x": (b,), "y": "no"}, c])]
        ['a', 'b', 'c']
    """
    if isinstance(value, Variable):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from flatten_variables(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from flatten_variables(item)


def variable_paths(value: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Variable]]:
    """Yield ``(path, variable)`` for the Variables inside ``value``, in the flat order of
    :func:`flatten_variables`; a path is ``prefix`` followed by the list positions and dict keys
    that lead to the Variable (what a streaming ``backward`` yields to address it).

    Example:
        >>> a, b = Variable("a"), Variable("b")
        >>> messages = [{"role": "system", "content": [a, "text", b]}]
        >>> [(path, v.data) for path, v in variable_paths(messages, prefix=(1,))]
        [((1, 0, 'content', 0), 'a'), ((1, 0, 'content', 2), 'b')]
    """
    if isinstance(value, Variable):
        yield prefix, value
    elif isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            yield from variable_paths(item, (*prefix, position))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from variable_paths(item, (*prefix, key))


class FunctionCtx:
    """The ``ctx`` object a :class:`Function` uses to pass state from forward to backward.

    Attributes:
        needs_input_grad: One bool per input argument, True when a Variable inside it requires
            grad.
        trace: What the op wants shown about this call (e.g. a GradComponent's inputs and full
            response); graph drawings read it from the node. ``None`` by default.
    """

    def __init__(self, function: type[Function]) -> None:
        self._function = function
        self.needs_input_grad: tuple[bool, ...] = ()
        self.trace: dict[str, Any] | None = None
        self.materialize_grads = True
        self._saved: tuple[Variable, ...] = ()
        self._non_differentiable: set[int] = set()
        self._freed = False

    def save_for_backward(self, *variables: Variable | None) -> None:
        """Keep Variables for backward (read them back from :attr:`saved_variables`)."""
        for index, variable in enumerate(variables):
            if variable is not None and not isinstance(variable, Variable):
                raise TypeError(
                    f"{self._function.__name__}: save_for_backward accepts Variables or None, "
                    f"argument {index} is {type(variable).__name__}"
                )
        self._saved = variables

    @property
    def saved_variables(self) -> tuple[Variable, ...]:
        """The Variables given to :meth:`save_for_backward`.

        Raises:
            RuntimeError: After the graph was freed by a ``backward`` without ``retain_graph``.
        """
        if self._freed:
            raise RuntimeError(FREED_GRAPH_MESSAGE)
        return self._saved

    saved_tensors = saved_variables

    def mark_non_differentiable(self, *outputs: Variable) -> None:
        """Mark outputs that should not require grad (e.g. a numeric score).

        They come out of ``apply`` as plain leaves, and ``backward`` still has a slot for each
        of them, which always receives ``None``.
        """
        self._non_differentiable.update(id(output) for output in outputs)

    def set_materialize_grads(self, value: bool) -> None:
        """Choose whether missing output gradients reach backward as empty feedback (default)
        or as ``None``."""
        self.materialize_grads = bool(value)

    def _free(self) -> None:
        """Drop everything forward left for backward (a freed graph can't run again)."""
        kept = {"_function", "needs_input_grad", "materialize_grads", "_non_differentiable"}
        for name in [name for name in vars(self) if name not in kept]:
            delattr(self, name)
        self._freed = True
        self._saved = ()
        self.trace = None


class BackwardFunction(Node):
    """The graph node of one :meth:`Function.apply` call; calls the Function's ``backward``."""

    _forward_cls: type[Function]

    def __init__(
        self,
        ctx: FunctionCtx,
        arguments: list[Any],
        next_functions: list[GradientEdge],
        outputs: list[Variable],
        slots: list[int | None] | None = None,
    ) -> None:
        super().__init__(next_functions, outputs)
        self.ctx = ctx
        # Keep only the structure of the arguments plus the shape of each Variable in them.
        self._argument_shapes = [_shape_of(argument) for argument in arguments]
        # For each output of forward: its index among this node's outputs, or None when it is
        # not a Variable or was marked non-differentiable (backward then receives None for it).
        # None when the two coincide (every output is a differentiable Variable).
        identity = slots is None or slots == list(range(len(outputs)))
        self._slots = None if identity else slots

    def name(self) -> str:
        return f"{self._forward_cls.__name__}Backward"

    @property
    def trace(self) -> dict[str, Any] | None:
        """The trace the Function recorded on ``ctx`` (``None`` once the graph is freed)."""
        return self.ctx.trace

    def release(self) -> None:
        super().release()
        self.ctx._free()

    def _call_backward(self, grad_outputs: list[Variable | None]) -> Any:
        """Call the Function's backward with one gradient per forward output."""
        if self._forward_cls.backward is Function.backward:
            raise RuntimeError(
                f"{self.name()}: {self._forward_cls.__name__} does not define backward; a "
                "Function subclass must define a static backward(ctx, *grad_outputs)"
            )
        if self.ctx.materialize_grads:
            grad_outputs = [
                grad if grad is not None else empty_gradient(*self.output_meta[index])
                for index, grad in enumerate(grad_outputs)
            ]
        if self._slots is not None:
            grad_outputs = [None if slot is None else grad_outputs[slot] for slot in self._slots]
        return self._forward_cls.backward(self.ctx, *grad_outputs)

    def apply(self, grad_outputs: list[Variable | None]) -> list[Variable | None]:
        if self.streams:
            return run(self.aapply(grad_outputs))
        result = self._call_backward(grad_outputs)
        if inspect.isawaitable(result):
            result = run(result)
        return self._flatten_result(result)

    async def aapply(self, grad_outputs: list[Variable | None]) -> list[Variable | None]:
        if self.streams:
            flat: list[Variable | None] = [None] * len(self.next_functions)
            async for position, gradient in self.astream(grad_outputs):
                flat[position] = gradient
            return flat
        result = self._call_backward(grad_outputs)
        if inspect.isawaitable(result):
            result = await result
        return self._flatten_result(result)

    async def astream(
        self, grad_outputs: list[Variable | None]
    ) -> AsyncIterator[tuple[int, Variable | None]]:
        """The flat ``(position, gradient)`` pairs of what a streaming backward yields (an
        ``async def backward`` with ``yield``), each checked against the input it addresses."""
        if not self.streams:
            async for pair in super().astream(grad_outputs):
                yield pair
            return
        delivered: set[int] = set()
        async with contextlib.aclosing(self._call_backward(grad_outputs)) as items:
            async for item in items:
                if not (isinstance(item, tuple) and len(item) == 2):
                    raise RuntimeError(
                        f"function {self.name()} yielded {item!r:.80}; a streaming backward "
                        "yields (index, gradient) pairs"
                    )
                start, shape, where = self._locate(item[0])
                flat: list[Variable | None] = []
                _flatten_gradient(self.name(), item[0], shape, item[1], flat)
                for position, gradient in enumerate(flat, start):
                    if position in delivered:
                        raise RuntimeError(
                            f"function {self.name()} yielded a second gradient for the input at "
                            f"{where}"
                        )
                    delivered.add(position)
                    yield position, gradient

    def _locate(self, index: Any) -> tuple[int, Any, str]:
        """The first flat position, the shape and a description of the argument (an ``int``)
        or the place inside a container argument (a path ``(argument, key, ...)``) that
        ``index`` addresses."""
        path = index if isinstance(index, tuple) else (index,)
        where = f"index {index!r}"

        def fail(problem: str) -> RuntimeError:
            return RuntimeError(f"function {self.name()} yielded a gradient for {where}: {problem}")

        shapes = self._argument_shapes
        first = path[0] if path else None
        if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < len(shapes):
            raise fail(f"a streaming backward addresses an input as an argument index (0 to "
                       f"{len(shapes) - 1}) or a path (argument, key, ...) into a container "
                       "argument")
        start = sum(_count_variables(shape) for shape in shapes[:first])
        shape = shapes[first]
        for key in path[1:]:
            if isinstance(shape, list):
                if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(shape):
                    raise fail(f"{key!r} is not a position of a sequence of length {len(shape)}")
                start += sum(_count_variables(item) for item in shape[:key])
                shape = shape[key]
            elif isinstance(shape, dict):
                if key not in shape:
                    raise fail(f"{key!r} is not a key of the dict (keys {list(shape)!r:.80})")
                for other, item in shape.items():
                    if other == key:
                        break
                    start += _count_variables(item)
                shape = shape[key]
            else:
                raise fail(f"the path goes on past {'a Variable' if shape else 'a plain value'}")
        return start, shape, where

    def _flatten_result(self, result: Any) -> list[Variable | None]:
        """Check backward's return value against the inputs and flatten it to edge order."""
        shapes = self._argument_shapes
        if not isinstance(result, tuple):
            result = (result,)
        expected = len(shapes)
        # Trailing arguments that hold no Variable may be left out of the return value.
        required = max((i + 1 for i, shape in enumerate(shapes) if _has_variable(shape)), default=0)
        if not required <= len(result) <= expected:
            raise RuntimeError(
                f"function {self.name()} returned an incorrect number of gradients "
                f"(expected {expected}, got {len(result)})"
            )
        flat: list[Variable | None] = []
        for index, shape in enumerate(shapes):
            value = result[index] if index < len(result) else None
            _flatten_gradient(self.name(), index, shape, value, flat)
        return flat


_VARIABLE = "variable"


def _shape_of(argument: Any) -> Any:
    """The argument's structure with each Variable replaced by ``(role, batch_size)``."""
    if isinstance(argument, Variable):
        return (_VARIABLE, argument.role, argument.batch_size)
    if isinstance(argument, (list, tuple)):
        return [_shape_of(item) for item in argument]
    if isinstance(argument, dict):
        return {key: _shape_of(value) for key, value in argument.items()}
    return None


def _has_variable(shape: Any) -> bool:
    return isinstance(shape, tuple) or next(_iter_variable_shapes(shape), None) is not None


def _flatten_gradient(name: str, index: Any, shape: Any, value: Any, out: list) -> None:
    def fail(problem: str) -> RuntimeError:
        return RuntimeError(
            f"function {name} returned an invalid gradient at index {index}: {problem}"
        )

    if isinstance(shape, tuple):
        if value is None:
            out.append(None)
            return
        if not isinstance(value, Variable):
            raise fail(f"expected a Variable or None, got {type(value).__name__}")
        _, role, batch_size = shape
        if value.batch_size != batch_size:
            want = "a scalar" if batch_size is None else f"a batch of {batch_size}"
            got = "a scalar" if value.batch_size is None else f"a batch of {value.batch_size}"
            raise fail(f"the input with role {role!r} is {want} but its gradient is {got}")
        out.append(value)
    elif value is None:
        # No gradient for this container argument: one None per Variable inside it.
        out.extend(None for _ in _iter_variable_shapes(shape))
    elif isinstance(shape, list):
        if not isinstance(value, (list, tuple)) or len(value) != len(shape):
            raise fail(
                f"the input is a sequence of length {len(shape)}, so its gradient must be None or "
                f"a sequence of the same length, got {type(value).__name__}"
                + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else "")
            )
        for item_shape, item in zip(shape, value):
            _flatten_gradient(name, index, item_shape, item, out)
    elif isinstance(shape, dict):
        if not isinstance(value, dict) or set(value) - set(shape):
            raise fail("the input is a dict, so its gradient must be None or a dict with its keys")
        for key, item_shape in shape.items():
            _flatten_gradient(name, index, item_shape, value.get(key), out)
    elif not isinstance(value, (list, tuple, dict)):
        raise fail(f"the input holds no Variable, so its gradient must be None, got {value!r:.60}")


def _count_variables(shape: Any) -> int:
    return sum(1 for _ in _iter_variable_shapes(shape))


def _iter_variable_shapes(shape: Any) -> Iterator[tuple]:
    if isinstance(shape, tuple):
        yield shape
    elif isinstance(shape, list):
        for item in shape:
            yield from _iter_variable_shapes(item)
    elif isinstance(shape, dict):
        for item in shape.values():
            yield from _iter_variable_shapes(item)


class _FunctionMeta(type):
    """Gives every Function subclass its own ``<Name>Backward`` node class."""

    def __init__(cls, name: str, bases: tuple, namespace: dict) -> None:
        super().__init__(name, bases, namespace)
        cls._backward_cls = type(
            f"{name}Backward",
            (BackwardFunction,),
            # An async backward makes an async node, so the engine runs it concurrently; one
            # that yields (an async generator) streams its inputs' gradients.
            {
                "_forward_cls": cls,
                "is_async": inspect.iscoroutinefunction(cls.backward)
                or inspect.isasyncgenfunction(cls.backward),
                "streams": inspect.isasyncgenfunction(cls.backward),
                "inline": bool(getattr(cls, "inline_backward", False)),
            },
        )
        cls._signature_cache = None


class Function(metaclass=_FunctionMeta):
    """Base class of differentiable operations on Variables.

    Subclass it and write static methods:

    * ``forward(ctx, *args, **kwargs)`` — or ``forward(*args, **kwargs)`` together with
      ``setup_context(ctx, inputs, output)``;
    * ``backward(ctx, *grad_outputs)`` — one gradient per forward output in (``None`` for an
      output that is not a Variable or was marked non-differentiable, as in torch), one value
      per input argument out: ``None``, a gradient Variable shaped like that input, or for a
      container argument the same container with gradients (or ``None``) where its Variables
      were.

    Either may be ``async def``; :meth:`apply` is synchronous regardless (use :meth:`aapply` from
    async code). An ``async def backward`` may also *stream*: instead of returning, it yields
    ``(index, gradient)`` pairs as each gradient is ready, and the engine passes each one on at
    once (so a fast input's gradient does not wait for a slow one). ``index`` is an argument
    index, with the gradient shaped as ``backward`` would return it, or a path
    ``(argument, key, ...)`` to a place inside a container argument (list positions, dict keys;
    :func:`variable_paths` lists them). Each Variable gets at most one gradient; the ones never
    addressed get none.

    A synchronous ``backward`` may block (call a model, read a file): the engine runs it in a
    worker thread so other branches go on; set ``inline_backward = True`` on a Function whose
    backward is quick pure Python to have it run directly on the engine's loop.

    Keyword arguments are bound to ``forward``'s parameters, so "input argument" means each
    parameter of ``forward`` in declaration order (after ``ctx``), one per element of a
    ``*args``, followed by the values of any ``**kwargs`` in call order. Trailing inputs that hold
    no Variable may be left out of backward's return value.

    Instantiating a Function works but warns (``DeprecationWarning``, as torch does): its
    methods are static, so call :meth:`apply` on the class.
    """

    _backward_cls: type[BackwardFunction]
    _signature_cache: inspect.Signature | None
    inline_backward: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        warnings.warn(
            f"{name} is a Function: its methods are static, so call {name}.apply(...) on the "
            "class. Creating an instance is deprecated, as in torch, and may become an error.",
            DeprecationWarning,
            stacklevel=2,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        name = type(self).__name__
        raise RuntimeError(
            f"{name} instances are not callable (that is the legacy, non-static Function "
            f"style); call {name}.apply(...) instead"
        )

    @staticmethod
    def forward(*args: Any, **kwargs: Any) -> Any:
        """Compute the outputs. Override in a subclass."""
        raise RuntimeError("a Function subclass must define a static forward method")

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: Any) -> Any:
        """Save what backward needs when ``forward`` does not take ``ctx``. Optional."""
        raise RuntimeError("setup_context is only called when a Function defines it")

    @staticmethod
    def backward(ctx: FunctionCtx, *grad_outputs: Variable) -> Any:
        """Compute input gradients from output gradients. Override in a subclass."""
        raise RuntimeError("a Function subclass must define a static backward method")

    @classmethod
    def _uses_setup_context(cls) -> bool:
        return cls.setup_context is not Function.setup_context

    @classmethod
    def _bind(cls, args: tuple, kwargs: dict) -> tuple[inspect.BoundArguments, list[Any]]:
        if cls.forward is Function.forward:
            raise RuntimeError(
                f"{cls.__name__}.apply: {cls.__name__} does not define forward; a Function "
                "subclass must define a static forward(ctx, *args, **kwargs), or forward(*args, "
                "**kwargs) together with setup_context(ctx, inputs, output)"
            )
        if cls._signature_cache is None:
            signature = inspect.signature(cls.forward)
            parameters = list(signature.parameters.values())
            if not cls._uses_setup_context():
                parameters = parameters[1:]  # drop ctx
            cls._signature_cache = signature.replace(parameters=parameters)
        signature = cls._signature_cache
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{cls.__name__}.apply: {exc}") from None
        bound.apply_defaults()
        arguments: list[Any] = []
        for parameter in signature.parameters.values():
            value = bound.arguments.get(parameter.name)
            if parameter.kind is parameter.VAR_POSITIONAL:
                arguments.extend(value or ())
            elif parameter.kind is parameter.VAR_KEYWORD:
                arguments.extend((value or {}).values())
            else:
                arguments.append(value)
        return bound, arguments

    @classmethod
    def _prepare(cls, args: tuple, kwargs: dict) -> tuple[FunctionCtx, Any, list, list[Variable]]:
        bound, arguments = cls._bind(args, kwargs)
        ctx = FunctionCtx(cls)
        per_argument = [list(flatten_variables(argument)) for argument in arguments]
        ctx.needs_input_grad = tuple(
            any(variable.requires_grad for variable in variables) for variables in per_argument
        )
        return ctx, bound, arguments, [v for variables in per_argument for v in variables]

    @classmethod
    def _call_forward(cls, ctx: FunctionCtx, bound: inspect.BoundArguments) -> Any:
        token = _grad_enabled.set(False)
        try:
            if cls._uses_setup_context():
                return cls.forward(*bound.args, **bound.kwargs)
            return cls.forward(ctx, *bound.args, **bound.kwargs)
        finally:
            _grad_enabled.reset(token)

    @classmethod
    def _finish(
        cls,
        ctx: FunctionCtx,
        bound: inspect.BoundArguments,
        arguments: list,
        variables: list[Variable],
        result: Any,
        record: bool,
    ) -> Any:
        if cls._uses_setup_context():
            token = _grad_enabled.set(False)
            try:
                cls.setup_context(ctx, tuple(arguments), result)
            finally:
                _grad_enabled.reset(token)
        is_tuple = isinstance(result, tuple)
        outputs = list(result) if is_tuple else [result]
        input_ids = {id(variable) for variable in variables}
        for index, output in enumerate(outputs):
            if isinstance(output, Variable) and id(output) in input_ids:
                outputs[index] = Variable(output.data, role=output.role)  # copies a batch
        if record:
            differentiable: list[Variable] = []
            slots: list[int | None] = []
            for output in outputs:
                if isinstance(output, Variable) and id(output) not in ctx._non_differentiable:
                    slots.append(len(differentiable))
                    differentiable.append(output)
                else:
                    slots.append(None)
            node = cls._backward_cls(
                ctx, arguments, [gradient_edge(v) for v in variables], differentiable, slots
            )
            for output_nr, output in enumerate(differentiable):
                output.grad_fn = node
                output.output_nr = output_nr
                output._requires_grad = True
        return tuple(outputs) if is_tuple else outputs[0]

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        """Run the operation and, under grad mode, record it in the graph.

        Returns:
            What ``forward`` returned; Variable outputs get ``grad_fn`` (a ``<Name>Backward``
            node) and ``requires_grad=True`` when grad mode is on and an input requires grad.
        """
        ctx, bound, arguments, variables = cls._prepare(args, kwargs)
        record = is_grad_enabled() and any(ctx.needs_input_grad)
        result = cls._call_forward(ctx, bound)
        if inspect.isawaitable(result):
            result = run(_await(result))
        return cls._finish(ctx, bound, arguments, variables, result, record)

    @classmethod
    async def aapply(cls, *args: Any, **kwargs: Any) -> Any:
        """Awaitable twin of :meth:`apply` for code running on an event loop."""
        ctx, bound, arguments, variables = cls._prepare(args, kwargs)
        record = is_grad_enabled() and any(ctx.needs_input_grad)
        result = cls._call_forward(ctx, bound)
        if inspect.isawaitable(result):
            result = await _await(result)
        return cls._finish(ctx, bound, arguments, variables, result, record)


async def _await(awaitable: Any) -> Any:
    token = _grad_enabled.set(False)
    try:
        return await awaitable
    finally:
        _grad_enabled.reset(token)

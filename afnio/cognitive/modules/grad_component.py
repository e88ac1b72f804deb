"""GradComponent: a module whose plain Python ``call`` takes part in textual backpropagation.

In training mode, calling a component runs :meth:`GradComponent.forward`: Variable arguments are
unwrapped to their data, :meth:`~GradComponent.call` runs (once per batch element, concurrently
through :meth:`~GradComponent.acall` when the component defines it), and the result comes back
as a :class:`ComponentResponse` recorded through the :class:`~afnio.autodiff.function.Function`
machinery like any op: its ``grad_fn`` is a ``<ComponentClass>Backward`` node with the Variable
arguments as predecessors. In eval mode the component is just its ``call``: Variables in, plain
values out.

During ``backward`` the node hands the component a *response* (same data and role as the output,
its ``grad`` holding the combined feedback, ``predecessors`` holding fresh copies of the inputs)
and calls :meth:`GradComponent.backward`. Whatever the component appends to those copies'
``grad`` lists (or returns, one entry per predecessor) becomes the gradient the engine delivers
to the real inputs — so gradients reach leaves only through the engine, in its deterministic
order. A synchronous ``backward`` override runs off the event loop, as every synchronous node
does.

Example:
    >>> from afnio.cognitive import Parameter, ParameterType, fun_to_grad_component
    >>> @fun_to_grad_component(
    ...     desc="Add one",
    ...     doc_string=Parameter(
    ...         data="Increment the input by one.",
    ...         param_type=ParameterType.PROMPT,
    ...         requires_opt=True,
    ...         role_desc="Instruction for the increment step.",
    ...     ),
    ... )
    ... def my_function(x):
    ...     return x + 1
    >>> out = my_function(1)
    >>> out.data, out.grad_fn.name()
    (2, 'MyFunctionGradComponentBackward')
    >>> my_function.eval()(1)
    2
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from afnio._runtime import run
from afnio._variable import Variable, check_gradient_shape, validate_data
from afnio.autodiff import prompts as autodiff_prompts
from afnio.autodiff.basic_ops import broadcast_size
from afnio.autodiff.feedback import (
    BackwardModel,
    GradientPrompts,
    OutputFeedback,
    as_finished,
    element_gradient,
    fill_prompt,
    fill_template,
    gather_all,
    shared_gradient,
)
from afnio.autodiff.function import Function, FunctionCtx, flatten_variables, variable_paths
from afnio.autodiff.grad_mode import no_grad
from afnio.autodiff.graph import combine_gradients, gradient_role, reduce_to_scalar
from afnio.cognitive import prompts
from afnio.cognitive.modules.module import Module
from afnio.cognitive.parameter import Parameter, ParameterType
from afnio.models.model import ChatCompletionModel

__all__ = [
    "BackwardEngine",
    "ComponentResponse",
    "FunGradComponent",
    "GradComponent",
    "fun_to_grad_component",
]


class BackwardEngine:
    """The model that writes a GradComponent's gradients: a client plus completion arguments.

    Args:
        model_client: The client to ask. ``None`` means the backward model client of the
            settings in force when the component's forward runs
            (:func:`afnio.set_backward_model_client`, :func:`afnio.settings`).
        completion_args: Arguments sent with every request (added to the settings' backward
            completion arguments when the settings' client is used).
        max_attempts: Requests sent (the first plus repairs) before an unreadable reply is
            used as it is; ``None``: the ``reply_retries`` setting plus one.

    Example:
        >>> from afnio.testing import ScriptedModel
        >>> engine = BackwardEngine(ScriptedModel(["<FEEDBACK>Be shorter.</FEEDBACK>"]))
        >>> engine.feedback([{"role": "user", "content": "review this"}])
        'Be shorter.'
    """

    def __init__(
        self,
        model_client: ChatCompletionModel | None = None,
        completion_args: dict[str, Any] | None = None,
        max_attempts: int | None = None,
    ) -> None:
        if model_client is not None and not isinstance(model_client, ChatCompletionModel):
            raise TypeError(
                "BackwardEngine: argument 'model_client' must be a ChatCompletionModel or None, "
                f"got {type(model_client).__name__}"
            )
        if max_attempts is not None and (
            isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
        ):
            raise ValueError(f"BackwardEngine: max_attempts must be at least 1, got {max_attempts}")
        self.model_client = model_client
        self.completion_args = dict(completion_args or {})
        self.max_attempts = max_attempts

    def capture(self) -> BackwardModel:
        """The client and arguments to use for a graph built now."""
        captured = BackwardModel.capture(self.model_client)
        args = dict(self.completion_args)
        if self.model_client is None:
            args = {**captured.completion_args, **args}
        retries = None if self.max_attempts is None else self.max_attempts - 1
        return BackwardModel(captured.client, args, retries)

    async def afeedback(self, messages: list[dict[str, Any]]) -> str:
        """Ask for feedback through the feedback layer (see
        :meth:`~afnio.autodiff.feedback.BackwardModel.feedback`).

        Raises:
            RuntimeError: If the engine has no client and none is set in the settings.
        """
        return await self.capture().feedback(messages, "BackwardEngine")

    def feedback(self, messages: list[dict[str, Any]]) -> str:
        """Synchronous twin of :meth:`afeedback`."""
        return run(self.afeedback(messages))

    def __repr__(self) -> str:
        client = "settings' backward client" if self.model_client is None else repr(
            f"{self.model_client.provider}/{self.model_client.model}"
        )
        return f"BackwardEngine(model_client={client}, completion_args={self.completion_args})"


class ComponentResponse(Variable):
    """The output of a traced GradComponent call, and the response its ``backward`` receives.

    Attributes:
        trace: What forward recorded: ``component``, ``input_args``, ``input_names``,
            ``sample_inputs`` (one dict per batch element) and ``full_response``.
        predecessors: The Variables the call took (in backward: detached copies whose ``grad``
            lists collect the gradients for the real inputs).
        backward_model: In backward, the component's backward engine as captured when the
            forward ran (``None``: no engine, so feedback passes through).
    """

    def __init__(
        self,
        data: Any,
        role: str,
        requires_grad: bool = False,
        *,
        trace: dict[str, Any],
        predecessors: Sequence[Variable] = (),
        backward_model: BackwardModel | None = None,
    ) -> None:
        super().__init__(data, role=role, requires_grad=requires_grad)
        self.trace = trace
        self.predecessors = list(predecessors)
        self.backward_model = backward_model


# ---------------------------------------------------------------------- argument handling
def _unwrap(value: Any, index: int | None = None) -> Any:
    """Replace Variables by their data (element ``index`` of batches when given)."""
    if isinstance(value, Variable):
        data = value.data
        if index is not None and value.is_batched:
            return data[index]
        return list(data) if isinstance(data, list) else data
    if isinstance(value, list):
        return [_unwrap(item, index) for item in value]
    if isinstance(value, tuple):
        return tuple(_unwrap(item, index) for item in value)
    if isinstance(value, dict):
        return {key: _unwrap(item, index) for key, item in value.items()}
    return value


def _like(value: Any, gradients: Iterator[Variable | None]) -> Any:
    """``value``'s structure with the next gradient where each Variable was, ``None`` elsewhere."""
    if isinstance(value, Variable):
        return next(gradients)
    if isinstance(value, (list, tuple)):
        return [_like(item, gradients) for item in value]
    if isinstance(value, dict):
        return {key: _like(item, gradients) for key, item in value.items()}
    return None


def _variable_names(args: tuple, kwargs: dict) -> list[str]:
    """A readable name for each Variable in the arguments, in flat order."""
    names: list[str] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, Variable):
            names.append(path)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}[{key!r}]")

    for i, arg in enumerate(args):
        walk(arg, f"arg_{i}")
    for key, arg in kwargs.items():
        walk(arg, key)
    return names


def _trace_inputs(args: tuple, kwargs: dict, index: int | None) -> OrderedDict[str, Any]:
    inputs: OrderedDict[str, Any] = OrderedDict()
    for i, arg in enumerate(args):
        inputs[f"arg_{i}"] = _unwrap(arg, index)
    for key, arg in kwargs.items():
        inputs[key] = _unwrap(arg, index)
    return inputs


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _detached_copy(variable: Variable) -> Variable:
    """A fresh leaf with ``variable``'s data, role, ``requires_grad`` (and parameter type)."""
    if isinstance(variable, Parameter):
        return Parameter(
            variable.data, role=variable.role, requires_grad=variable.requires_grad,
            param_type=variable.param_type, name=variable.name,
        )
    return Variable(variable.data, role=variable.role, requires_grad=variable.requires_grad)


def _reshape_feedback(feedback: Variable, target: Variable) -> Variable | None:
    """``feedback`` (shaped like the output) reshaped for ``target``; None if it is all empty."""
    data = feedback.data
    texts = data if isinstance(data, list) else [data]
    if not any(_text(text) for text in texts):
        return None
    role = gradient_role(target.role)
    if target.batch_size is None:
        return Variable(reduce_to_scalar(feedback), role=role)
    if feedback.batch_size is None:
        return Variable([_text(data)] * target.batch_size, role=role)
    if feedback.batch_size != target.batch_size:
        raise RuntimeError(
            f"feedback of batch size {feedback.batch_size} cannot be passed to the input with "
            f"role {target.role!r} of batch size {target.batch_size}"
        )
    return Variable([_text(text) for text in data], role=role)


def _collect(name: str, result: Any, predecessors: list[Variable]) -> list[Variable | None]:
    """One gradient per predecessor, from what a component's ``backward`` returned or appended."""
    if result is None:
        grads: list[Variable | None] = []
        for proxy in predecessors:
            if not proxy.grad:
                grads.append(None)
                continue
            for piece in proxy.grad:
                check_gradient_shape(proxy, piece, name)
            grads.append(combine_gradients(proxy.grad, proxy.role, proxy.batch_size))
        return grads
    if not isinstance(result, (list, tuple)) or len(result) != len(predecessors):
        raise RuntimeError(
            f"{name}: backward must return None (after appending to each "
            f"response.predecessors[i].grad) or one gradient per predecessor "
            f"({len(predecessors)}), got {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, (list, tuple)) else "")
        )
    for proxy, gradient in zip(predecessors, result):
        if gradient is not None:
            check_gradient_shape(proxy, gradient, name)
    return list(result)


# ---------------------------------------------------------------------- the recorded op
def _overrides(component_class: type, method: str) -> bool:
    return getattr(component_class, method) is not getattr(GradComponent, method)


def _runs_sync_backward(component_class: type) -> bool:
    """A component that overrides only a plain ``backward`` gets a synchronous node, which the
    engine runs off the event loop like any synchronous node that may block."""
    return (
        _overrides(component_class, "backward")
        and not _overrides(component_class, "abackward")
        and not inspect.iscoroutinefunction(component_class.backward)
    )


def _response(ctx: FunctionCtx, grad_output: Variable) -> ComponentResponse:
    response = ComponentResponse(
        ctx.data, ctx.role, requires_grad=True, trace=ctx.trace,
        predecessors=[_detached_copy(variable) for variable in ctx.inputs],
        backward_model=ctx.backward,
    )
    response.grad = [grad_output]
    return response


def _input_gradients(ctx: FunctionCtx, response: ComponentResponse, result: Any) -> tuple:
    """Backward's return value: the gradients collected from the response's predecessors,
    shaped like the ``args`` and ``kwargs`` the forward received."""
    name = f"{type(ctx.component).__name__}Backward"
    flat = iter(_collect(name, result, response.predecessors))
    return None, _like(list(ctx.args), flat), _like(ctx.kwargs, flat), None, None


class _ComponentCall(Function):
    """A traced component call whose ``backward`` override is plain (so its node is synchronous
    and the engine runs it off the loop, like any synchronous node that may block)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, component: Any, args: tuple, kwargs: dict, data: Any, trace: dict
    ) -> ComponentResponse:
        ctx.component, ctx.args, ctx.kwargs, ctx.data, ctx.trace = (
            component, args, kwargs, data, trace
        )
        ctx.inputs = list(flatten_variables([args, kwargs]))
        ctx.role, ctx.backward = f"{component.name} response", component._capture_engine()
        return ComponentResponse(data, ctx.role, trace=trace, predecessors=ctx.inputs)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: Variable) -> tuple:
        response = _response(ctx, grad_output)
        result = ctx.component.backward(
            response=response, id=ctx.kwargs.get("id"),
            disable_backward_engine=ctx.component.backward_engine_disabled,
        )
        return _input_gradients(ctx, response, result)


class _AsyncComponentCall(_ComponentCall):
    """A traced component call whose backward is awaited on the event loop. With the default
    ``abackward`` asking a backward engine, it streams: each input's gradient leaves as soon as
    its requests are answered."""

    @staticmethod
    async def backward(
        ctx: FunctionCtx, grad_output: Variable
    ) -> AsyncIterator[tuple[Any, Any]]:
        component, response = ctx.component, _response(ctx, grad_output)
        engine = response.backward_model
        own = type(component)
        if not (_overrides(own, "backward") or _overrides(own, "abackward") or engine is None
                or component.backward_engine_disabled):
            paths = [path for path, _ in variable_paths([ctx.args, ctx.kwargs])]
            async with contextlib.aclosing(
                component._engine_gradients(engine, response)
            ) as gradients:
                async for index, gradient in gradients:
                    # paths[index] is (0 or 1, ...) inside [args, kwargs]: arguments 1 and 2.
                    yield (paths[index][0] + 1, *paths[index][1:]), gradient
            return
        method = component.abackward
        if _overrides(own, "backward") and not _overrides(own, "abackward"):
            method = component.backward  # an ``async def backward`` override
        result = await method(
            response=response, id=ctx.kwargs.get("id"),
            disable_backward_engine=component.backward_engine_disabled,
        )
        for index, gradient in enumerate(_input_gradients(ctx, response, result)):
            if gradient is not None:
                yield index, gradient


_CALL_FUNCTIONS: weakref.WeakKeyDictionary[type, type[Function]] = weakref.WeakKeyDictionary()


def _call_function(component_class: type) -> type[Function]:
    """The Function recording calls of ``component_class`` (its node: ``<Class>Backward``)."""
    function = _CALL_FUNCTIONS.get(component_class)
    if function is None:
        base = _ComponentCall if _runs_sync_backward(component_class) else _AsyncComponentCall
        function = type(component_class.__name__, (base,), {"__module__": __name__})
        _CALL_FUNCTIONS[component_class] = function
    return function


# ---------------------------------------------------------------------- the component
class GradComponent(Module):
    """A module whose ``call`` is a step of the program that gradients can flow through.

    Override :meth:`call` (and/or the async :meth:`acall`). ``__call__`` runs :meth:`forward` in
    training mode (a traced Variable comes back) and :meth:`call` in eval mode (plain values).
    A component sees one sample at a time: when an argument is a batched Variable, ``call``
    runs once per element (concurrently through ``acall`` when defined) and the output is a
    batch of the same length; pass ``elementwise=False`` to receive whole lists instead.

    Args:
        desc: What the component does (quoted in gradient prompts).
        name: Display name (default: the class name).
        backward_engine: A :class:`BackwardEngine` that writes gradients.
        model_client: Shortcut for ``BackwardEngine(model_client, model_kwargs)``.
        model_kwargs: Completion arguments for that engine.
        elementwise: Call once per batch element (default) or once with whole lists.

    Attributes:
        id: An identifier of your choosing (AdalFlow's ``id``; default ``None``).

    Example:
        >>> import afnio
        >>> class Shout(GradComponent):
        ...     def call(self, text):
        ...         return text.upper()
        >>> shout = Shout("Upper-cases the text")
        >>> x = afnio.Variable(["hi", "yo"], role="greetings", requires_grad=True)
        >>> out = shout(x)
        >>> out.data, out.grad_fn.name()
        (['HI', 'YO'], 'ShoutBackward')
        >>> shout.eval()("hi")
        'HI'
    """

    def __init__(
        self,
        desc: str = "",
        name: str | None = None,
        backward_engine: BackwardEngine | None = None,
        model_client: ChatCompletionModel | None = None,
        model_kwargs: dict[str, Any] | None = None,
        *,
        elementwise: bool = True,
    ) -> None:
        super().__init__()
        self.desc = desc
        self.name = name or type(self).__name__
        self.id: Any = None
        self.elementwise = elementwise
        self.backward_engine: BackwardEngine | None = None
        self._disable_backward_engine = False
        if backward_engine is not None or model_client is not None or model_kwargs is not None:
            self.set_backward_engine(backward_engine, model_client, model_kwargs)

    # ------------------------------------------------------------------ engine settings
    def set_backward_engine(
        self,
        backward_engine: BackwardEngine | None = None,
        model_client: ChatCompletionModel | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Choose the model that writes this component's gradients.

        Give a ready :class:`BackwardEngine`, or a client (and completion arguments) to build
        one; with neither, the engine uses the settings' backward model client, read when a
        forward runs.

        Raises:
            TypeError: If ``backward_engine`` is not a BackwardEngine.
            ValueError: If both an engine and a client/arguments are given.
        """
        if backward_engine is not None:
            if not isinstance(backward_engine, BackwardEngine):
                raise TypeError(
                    f"{self.name}.set_backward_engine: argument 'backward_engine' must be a "
                    f"BackwardEngine, got {type(backward_engine).__name__}"
                )
            if model_client is not None or model_kwargs is not None:
                raise ValueError(
                    f"{self.name}.set_backward_engine: give either 'backward_engine' or "
                    "'model_client'/'model_kwargs', not both"
                )
            self.backward_engine = backward_engine
        else:
            self.backward_engine = BackwardEngine(model_client, model_kwargs)

    def disable_backward_engine(self) -> None:
        """Stop asking a model for gradients: backward still runs, passing feedback through."""
        self._disable_backward_engine = True

    def enable_backward_engine(self) -> None:
        """Undo :meth:`disable_backward_engine`."""
        self._disable_backward_engine = False

    @property
    def backward_engine_disabled(self) -> bool:
        """Whether :meth:`disable_backward_engine` is in effect."""
        return self._disable_backward_engine

    def _capture_engine(self) -> BackwardModel | None:
        """The backward model for a call traced now (``None``: feedback passes through)."""
        if self.backward_engine is not None:
            return self.backward_engine.capture()
        captured = BackwardModel.capture()
        return captured if captured.client is not None else None

    # ------------------------------------------------------------------ forward
    def call(self, *args: Any, **kwargs: Any) -> Any:
        """The component's computation on plain values. Override this or :meth:`acall`.

        Raises:
            RuntimeError: If the subclass defines neither ``call`` nor ``acall``.
        """
        if self._has_async_call():
            return run(self.acall(*args, **kwargs))
        raise RuntimeError(
            f"{type(self).__name__} defines neither call nor acall; override one of them"
        )

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """Async twin of :meth:`call`; the default runs ``call`` in a worker thread, so a
        ``call`` that blocks never stalls the event loop."""
        return await asyncio.to_thread(self.call, *args, **kwargs)

    def _has_async_call(self) -> bool:
        return _overrides(type(self), "acall")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        def dispatch(*args: Any, **kwargs: Any) -> Any:
            if self.training:
                return self.forward(*args, **kwargs)
            size = self._batch_size(list(flatten_variables([args, kwargs])))
            return self._run_calls(args, kwargs, size)

        return self._call_with_hooks(dispatch, args, kwargs)  # Module's forward (pre-)hooks

    def _batch_size(self, variables: list[Variable]) -> int | None:
        if not self.elementwise:
            return None
        return broadcast_size(self.name, variables)

    def _run_calls(self, args: tuple, kwargs: dict, size: int | None) -> Any:
        """Unwrap the arguments and run ``call`` once, or once per element of a batch of
        ``size`` (see :meth:`_batch_size`)."""
        indices = [None] if size is None else list(range(size))
        calls = [(_unwrap(args, i), _unwrap(kwargs, i)) for i in indices]
        with no_grad():
            if self._has_async_call():
                results = run(gather_all([self.acall(*a, **k) for a, k in calls]))
            else:
                results = [self.call(*a, **k) for a, k in calls]
        return results[0] if size is None else results

    def forward(self, *args: Any, **kwargs: Any) -> Variable:
        """Run the component and trace it.

        Variables among the arguments (also inside lists, tuples and dicts) are unwrapped to
        their data and become the output's predecessors; the output records a ``trace``
        (``input_args``, ``full_response``, and per-sample ``sample_inputs``).

        Returns:
            A :class:`ComponentResponse` holding what ``call`` returned. Under grad mode with an
            input that requires grad, its ``grad_fn`` is this component's backward node.

        Raises:
            TypeError: If ``call`` returns something a Variable cannot hold.
            ValueError: If batched arguments differ in length.
        """
        variables = list(flatten_variables([args, kwargs]))
        size = self._batch_size(variables)
        result = self._run_calls(args, kwargs, size)
        if isinstance(result, Variable) or (
            isinstance(result, list) and any(isinstance(item, Variable) for item in result)
        ):
            raise TypeError(
                f"{self.name}: call must return plain values, not Variables; forward wraps them"
            )
        try:
            data = validate_data(result, f"{self.name} response")
        except TypeError as exc:
            raise TypeError(
                f"{self.name}: in training mode call must return a str, int, float or a list of "
                f"them (other values are fine in eval mode): {exc}"
            ) from None
        indices = [None] if size is None else list(range(size))
        trace = {
            "component": self.name,
            "input_args": _trace_inputs(args, kwargs, None),
            "input_names": _variable_names(args, kwargs),
            "sample_inputs": [_trace_inputs(args, kwargs, i) for i in indices],
            "full_response": result,
        }
        return _call_function(type(self)).apply(self, args, kwargs, data, trace)

    # ------------------------------------------------------------------ backward
    def backward_with_pass_through_gradients(
        self, *, response: Variable, id: Any = None, **kwargs: Any
    ) -> None:
        """Give every predecessor that requires grad the output's feedback, unchanged.

        Feedback on a batched output reaching a scalar input is joined with sample labels;
        empty feedback passes nothing.
        """
        if not response.grad:
            return
        feedback = combine_gradients(response.grad, response.role, response.batch_size)
        for predecessor in response.predecessors:
            if predecessor.requires_grad:
                gradient = _reshape_feedback(feedback, predecessor)
                if gradient is not None:
                    predecessor.grad.append(gradient)

    async def abackward(
        self,
        *,
        response: ComponentResponse,
        id: Any = None,
        disable_backward_engine: bool = False,
        **kwargs: Any,
    ) -> None:
        """Async twin of :meth:`backward` (what the backward node awaits by default)."""
        engine = response.backward_model
        if disable_backward_engine or self._disable_backward_engine or engine is None:
            return self.backward_with_pass_through_gradients(response=response, id=id, **kwargs)
        async with contextlib.aclosing(self._engine_gradients(engine, response)) as gradients:
            async for index, gradient in gradients:
                if gradient is not None:
                    response.predecessors[index].grad.append(gradient)
        return None

    async def _engine_gradients(
        self, engine: BackwardModel, response: ComponentResponse
    ) -> AsyncIterator[tuple[int, Variable | None]]:
        """``(predecessor index, gradient)`` for every predecessor that requires grad, each as
        soon as the engine's answers about it are in (all requests run concurrently)."""
        if not response.grad:
            return
        combined = combine_gradients(response.grad, response.role, response.batch_size)
        feedback = OutputFeedback(
            engine,
            [_text(text) for text in _texts(combined)],
            lambda parts: _messages(fill_prompt(
                autodiff_prompts.CONDENSE_OUTPUT_FEEDBACK_PROMPT,
                {"output_role": response.role, "parts": parts},
            )),
        )
        wanted = [i for i, p in enumerate(response.predecessors) if p.requires_grad]
        if wanted and feedback.live:
            engine.require(f"{self.name} backward")
        requests = [
            self._engine_gradient(engine, response, feedback, response.predecessors[i])
            for i in wanted
        ]
        async with contextlib.aclosing(as_finished(requests)) as finished:
            async for position, gradient in finished:
                yield wanted[position], gradient

    def backward(
        self,
        *,
        response: ComponentResponse,
        id: Any = None,
        disable_backward_engine: bool = False,
        **kwargs: Any,
    ) -> None:
        """Compute gradients for the predecessors of ``response``.

        With a backward engine (this component's, or the settings' backward model client when
        the forward ran) and the engine not disabled, the engine is asked — concurrently for
        every predecessor that requires grad — how that input should change given the output's
        feedback: once per batch element with feedback for a batched input, once over all
        samples (split into chunks only when the prompt would not fit) for a scalar input or
        scalar feedback. Otherwise the feedback passes through
        (:meth:`backward_with_pass_through_gradients`).

        Args:
            response: The output: ``response.grad`` holds its feedback,
                ``response.predecessors`` copies of the inputs (append gradients to their
                ``grad``), ``response.trace`` the forward trace.
            id: The data id given to forward as ``id=``, if any.
            disable_backward_engine: Pass feedback through instead of asking the engine.
        """
        return run(
            self.abackward(
                response=response, id=id, disable_backward_engine=disable_backward_engine,
                **kwargs,
            )
        )

    async def _engine_gradient(
        self, engine: BackwardModel, response: ComponentResponse, feedback: OutputFeedback,
        target: Variable,
    ) -> Variable | None:
        """Ask ``engine`` for ``target``'s gradient: per element when target and feedback are
        both batched, else one request over all samples (copied to every element of a batched
        target); samples without feedback cost nothing."""
        live = feedback.live
        if not live:
            return None
        role = gradient_role(target.role)
        requests = _ComponentRequests(self, response, target)
        what = f"{self.name} backward for the input with role {target.role!r}"
        if target.batch_size is None or response.batch_size is None:
            text = await shared_gradient(engine, requests, feedback, live, what)
            return Variable(text if target.batch_size is None else [text] * target.batch_size,
                            role=role)
        texts = await gather_all(
            [element_gradient(engine, requests, feedback, i, what) for i in live]
        )
        data = [""] * target.batch_size
        for i, text in zip(live, texts):
            data[i] = text
        return Variable(data, role=role)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, desc={self.desc!r}"


class _ComponentRequests(GradientPrompts):
    """The gradient requests about one input of a traced component call."""

    def __init__(
        self, component: GradComponent, response: ComponentResponse, target: Variable
    ) -> None:
        self.component, self.response, self.target = component, response, target
        trace = response.trace
        self.names = trace.get("input_names", [])
        position = next(i for i, p in enumerate(response.predecessors) if p is target)
        self.name = self.names[position] if position < len(self.names) else f"input_{position}"
        size = 1 if response.batch_size is None else response.batch_size
        samples = trace.get("sample_inputs") or [trace.get("input_args", {})]
        self.samples = samples if len(samples) == size else [trace.get("input_args", {})] * size
        self.outputs = [response.data] if response.batch_size is None else list(response.data)
        # Inputs equal in every sample (shared scalars such as a doc_string) are shown once.
        first = self.samples[0]
        self.shared_keys = [
            key for key in first if all(s.get(key) == first[key] for s in self.samples)
        ] if len(self.samples) > 1 else []

    def _role_of(self, key: str) -> str:
        for position, name in enumerate(self.names):
            if name == key:
                return self.response.predecessors[position].role or "no role given"
        return "constant"

    def _inputs(self, sample: Mapping[str, Any], keys: Sequence[str]) -> str:
        return "\n".join(
            fill_template(
                prompts.COMPONENT_INPUT,
                {"name": key, "role": self._role_of(key), "value": _text(sample[key])},
            )
            for key in keys
        )

    def _request(self, blocks: list[str], value: Any) -> list[dict[str, str]]:
        target, component = self.target, self.component
        kind = ""
        if isinstance(target, Parameter) and target.param_type is not ParameterType.NONE:
            kind = f", a {target.param_type.value} parameter"
        if self.shared_keys:
            shared = self._inputs(self.samples[0], self.shared_keys)
            blocks = [fill_template(prompts.COMPONENT_SHARED_INPUTS, {"inputs": shared}), *blocks]
        return _messages(fill_template(
            prompts.COMPONENT_GRADIENT_PROMPT,
            {
                "component": component.name,
                "description": component.desc or "(no description)",
                "output_role": self.response.role,
                "samples": "\n\n".join(blocks),
                "target": fill_template(
                    prompts.COMPONENT_TARGET,
                    {"name": self.name, "role": target.role or "no role given", "kind": kind,
                     "value": _text(value)},
                ),
            },
        ))

    def sample(self, position: int, feedback: str) -> str:
        varying = [key for key in self.samples[position] if key not in self.shared_keys]
        return fill_template(
            prompts.COMPONENT_SAMPLE,
            {"index": str(position), "inputs": self._inputs(self.samples[position], varying),
             "output": _text(self.outputs[position]), "feedback": feedback},
        )

    def element(self, position: int | None, feedback: str) -> list[dict[str, str]]:
        index = 0 if position is None else position
        value = self.target.data[index] if self.target.is_batched else self.target.data
        return self._request([self.sample(index, feedback)], value)

    def shared(self, samples: list[str]) -> list[dict[str, str]]:
        return self._request(samples, self.target.data)

    def merge(self, parts: str) -> list[dict[str, str]]:
        return _messages(fill_template(
            prompts.COMPONENT_REDUCE_PROMPT,
            {"role": self.target.role or "no role given", "parts": parts},
        ))


def _texts(feedback: Variable) -> list[Any]:
    data = feedback.data
    return list(data) if isinstance(data, list) else [data]


def _messages(user: str) -> list[dict[str, str]]:
    system = fill_prompt(prompts.COMPONENT_GRADIENT_SYSTEM_PROMPT)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class FunGradComponent(GradComponent):
    """A GradComponent made from a plain or async function.

    Args:
        fun: The function ``call`` runs.
        afun: An async function ``acall`` awaits (batch elements then run concurrently).
        desc: What the function does (default: its docstring, else ``"Function: <name>"``).
        doc_string: The function's instructions. A :class:`Parameter` here is registered as
            ``doc_string``, passed to every traced call as a predecessor (so it receives
            gradients) and quoted in gradient prompts; it is not passed to the function.
        elementwise: Call once per batch element (default) or once with whole lists.

    Example:
        >>> double = FunGradComponent(fun=lambda x: 2 * x, desc="Doubles")
        >>> double(3).data
        6
    """

    def __init__(
        self,
        fun: Callable[..., Any] | None = None,
        afun: Callable[..., Any] | None = None,
        desc: str = "",
        doc_string: Parameter | Variable | str | None = None,
        *,
        elementwise: bool = True,
    ) -> None:
        if fun is None and afun is None:
            raise TypeError("FunGradComponent: give a function as 'fun' or 'afun'")
        if fun is not None and not callable(fun):
            raise TypeError(f"FunGradComponent: 'fun' must be callable, got {type(fun).__name__}")
        if afun is not None and not inspect.iscoroutinefunction(afun):
            raise TypeError("FunGradComponent: 'afun' must be an async function (async def)")
        base = fun if fun is not None else afun
        fun_name = getattr(base, "__name__", type(base).__name__)
        super().__init__(
            desc=desc or inspect.getdoc(base) or f"Function: {fun_name}",
            name=fun_name,
            elementwise=elementwise,
        )
        self.register_function("fun", fun)
        self.register_function("afun", afun)
        if isinstance(doc_string, Parameter):
            self.doc_string = doc_string
        elif isinstance(doc_string, Variable):
            self.register_buffer("doc_string", doc_string)
        elif doc_string is None or isinstance(doc_string, str):
            object.__setattr__(self, "doc_string", doc_string)
        else:
            raise TypeError(
                "FunGradComponent: 'doc_string' must be a Parameter, Variable, str or None, got "
                f"{type(doc_string).__name__}"
            )
        object.__setattr__(self, "__wrapped__", base)
        object.__setattr__(self, "__name__", fun_name)
        doc = doc_string.data if isinstance(doc_string, Variable) else doc_string
        object.__setattr__(self, "__doc__", doc or inspect.getdoc(base))

    def _has_async_call(self) -> bool:
        return self.afun is not None

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped function (the traced ``doc_string`` argument is not passed on)."""
        kwargs.pop("doc_string", None)
        if self.fun is not None:
            return self.fun(*args, **kwargs)
        return run(self.afun(*args, **kwargs))

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """Await the wrapped async function (or run the plain one in a worker thread)."""
        if self.afun is None:
            return await super().acall(*args, **kwargs)
        kwargs.pop("doc_string", None)
        return await self.afun(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Variable:
        """Trace a call; a Variable ``doc_string`` joins the predecessors (last, as a keyword)."""
        if isinstance(self.doc_string, Variable):
            kwargs = {**kwargs, "doc_string": self.doc_string}
        return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"fun_name={self.name!r}, desc={self.desc!r}"


def fun_to_grad_component(
    desc: str = "", doc_string: Parameter | Variable | str | None = None
) -> Callable[[Callable[..., Any]], FunGradComponent]:
    """Turn a function into a :class:`FunGradComponent`; use as a decorator or call it.

    The component's class is named after the function (``my_function`` ->
    ``MyFunctionGradComponent``); an ``async def`` function becomes an async component.

    Args:
        desc: What the function does.
        doc_string: The function's instructions; a Parameter becomes trainable (see
            :class:`FunGradComponent`).

    Example:
        >>> def my_function(x):
        ...     return x + 1
        >>> component = fun_to_grad_component(desc="Adds one")(my_function)
        >>> component(1).data, component.eval()(1)
        (2, 2)
    """

    def decorator(fun: Callable[..., Any]) -> FunGradComponent:
        base_name = getattr(fun, "__name__", "function")
        class_name = "".join(part.capitalize() for part in base_name.split("_")) + "GradComponent"
        is_async = inspect.iscoroutinefunction(fun)

        def __init__(self: FunGradComponent) -> None:
            FunGradComponent.__init__(
                self,
                fun=None if is_async else fun,
                afun=fun if is_async else None,
                desc=desc,
                doc_string=doc_string,
            )

        component_class = type(
            class_name,
            (FunGradComponent,),
            {"__init__": __init__, "__module__": getattr(fun, "__module__", __name__)},
        )
        return component_class()

    return decorator

"""GradComponent: a module whose plain Python ``call`` takes part in textual backpropagation.

In training mode, calling a component runs :meth:`GradComponent.forward`: Variable arguments are
unwrapped to their data, :meth:`~GradComponent.call` runs (once per batch element, concurrently
through :meth:`~GradComponent.acall` when the component defines it), and the result comes back
as a Variable whose ``grad_fn`` is a ``<ComponentClass>Backward`` node with the Variable
arguments as predecessors. In eval mode the component is just its ``call``: Variables in, plain
values out.

During ``backward`` the node hands the component a *response* Variable (same data and role as
the output, its ``grad`` holding the combined feedback, ``response.predecessors`` holding fresh
copies of the inputs) and calls :meth:`GradComponent.backward`. Whatever the component appends
to those copies' ``grad`` lists (or returns, one entry per predecessor) becomes the gradient
the engine delivers to the real inputs — so gradients reach leaves only through the engine, in
its deterministic order.

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
import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from afnio._runtime import run
from afnio._variable import Variable, check_gradient_shape, validate_data
from afnio.autodiff import prompts as autodiff_prompts
from afnio.autodiff._feedback import (
    ask,
    chunk_by_budget,
    gather_all,
    get_gradient_token_budget,
    merge_in_rounds,
    parse_feedback,
)
from afnio.autodiff.basic_ops import broadcast_size
from afnio.autodiff.function import flatten_variables
from afnio.autodiff.grad_mode import is_grad_enabled, no_grad
from afnio.autodiff.graph import (
    FREED_GRAPH_MESSAGE,
    Node,
    combine_gradients,
    empty_gradient,
    gradient_edge,
    gradient_role,
    reduce_to_scalar,
)
from afnio.cognitive import prompts
from afnio.cognitive.modules.module import Module
from afnio.cognitive.parameter import Parameter, ParameterType
from afnio.models.model import ChatCompletionModel
from afnio.models.registry import (
    get_backward_model_client,
    get_backward_model_completion_args,
)
from afnio.models.tokens import count_message_tokens, count_tokens

__all__ = [
    "BackwardEngine",
    "FunGradComponent",
    "GradComponent",
    "GradComponentBackward",
    "fun_to_grad_component",
]


class BackwardEngine:
    """The model that writes a GradComponent's gradients: a client plus completion arguments.

    Args:
        model_client: The client to ask. ``None`` means the global backward model client
            (:func:`afnio.models.registry.set_backward_model_client`) at backward time.
        completion_args: Arguments sent with every request (added to the global backward
            completion arguments when the global client is used).
        max_attempts: How many times a request is sent before a reply without
            ``<FEEDBACK>...</FEEDBACK>`` is an error.

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
        max_attempts: int = 2,
    ) -> None:
        if model_client is not None and not isinstance(model_client, ChatCompletionModel):
            raise TypeError(
                "BackwardEngine: argument 'model_client' must be a ChatCompletionModel or None, "
                f"got {type(model_client).__name__}"
            )
        if max_attempts < 1:
            raise ValueError(f"BackwardEngine: max_attempts must be at least 1, got {max_attempts}")
        self.model_client = model_client
        self.completion_args = dict(completion_args or {})
        self.max_attempts = max_attempts

    def resolve(self) -> tuple[ChatCompletionModel, dict[str, Any]]:
        """The client and completion arguments to use now.

        Raises:
            RuntimeError: If the engine has no client and no global backward client is set.
        """
        if self.model_client is not None:
            return self.model_client, dict(self.completion_args)
        client = get_backward_model_client()
        if client is None:
            raise RuntimeError(
                "BackwardEngine: no model client; pass one to "
                "set_backward_engine(model_client=...) or call "
                "afnio.models.registry.set_backward_model_client(...)"
            )
        return client, {**get_backward_model_completion_args(), **self.completion_args}

    async def afeedback(self, messages: list[dict[str, Any]]) -> str:
        """Ask for feedback and return it: the text between the ``<FEEDBACK>`` tags (or a JSON
        object's ``"feedback"``), retrying with a correction after a reply that has neither.

        Raises:
            ValueError: If no reply within ``max_attempts`` can be read: an
                :class:`afnio.autodiff.ReplyParseError` quoting the last reply.
        """
        client, completion_args = self.resolve()
        return await ask(
            client,
            messages,
            completion_args,
            parse_feedback,
            prompts.COMPONENT_FEEDBACK_FORMAT_CORRECTION,
            "BackwardEngine: the backward model's reply has no <FEEDBACK>...</FEEDBACK>",
            retries=self.max_attempts - 1,
        )

    def model_name(self) -> str | None:
        """The model name used for token counting (``None`` when no client is available)."""
        client = self.model_client or get_backward_model_client()
        return (client.model or None) if client is not None else None

    def feedback(self, messages: list[dict[str, Any]]) -> str:
        """Synchronous twin of :meth:`afeedback`."""
        return run(self.afeedback(messages))

    def __repr__(self) -> str:
        client = "global backward client" if self.model_client is None else repr(
            f"{self.model_client.provider}/{self.model_client.model}"
        )
        return f"BackwardEngine(model_client={client}, completion_args={self.completion_args})"


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


def _proxy(variable: Variable) -> Variable:
    """A detached copy of ``variable`` (same class, role and metadata) with an empty ``grad``."""
    proxy = object.__new__(type(variable))
    proxy.__dict__.update(variable.__dict__)
    proxy._data = list(variable.data) if variable.is_batched else variable.data
    proxy.grad = []
    proxy.grad_fn = None
    proxy.output_nr = 0
    proxy._grad_accumulator = None
    proxy._retains_grad = False
    return proxy


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


def _system_prompt() -> str:
    """The system message of every gradient request, with the feedback length bound shared
    with the LM ops (:data:`afnio.autodiff.prompts.MAX_FEEDBACK_SENTENCES`, read at call time)."""
    return prompts.COMPONENT_GRADIENT_SYSTEM_PROMPT.format(
        max_sentences=autodiff_prompts.MAX_FEEDBACK_SENTENCES
    )


# ---------------------------------------------------------------------- the graph node
class GradComponentBackward(Node):
    """The backward node of one GradComponent forward call.

    ``name()`` is ``<ComponentClass>Backward``. Its predecessors (``next_functions``) are the
    Variables among the call's arguments, in flat order (positional arguments, then keyword
    arguments, containers depth-first).
    """

    is_async = True

    def __init__(
        self,
        component: GradComponent,
        inputs: list[Variable],
        output: Variable,
        data_id: Any = None,
    ) -> None:
        super().__init__([gradient_edge(variable) for variable in inputs], [output])
        self.component = component
        self.inputs = inputs
        self.data_id = data_id
        self._output_data = list(output.data) if output.is_batched else output.data
        self._output_role = output.role
        self.trace: dict[str, Any] = output.trace
        self._name = f"{type(component).__name__}Backward"

    def name(self) -> str:
        return self._name

    def release(self) -> None:
        super().release()
        self.inputs = []
        self.trace = {}

    def apply(self, grad_outputs: list[Variable | None]) -> list[Variable | None]:
        return run(self.aapply(grad_outputs))

    async def aapply(self, grad_outputs: list[Variable | None]) -> list[Variable | None]:
        if self.freed:
            raise RuntimeError(FREED_GRAPH_MESSAGE)
        grad = grad_outputs[0] if grad_outputs else None
        if grad is None:
            grad = empty_gradient(*self.output_meta[0])
        predecessors = [_proxy(variable) for variable in self.inputs]
        response = Variable(self._output_data, role=self._output_role, requires_grad=True)
        response.grad = [grad]
        response.predecessors = predecessors
        response.trace = self.trace
        component = self.component
        disabled = component.backward_engine_disabled
        if _overrides(component, "backward") and not _overrides(component, "abackward"):
            arguments = {
                "response": response, "id": self.data_id, "disable_backward_engine": disabled
            }
            if inspect.iscoroutinefunction(component.backward):
                result = await component.backward(**arguments)
            else:
                # A synchronous override runs in a worker thread so that it does not block the
                # loop other nodes (and its own nested model calls) run on.
                result = await asyncio.to_thread(component.backward, **arguments)
                if inspect.isawaitable(result):
                    result = await result
        else:
            result = await component.abackward(
                response=response, id=self.data_id, disable_backward_engine=disabled
            )
        return self._collect(result, predecessors)

    def _collect(self, result: Any, predecessors: list[Variable]) -> list[Variable | None]:
        where = self._name
        if result is None:
            grads: list[Variable | None] = []
            for proxy in predecessors:
                if not proxy.grad:
                    grads.append(None)
                    continue
                for piece in proxy.grad:
                    check_gradient_shape(proxy, piece, where)
                grads.append(combine_gradients(proxy.grad, proxy.role, proxy.batch_size))
            return grads
        if not isinstance(result, (list, tuple)) or len(result) != len(predecessors):
            raise RuntimeError(
                f"{where}: backward must return None (after appending to each "
                f"response.predecessors[i].grad) or one gradient per predecessor "
                f"({len(predecessors)}), got {type(result).__name__}"
                + (f" of length {len(result)}" if isinstance(result, (list, tuple)) else "")
            )
        for proxy, gradient in zip(predecessors, result):
            if gradient is not None:
                check_gradient_shape(proxy, gradient, where)
        return list(result)


def _overrides(component: GradComponent, method: str) -> bool:
    return getattr(type(component), method) is not getattr(GradComponent, method)


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
        one; with neither, the engine uses the global backward model client at backward time.

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

    def _resolve_engine(self) -> BackwardEngine | None:
        if self.backward_engine is not None:
            return self.backward_engine
        if get_backward_model_client() is not None:
            return BackwardEngine()
        return None

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
        """Async twin of :meth:`call`; the default runs ``call``."""
        return self.call(*args, **kwargs)

    def _has_async_call(self) -> bool:
        return _overrides(self, "acall")

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
            A Variable holding what ``call`` returned. Under grad mode with an input that
            requires grad, its ``grad_fn`` is this component's backward node.

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
        output = Variable(data, role=f"{self.name} response")
        indices = [None] if size is None else list(range(size))
        output.trace = {
            "component": self.name,
            "input_args": _trace_inputs(args, kwargs, None),
            "input_names": _variable_names(args, kwargs),
            "sample_inputs": [_trace_inputs(args, kwargs, i) for i in indices],
            "full_response": result,
        }
        if is_grad_enabled() and any(variable.requires_grad for variable in variables):
            node = GradComponentBackward(self, variables, output, data_id=kwargs.get("id"))
            output.grad_fn = node
            output.output_nr = 0
            output._requires_grad = True
        return output

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
        response: Variable,
        id: Any = None,
        disable_backward_engine: bool = False,
        **kwargs: Any,
    ) -> None:
        """Async twin of :meth:`backward` (what the backward node awaits by default)."""
        engine = None
        if not (disable_backward_engine or self._disable_backward_engine):
            engine = self._resolve_engine()
        if engine is None:
            return self.backward_with_pass_through_gradients(response=response, id=id, **kwargs)
        if not response.grad:
            return None
        feedback = combine_gradients(response.grad, response.role, response.batch_size)
        wanted = [p for p in response.predecessors if p.requires_grad]
        gradients = await gather_all(
            [self._engine_gradient(engine, response, feedback, p) for p in wanted]
        )
        for predecessor, gradient in zip(wanted, gradients):
            if gradient is not None:
                predecessor.grad.append(gradient)
        return None

    def backward(
        self,
        *,
        response: Variable,
        id: Any = None,
        disable_backward_engine: bool = False,
        **kwargs: Any,
    ) -> None:
        """Compute gradients for the predecessors of ``response``.

        With a backward engine (this component's, or the global backward model client) and the
        engine not disabled, the engine is asked — concurrently for every predecessor that
        requires grad — how that input should change given the output's feedback: once per
        batch element with feedback for a batched input, once over all samples (split into
        token-budget chunks only when needed) for a scalar input or scalar feedback. Otherwise
        the feedback passes through (:meth:`backward_with_pass_through_gradients`).

        Args:
            response: The output Variable: ``response.grad`` holds its feedback,
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
        self, engine: BackwardEngine, response: Variable, feedback: Variable, target: Variable
    ) -> Variable | None:
        """Ask ``engine`` for ``target``'s gradient: per element when target and feedback are
        both batched, else one request over all samples (copied to every element of a batched
        target); samples without feedback cost nothing."""
        trace = response.trace
        names = trace.get("input_names", [])
        position = next(i for i, p in enumerate(response.predecessors) if p is target)
        name = names[position] if position < len(names) else f"input_{position}"
        samples = trace.get("sample_inputs") or [trace.get("input_args", {})]
        if feedback.batch_size is None:
            texts = [_text(feedback.data)]
            outputs = [response.data]
        else:
            texts = [_text(text) for text in feedback.data]
            outputs = list(response.data)
        if len(samples) != len(texts):
            samples = [trace.get("input_args", {})] * len(texts)
        live = [i for i, text in enumerate(texts) if text]
        if not live:
            return None
        role = gradient_role(target.role)

        # Inputs equal in every sample (shared scalars such as a doc_string) are shown once.
        shared_keys = (
            [key for key in samples[0] if all(s.get(key) == samples[0][key] for s in samples)]
            if len(samples) > 1
            else []
        )

        def describe(sample: Mapping[str, Any], keys: Sequence[str]) -> str:
            return "\n".join(
                prompts.COMPONENT_INPUT.format(
                    name=key, role=self._input_role(key, response, names), value=_text(sample[key])
                )
                for key in keys
            )

        shared_blocks = (
            [prompts.COMPONENT_SHARED_INPUTS.format(inputs=describe(samples[0], shared_keys))]
            if shared_keys
            else []
        )
        kind = ""
        if isinstance(target, Parameter) and target.param_type is not ParameterType.NONE:
            kind = f", a {target.param_type.value} parameter"
        system = _system_prompt()

        def render(indices: list[int], value: Any) -> list[dict[str, str]]:
            blocks = list(shared_blocks)
            for i in indices:
                varying = [key for key in samples[i] if key not in shared_keys]
                blocks.append(
                    prompts.COMPONENT_SAMPLE.format(
                        index=i,
                        inputs=describe(samples[i], varying),
                        output=_text(outputs[i]),
                        feedback=texts[i],
                    )
                )
            rendered = "\n\n".join(blocks)
            user = prompts.COMPONENT_GRADIENT_PROMPT.format(
                component=self.name,
                description=self.desc or "(no description)",
                output_role=response.role,
                samples=rendered,
                target=prompts.COMPONENT_TARGET.format(
                    name=name, role=target.role or "no role given", kind=kind, value=_text(value)
                ),
            )
            return [{"role": "system", "content": system}, {"role": "user", "content": user}]

        if target.batch_size is None or feedback.batch_size is None:
            text = await self._shared_feedback(engine, target, live, render)
            if target.batch_size is None:
                return Variable(text, role=role)
            return Variable([text] * target.batch_size, role=role)
        replies = await gather_all(
            [engine.afeedback(render([i], target.data[i])) for i in live]
        )
        data = [""] * target.batch_size
        for i, text in zip(live, replies):
            data[i] = text
        return Variable(data, role=role)

    async def _shared_feedback(
        self,
        engine: BackwardEngine,
        target: Variable,
        live: list[int],
        render: Callable[[list[int], Any], list[dict[str, str]]],
    ) -> str:
        """One request over all samples with feedback, split into token-budget chunks only when
        the prompt would pass the gradient token budget; chunk answers are then merged."""
        budget = get_gradient_token_budget()
        model = engine.model_name()
        if len(live) == 1:
            # One sample is never split, so skip measuring the prompt (the costly part).
            groups = [[0]]
        else:
            base = count_message_tokens(render([], target.data), model)
            sizes = [
                count_message_tokens(render([i], target.data), model) - base + 2 for i in live
            ]
            groups = chunk_by_budget(base, sizes, budget)
        texts = await gather_all(
            [engine.afeedback(render([live[k] for k in group], target.data)) for group in groups]
        )
        texts = [text for text in texts if text]
        if len(texts) <= 1:
            return texts[0] if texts else ""
        return await merge_in_rounds(
            texts,
            render_part=lambda number, text: prompts.COMPONENT_REDUCE_PART.format(
                number=number, text=text
            ),
            part_tokens=lambda part: count_tokens(part, model) + 2,
            base_tokens=count_message_tokens(self._reduce_messages(target, []), model),
            budget=budget,
            merge=lambda parts: engine.afeedback(self._reduce_messages(target, parts)),
        )

    @staticmethod
    def _reduce_messages(target: Variable, parts: list[str]) -> list[dict[str, str]]:
        system = _system_prompt()
        user = prompts.COMPONENT_REDUCE_PROMPT.format(
            role=target.role or "no role given", parts="\n".join(parts)
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    @staticmethod
    def _input_role(key: str, response: Variable, names: list[str]) -> str:
        for position, name in enumerate(names):
            if name == key:
                return response.predecessors[position].role or "no role given"
        return "constant"

    def extra_repr(self) -> str:
        return f"name={self.name!r}, desc={self.desc!r}"


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
        """Await the wrapped async function (or run the plain one)."""
        kwargs.pop("doc_string", None)
        if self.afun is not None:
            return await self.afun(*args, **kwargs)
        return self.fun(*args, **kwargs)

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

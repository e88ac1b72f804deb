"""Language-model calls you can backpropagate through: :class:`ChatCompletion`.

Messages are ``[{"role": ..., "content": [Variable, ...]}, ...]``. A message's content parts are
joined with a newline, then ``{name}`` placeholders are filled from ``inputs``:

* ``{name}`` (``name`` a Python identifier) is a placeholder;
* ``{{name}}`` is the literal text ``{name}``;
* every other brace is literal — JSON examples in a prompt need no escaping;
* filled-in values are inserted verbatim and never scanned for placeholders themselves.

An input is a ``str``, a ``list`` of ``str`` (a batch), a Variable (scalar or batch), or a list
of scalar Variables, which forms a batch whose element ``i`` is the ``i``-th Variable (each gets
its own gradient). Any batched content or input makes a batched call: one request per element,
all in flight at once. A scalar broadcasts against the batch.

Backward asks the *backward model client* (``afnio.set_backward_model_client``, or the
``backward_model_client=`` of the call, captured when the forward runs) how each Variable that
requires grad should change, through the feedback layer (:mod:`afnio.autodiff.feedback`), which
fits every prompt to that model's context window:

* a Variable used by a single request (scalar call, batched Variable element, list item) gets
  one call per element whose output feedback is non-empty, all concurrently;
* a scalar Variable shared by a batch gets **one** call that sees every sample with feedback —
  split into chunks only when the prompt would not fit (the backward model's window minus its
  output reserve, or the ``gradient_token_budget`` setting when lower), the chunks' feedback
  then merged by condense calls;
* elements with empty feedback cost nothing;
* feedback on one output that is itself too long for a prompt (many consumers' feedback
  combined) is condensed first, once per element; a single piece is never cut.

Gradients come back in the flat order of the arguments (messages, then inputs). The backward
model's reply should hold ``<FEEDBACK>…</FEEDBACK>`` (or JSON ``{"feedback": …}``, asked for
through structured outputs where the backend has them); a reply without them is repaired
(``reply_retries`` times) and then used as the feedback as it is, with a
:class:`~afnio.autodiff.feedback.FeedbackFormatWarning` — only an empty reply counts as none.

Example:
    >>> import afnio
    >>> from afnio.testing import ScriptedModel
    >>> model = ScriptedModel(lambda messages, **kw: messages[-1]["content"].upper())
    >>> system = afnio.Variable("Shout the question back.", role="system prompt",
    ...                         requires_grad=True)
    >>> ask = afnio.Variable("{question}", role="user message template")
    >>> questions = afnio.Variable(["why?", "how?"], role="user questions")
    >>> out = ChatCompletion.apply(
    ...     model, [{"role": "system", "content": [system]}, {"role": "user", "content": [ask]}],
    ...     inputs={"question": questions})
    >>> out.data, model.calls
    (['WHY?', 'HOW?'], 2)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from afnio._variable import Variable
from afnio.autodiff import prompts
from afnio.autodiff.basic_ops import broadcast_size
from afnio.autodiff.feedback import (
    BackwardModel,
    GradientPrompts,
    OutputFeedback,
    ReplyParseError,
    as_finished,
    check_fits,
    element_gradient,
    fill_prompt,
    fill_template,
    gather_all,
    placeholders,
    shared_gradient,
    token_budget,
)
from afnio.autodiff.function import Function, FunctionCtx
from afnio.autodiff.graph import gradient_role
from afnio.models.model import ChatCompletionModel

__all__ = ["PART_SEPARATOR", "ChatCompletion", "ReplyParseError"]

PART_SEPARATOR = "\n"
"""Text placed between the content parts of one message."""

_TEXT, _TEXTS, _VARIABLE, _VARIABLES = "text", "texts", "variable", "variables"


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _at(data: Any, position: int | None) -> str:
    """Element ``position`` of a Variable's data (a scalar is the same for every element)."""
    if isinstance(data, list):
        return _as_text(data[position])
    return _as_text(data)


@dataclass
class _Message:
    role: str
    parts: list[Variable | str]
    content_is_list: bool


@dataclass
class _Input:
    name: str
    kind: str
    value: Any
    argument: int

    @property
    def batch_size(self) -> int | None:
        if self.kind in (_TEXTS, _VARIABLES):
            return len(self.value)
        if self.kind == _VARIABLE:
            return self.value.batch_size
        return None

    def text_at(self, position: int | None) -> str:
        if self.kind == _TEXT:
            return self.value
        if self.kind == _TEXTS:
            return self.value[position]  # already text (see _parse_input)
        if self.kind == _VARIABLE:
            return _at(self.value.data, position)
        return _as_text(self.value[position].data)

    def probe(self) -> Variable:
        """A stand-in whose role and batch size describe this input in batch-size errors."""
        if self.kind == _VARIABLE:
            return self.value
        size = self.batch_size
        what = "list of Variables" if self.kind == _VARIABLES else "list of values"
        data: Any = "" if size is None else [""] * size
        return Variable(data, role=f"input {self.name!r} ({what})" if size is not None else "")


@dataclass(frozen=True)
class Slot:
    """One occurrence of a Variable in the messages or inputs of a call, in flat order.

    ``path`` addresses it among the op's arguments, as a streaming backward yields it
    (``(1, 0, "content", 2)``: part 2 of message 0 of argument 1).
    """

    variable: Variable
    argument: int
    message: int | None = None
    part: int | None = None
    name: str | None = None
    element: int | None = None
    path: tuple = ()


class BoundMessages:
    """Messages plus inputs of one LM call, validated and ready to render per batch element.

    Args:
        op: The op name quoted in errors.
        messages: ``[{"role": str, "content": [Variable | str, ...] | Variable | str}, ...]``.
        inputs: Placeholder values (see the module docstring).
        messages_argument: Index of the op's ``messages`` argument (for ``needs_input_grad``).
        input_arguments: Index of the op's argument holding each input (default
            ``messages_argument + 1``).
        input_paths: Where each input is among the op's arguments (default ``(argument,
            name)``: under its name in a dict argument); ``(argument,)`` for an input that is
            an argument of its own.

    Raises:
        TypeError: For a malformed message or an input of an unsupported type.
        ValueError: When placeholders and inputs differ, or batch sizes differ.
    """

    def __init__(
        self,
        op: str,
        messages: Any,
        inputs: Mapping[str, Any] | None,
        messages_argument: int = 1,
        input_arguments: Mapping[str, int] | None = None,
        input_paths: Mapping[str, tuple] | None = None,
    ) -> None:
        self.op = op
        self.messages = self._parse_messages(messages)
        input_arguments = dict(input_arguments or {})
        self._input_paths = dict(input_paths or {})
        self.inputs: dict[str, _Input] = {}
        if inputs is not None and not isinstance(inputs, Mapping):
            raise TypeError(
                f"{op}: argument 'inputs' must be a dict of placeholder name to value, got "
                f"{type(inputs).__name__}"
            )
        for name, value in (inputs or {}).items():
            argument = input_arguments.get(name, messages_argument + 1)
            self.inputs[name] = self._parse_input(name, value, argument)
        self._check_placeholders()
        probes = [p for m in self.messages for p in m.parts if isinstance(p, Variable)]
        probes += [item.probe() for item in self.inputs.values()]
        self.batch_size = broadcast_size(op, probes)
        self.positions: list[int | None] = (
            [None] if self.batch_size is None else list(range(self.batch_size))
        )
        self.slots = self._slots(messages_argument)

    # ------------------------------------------------------------------ parsing
    def _parse_messages(self, messages: Any) -> list[_Message]:
        op = self.op
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError(
                f"{op}: argument 'messages' must be a non-empty list of "
                f"{{'role': ..., 'content': [Variable, ...]}} dicts, got {type(messages).__name__}"
            )
        parsed = []
        for index, message in enumerate(messages):
            where = f"{op}: argument 'messages', message {index}"
            if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
                raise TypeError(
                    f"{where} must be a dict with exactly the keys 'role' and 'content', got "
                    + (f"keys {sorted(message)}" if isinstance(message, Mapping)
                       else type(message).__name__)
                )
            role = message["role"]
            if not isinstance(role, str) or not role:
                raise TypeError(f"{where}: 'role' must be a non-empty str, got {role!r}")
            content = message["content"]
            is_list = isinstance(content, (list, tuple))
            parts = list(content) if is_list else [content]
            for part_index, part in enumerate(parts):
                if not isinstance(part, (Variable, str)):
                    raise TypeError(
                        f"{where} ({role}): content part {part_index} must be a Variable or a "
                        f"str, got {type(part).__name__}"
                    )
            parsed.append(_Message(role, parts, is_list))
        return parsed

    def _parse_input(self, name: Any, value: Any, argument: int) -> _Input:
        op = self.op
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"{op}: argument 'inputs': key {name!r} is not a valid placeholder name (it must "
                "be a Python identifier)"
            )
        if isinstance(value, Variable):
            return _Input(name, _VARIABLE, value, argument)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return _Input(name, _TEXT, _as_text(value), argument)
        if isinstance(value, (list, tuple)):
            items = list(value)
            if items and all(isinstance(item, Variable) for item in items):
                batched = [i for i, item in enumerate(items) if item.is_batched]
                if batched:
                    raise TypeError(
                        f"{op}: argument 'inputs[{name!r}]': a list of Variables must hold "
                        f"scalar Variables, but item {batched[0]} (role "
                        f"{items[batched[0]].role!r}) is a batch"
                    )
                return _Input(name, _VARIABLES, items, argument)
            bad = [item for item in items if isinstance(item, bool)
                   or not isinstance(item, (str, int, float))]
            if not bad:
                return _Input(name, _TEXTS, [_as_text(item) for item in items], argument)
            raise TypeError(
                f"{op}: argument 'inputs[{name!r}]': a list input must hold only str values or "
                f"only scalar Variables, got an item of type {type(bad[0]).__name__}"
            )
        raise TypeError(
            f"{op}: argument 'inputs[{name!r}]' must be a str, a list of str, a Variable or a list "
            f"of Variables, got {type(value).__name__}"
        )

    def _part_texts(self, part: Variable | str) -> list[str]:
        if isinstance(part, str):
            return [part]
        data = part.data
        return [_as_text(item) for item in data] if isinstance(data, list) else [_as_text(data)]

    def _check_placeholders(self) -> None:
        # Placeholder name -> the indices of the messages using it.
        self.placeholder_messages: dict[str, list[int]] = {}
        for index, message in enumerate(self.messages):
            for part in message.parts:
                for text in self._part_texts(part):
                    for name in placeholders(text):
                        where = self.placeholder_messages.setdefault(name, [])
                        if index not in where:
                            where.append(index)
        used = list(self.placeholder_messages)
        given = list(self.inputs)
        if set(used) != set(given):
            missing = sorted(set(used) - set(given))
            unused = sorted(set(given) - set(used))
            problems = []
            if missing:
                problems.append(f"no input for placeholder(s) {missing}")
            if unused:
                problems.append(f"no placeholder for input(s) {unused}")
            raise ValueError(
                f"{self.op}: placeholders and inputs differ ({'; '.join(problems)}): the messages "
                f"use placeholders {sorted(used)}, the inputs give {sorted(given)}. Write "
                "{{name}} for a literal {name}."
            )

    def _slots(self, messages_argument: int) -> list[Slot]:
        slots = []
        for m, message in enumerate(self.messages):
            for j, part in enumerate(message.parts):
                if isinstance(part, Variable):
                    where = (messages_argument, m, "content")
                    path = (*where, j) if message.content_is_list else where
                    slots.append(Slot(part, messages_argument, message=m, part=j, path=path))
        for name, item in self.inputs.items():
            prefix = self._input_paths.get(name, (item.argument, name))
            if item.kind == _VARIABLE:
                slots.append(Slot(item.value, item.argument, name=name, path=prefix))
            elif item.kind == _VARIABLES:
                for k, variable in enumerate(item.value):
                    slots.append(
                        Slot(variable, item.argument, name=name, element=k, path=(*prefix, k))
                    )
        return slots

    # ------------------------------------------------------------------ rendering
    def _varies(self, thing: Variable | str | _Input) -> bool:
        if isinstance(thing, _Input):
            return thing.batch_size is not None
        return isinstance(thing, Variable) and thing.is_batched

    def part_label(self, m: int, j: int) -> str:
        part = self.messages[m].parts[j]
        role = part.role if isinstance(part, Variable) and part.role else ""
        return role or f"part {j + 1} of message {m + 1}"

    def input_label(self, name: str) -> str:
        item = self.inputs[name]
        role = item.value.role if item.kind == _VARIABLE else ""
        return f"input {{{name}}}" + (f" ({role})" if role else "")

    def render(
        self, position: int | None, highlight: Slot | None = None, template: bool = False
    ) -> list[dict[str, str]]:
        """The chat messages of one batch element.

        Args:
            position: The batch element (``None`` for a scalar call).
            highlight: A slot whose text is wrapped in ``<VARIABLE>`` markers.
            template: Show parts that differ per element as ``[label: differs per sample]``.
        """
        marked = prompts.MARKED_VARIABLE
        values = {}
        for name, item in self.inputs.items():
            if template and self._varies(item):
                text = fill_template(prompts.VARYING_PART, {"label": self.input_label(name)})
            else:
                text = item.text_at(position)
            if highlight is not None and highlight.name == name:
                text = fill_template(marked, {"text": text})
            values[name] = text
        rendered = []
        for m, message in enumerate(self.messages):
            texts = []
            for j, part in enumerate(message.parts):
                if template and self._varies(part):
                    holds_variable = (
                        highlight is not None
                        and highlight.name in self._part_placeholders(part)
                    )
                    varying = (
                        prompts.VARYING_PART_WITH_VARIABLE if holds_variable
                        else prompts.VARYING_PART
                    )
                    text = fill_template(varying, {"label": self.part_label(m, j)})
                else:
                    raw = part if isinstance(part, str) else _at(part.data, position)
                    text = fill_template(raw, values)
                if highlight is not None and highlight.message == m and highlight.part == j:
                    text = fill_template(marked, {"text": text})
                texts.append(text)
            rendered.append({"role": message.role, "content": PART_SEPARATOR.join(texts)})
        return rendered

    def _part_placeholders(self, part: Variable | str) -> set[str]:
        return {name for text in self._part_texts(part) for name in placeholders(text)}

    def varying_values(
        self, position: int, highlight: Slot | None = None
    ) -> list[tuple[str, str]]:
        """``(label, text)`` of every part and input that differs between batch elements; a
        highlighted (shared) input filled into a varying part is marked there."""
        values = []
        plain = {name: item.text_at(position) for name, item in self.inputs.items()}
        marked = dict(plain)
        if highlight is not None and highlight.name in plain:
            marked[highlight.name] = fill_template(
                prompts.MARKED_VARIABLE, {"text": plain[highlight.name]}
            )
        for m, message in enumerate(self.messages):
            for j, part in enumerate(message.parts):
                if self._varies(part):
                    text = fill_template(_at(part.data, position), marked)
                    values.append((self.part_label(m, j), text))
        for name, item in self.inputs.items():
            if self._varies(item):
                values.append((self.input_label(name), plain[name]))
        return values

    def location(self, slot: Slot) -> str:
        """Where ``slot`` sits in the conversation, in words."""
        count = len(self.messages)
        if slot.message is not None:
            message = self.messages[slot.message]
            where = f"message {slot.message + 1} of {count} (a {message.role} message)"
            if len(message.parts) == 1:
                return f"the content of {where}"
            return f"part {slot.part + 1} of {len(message.parts)} of {where}"
        used = self.placeholder_messages.get(slot.name, [])
        in_messages = ", ".join(
            f"message {m + 1} of {count} (a {self.messages[m].role} message)" for m in used
        )
        item = "" if slot.element is None else f" (item {slot.element + 1} of the list given)"
        return f"the value filled into the placeholder {{{slot.name}}}{item} in {in_messages}"

    def largest_parts(self, position: int | None, count: int = 2) -> str:
        """The ``count`` longest parts and inputs of one element's request, by role, for errors
        (e.g. ``"system prompt: 120 characters, input {message}: 9000 characters"``)."""
        sizes = [
            (len(_at(part.data, position)), self.part_label(m, j))
            for m, message in enumerate(self.messages)
            for j, part in enumerate(message.parts)
            if isinstance(part, Variable)
        ]
        sizes += [(len(item.text_at(position)), self.input_label(name))
                  for name, item in self.inputs.items()]
        largest = sorted(sizes, key=lambda size: -size[0])[:count]
        return ", ".join(f"{label}: {length} characters" for length, label in largest)

    def output_role(self) -> str:
        """A role for the call's output: what it is a response to."""
        roles: list[str] = []
        for message in self.messages:
            for part in message.parts:
                if isinstance(part, Variable) and part.role and part.role not in roles:
                    roles.append(part.role)
        return "response of the language model to " + (", ".join(roles) or "the messages")


def _describe(op: str, slot: Slot) -> str:
    return f"{op} backward for the Variable with role {slot.variable.role!r}"


def feedback_texts(grad_output: Variable | None, count: int) -> list[str]:
    """The feedback text per batch element of an output's gradient (``""`` for all ``count``
    elements when there is none)."""
    if grad_output is None:
        return [""] * count
    data = grad_output.data
    if isinstance(data, list):
        return [_as_text(item) for item in data]
    return [_as_text(data)]


class _SlotRequests(GradientPrompts):
    """The gradient requests about one slot of an LM call."""

    def __init__(self, request: GradientRequest, slot: Slot) -> None:
        self.request, self.slot = request, slot
        self.role = slot.variable.role or "unnamed variable"

    def element(self, position: int | None, feedback: str) -> list[dict[str, str]]:
        request, slot = self.request, self.slot
        return _messages(
            prompts.ELEMENT_GRADIENT_PROMPT,
            conversation=_conversation(request.bound.render(position, slot)),
            output_role=request.output_role,
            output=request.outputs[0 if position is None else position],
            feedback=feedback,
            variable_role=self.role,
            location=request.bound.location(slot),
        )

    def sample(self, position: int, feedback: str) -> str:
        values = "\n".join(
            fill_template(prompts.SHARED_SAMPLE_VALUE, {"label": label, "text": text})
            for label, text in self.request.bound.varying_values(position, self.slot)
        )
        return fill_template(
            prompts.SHARED_SAMPLE,
            {
                "number": str(position + 1),
                "values": values,
                "output": self.request.outputs[position],
                "feedback": feedback,
            },
        )

    def shared(self, samples: list[str]) -> list[dict[str, str]]:
        bound = self.request.bound
        return _messages(
            prompts.SHARED_GRADIENT_PROMPT,
            batch_size=str(bound.batch_size),
            conversation=_conversation(bound.render(None, self.slot, template=True)),
            variable_role=self.role,
            location=bound.location(self.slot),
            count=str(len(samples)),
            output_role=self.request.output_role,
            samples="\n\n".join(samples),
        )

    def merge(self, parts: str) -> list[dict[str, str]]:
        return _messages(prompts.REDUCE_GRADIENT_PROMPT, variable_role=self.role, parts=parts)


def _messages(template: str, **values: str) -> list[dict[str, str]]:
    """A gradient request: afnio's gradient system prompt plus ``template`` filled in."""
    system = fill_prompt(prompts.GRADIENT_SYSTEM_PROMPT)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": fill_prompt(template, values)},
    ]


def _conversation(messages: list[dict[str, str]]) -> str:
    return "\n\n".join(fill_template(prompts.CONVERSATION_MESSAGE, message) for message in messages)


class GradientRequest:
    """Computes textual gradients of the Variables of one LM call (the shared backward machinery
    of :class:`ChatCompletion` and the LM judge), through the feedback layer.

    Args:
        bound: The call's messages and inputs.
        outputs: The model's output per batch element (one entry for a scalar call).
        output_role: The role of the call's output.
        feedback: Feedback on the output per batch element (``""`` = none).
        backward: The backward model captured when the forward ran.
    """

    def __init__(
        self,
        bound: BoundMessages,
        outputs: Sequence[str],
        output_role: str,
        feedback: Sequence[str],
        backward: BackwardModel,
    ) -> None:
        self.bound = bound
        self.outputs = list(outputs)
        self.output_role = output_role
        self.backward = backward
        self.feedback = OutputFeedback(
            backward,
            feedback,
            lambda parts: _messages(
                prompts.CONDENSE_OUTPUT_FEEDBACK_PROMPT, output_role=output_role, parts=parts
            ),
        )

    def _has_feedback(self, slot: Slot) -> bool:
        """Whether an output element ``slot`` took part in has non-empty feedback."""
        if slot.element is not None:
            return bool(self.feedback.texts[slot.element])
        return any(self.feedback.texts)

    async def gradient(self, slot: Slot) -> Variable | None:
        """The gradient of one slot (``None`` when no element of its feedback is non-empty)."""
        if not self._has_feedback(slot):
            return None
        role = gradient_role(slot.variable.role)
        what = _describe(self.bound.op, slot)
        requests, backward, feedback = _SlotRequests(self, slot), self.backward, self.feedback
        if slot.element is not None:
            text = await element_gradient(backward, requests, feedback, slot.element, what)
            return Variable(text, role=role)
        if slot.variable.is_batched:
            live = feedback.live
            texts = await gather_all(
                [element_gradient(backward, requests, feedback, k, what) for k in live]
            )
            data = [""] * len(feedback.texts)
            for position, text in zip(live, texts):
                data[position] = text
            return Variable(data, role=role)
        if self.bound.batch_size is None:
            return Variable(await element_gradient(backward, requests, feedback, None, what),
                            role=role)
        return Variable(
            await shared_gradient(backward, requests, feedback, feedback.live, what), role=role
        )

    async def stream(self, wanted: Sequence[bool]) -> AsyncIterator[tuple[Slot, Variable | None]]:
        """``(slot, gradient)`` for every wanted slot, each as soon as its requests are answered
        (all requests run concurrently)."""
        slots = [slot for slot, want in zip(self.bound.slots, wanted) if want]
        for slot in slots:
            if self._has_feedback(slot):
                self.backward.require(_describe(self.bound.op, slot))
        async with contextlib.aclosing(
            as_finished([self.gradient(slot) for slot in slots])
        ) as finished:
            async for index, gradient in finished:
                yield slots[index], gradient


def check_forward_fits(
    bound: BoundMessages,
    client: ChatCompletionModel,
    requests: Sequence[list[dict[str, str]]],
    completion_args: Mapping[str, Any],
) -> None:
    """Refuse, before anything is sent, a call whose request for some batch element would not
    fit ``client``'s context window with the output reserve of ``completion_args``.

    Raises:
        ContextWindowError: Naming the op, the batch element and its largest parts' roles.
    """
    budget = token_budget(client, completion_args)
    for position, request in zip(bound.positions, requests):
        if client.prompt_fits(request, budget):
            continue
        needed = client.count_message_tokens(request)
        if needed > budget:
            element = "" if position is None else f" for batch element {position}"
            parts = bound.largest_parts(position)
            check_fits(needed, budget, f"{bound.op}: the request{element} ({parts})")


def check_clients(
    op: str,
    forward_model_client: Any,
    backward_model_client: Any,
    backward_completion_args: Any,
) -> None:
    """Raise a TypeError unless the clients are ChatCompletionModels (the backward one may be
    None) and ``backward_completion_args`` is a dict or None."""
    if not isinstance(forward_model_client, ChatCompletionModel):
        raise TypeError(
            f"{op}: argument 'forward_model_client' must be a ChatCompletionModel, got "
            f"{type(forward_model_client).__name__}"
        )
    if backward_model_client is not None and not isinstance(
        backward_model_client, ChatCompletionModel
    ):
        raise TypeError(
            f"{op}: argument 'backward_model_client' must be a ChatCompletionModel or None, got "
            f"{type(backward_model_client).__name__}"
        )
    if backward_completion_args is not None and not isinstance(backward_completion_args, Mapping):
        raise TypeError(
            f"{op}: argument 'backward_completion_args' must be a dict or None, got "
            f"{type(backward_completion_args).__name__}"
        )


class ChatCompletion(Function):
    """One chat-completion request per batch element, differentiable with textual gradients.

    Call ``ChatCompletion.apply(forward_model_client, messages, inputs=None, **completion_args)``
    (see the module docstring for messages, placeholders and batching). ``completion_args``
    (``temperature``, ``response_format``, …) go to the model unchanged; two keywords are
    afnio's own and never sent: ``backward_model_client`` and ``backward_completion_args``
    (default: those of the settings in force when the forward runs — they are captured on the
    graph then, see :func:`afnio.settings`).

    Returns:
        A Variable with the reply (a batch of replies for a batched call) whose role starts with
        "response of the language model to".

    Raises:
        TypeError: For a client that isn't a ChatCompletionModel or malformed messages/inputs.
        ValueError: When placeholders and inputs differ or batch sizes differ.
        ContextWindowError: Before anything is sent, when a request would not fit the forward
            model's context window (the message names the largest parts and their roles).
        RuntimeError: In backward, when a gradient is needed and no backward client was set
            when the forward ran.
        ReplyParseError: In backward, when the backward model's reply can't be parsed after
            retries (the message quotes the reply).

    Example:
        >>> import afnio
        >>> from afnio.testing import ScriptedModel
        >>> forward = ScriptedModel(["Paris"])
        >>> backward_model = ScriptedModel(["<FEEDBACK>Ask for one word only.</FEEDBACK>"])
        >>> prompt = afnio.Variable("Capital of {country}?", role="question template",
        ...                         requires_grad=True)
        >>> answer = ChatCompletion.apply(forward, [{"role": "user", "content": [prompt]}],
        ...     inputs={"country": "France"}, backward_model_client=backward_model)
        >>> answer.backward(afnio.Variable("Too short."))
        >>> prompt.grad[0].data
        'Ask for one word only.'
    """

    @staticmethod
    async def forward(
        ctx: FunctionCtx,
        forward_model_client: ChatCompletionModel,
        messages: list[dict[str, Any]],
        inputs: dict[str, Any] | None = None,
        *,
        backward_model_client: ChatCompletionModel | None = None,
        backward_completion_args: dict[str, Any] | None = None,
        **completion_args: Any,
    ) -> Variable:
        check_clients(
            "ChatCompletion", forward_model_client, backward_model_client, backward_completion_args
        )
        bound = BoundMessages("ChatCompletion", messages, inputs)
        requests = [bound.render(position) for position in bound.positions]
        check_forward_fits(bound, forward_model_client, requests, completion_args)
        replies = await gather_all(
            [forward_model_client.achat(request, **completion_args) for request in requests]
        )
        ctx.bound = bound
        ctx.replies = [_as_text(reply) for reply in replies]
        ctx.backward = BackwardModel.capture(backward_model_client, backward_completion_args)
        output_role = bound.output_role()
        ctx.output_role = output_role
        data: Any = ctx.replies if bound.batch_size is not None else ctx.replies[0]
        return Variable(data, role=output_role)

    @staticmethod
    async def backward(
        ctx: FunctionCtx, grad_output: Variable
    ) -> AsyncIterator[tuple[tuple, Variable | None]]:
        # Streams: each Variable's gradient leaves as soon as its requests are answered, so the
        # op that produced a per-sample input goes on while a shared prompt's request runs.
        bound: BoundMessages = ctx.bound
        wanted = [
            ctx.needs_input_grad[slot.argument] and slot.variable.requires_grad
            for slot in bound.slots
        ]
        request = GradientRequest(
            bound,
            ctx.replies,
            ctx.output_role,
            feedback_texts(grad_output, len(bound.positions)),
            ctx.backward,
        )
        async with contextlib.aclosing(request.stream(wanted)) as gradients:
            async for slot, gradient in gradients:
                yield slot.path, gradient

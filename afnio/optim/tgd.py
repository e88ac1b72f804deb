"""Textual Gradient Descent: an optimizer model rewrites each parameter from its gradients.

:class:`TGD` is the optimizer; :func:`tgd` is its functional form (as ``torch.optim.sgd`` is to
``SGD``). One step sends one request per parameter that has feedback, all at once, through the
feedback layer (:mod:`afnio.autodiff.feedback`), and only when every request has finished writes
the accepted values (in place, so modules see them at once).

A reply is used only when it passes mechanical checks: the new value sits between
``<IMPROVED_VARIABLE>`` tags (or in ``{"improved_variable": ...}``, which backends with
structured outputs are asked for), keeps exactly the ``{placeholders}`` of the old value,
contains none of the optimizer's tags or instruction lines, and has the old value's shape (a
number stays a finite number). A rejected reply is repaired (``max_retries`` times); after that
the parameter keeps its value and a :class:`ProposalRejectedWarning` says why.

Every request is fitted to the optimizer model's context window: past it, the oldest momentum
entries are dropped first, then the feedback is condensed, then the in-context examples are
left out (each noted in a warning); a parameter whose value and constraints alone do not fit
raises :class:`~afnio.autodiff.feedback.ContextWindowError` before anything is sent.

Example:
    >>> import afnio
    >>> from afnio.cognitive.parameter import Parameter
    >>> from afnio.optim import TGD
    >>> from afnio.testing import ScriptedModel
    >>> prompt = Parameter("Answer {question}.", role="system prompt")
    >>> model = ScriptedModel(["<IMPROVED_VARIABLE>Answer {question} in one word."
    ...                        "</IMPROVED_VARIABLE>"])
    >>> optimizer = TGD([prompt], model_client=model, momentum=2)
    >>> prompt.append_grad(afnio.Variable("answers are too long", role="feedback"))
    >>> optimizer.step()
    >>> prompt.data
    'Answer {question} in one word.'
    >>> optimizer.state[prompt]["momentum_buffer"]
    [{'value': 'Answer {question}.', 'gradients': ['answers are too long']}]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from afnio._runtime import run
from afnio._variable import Variable, validate_data
from afnio.autodiff.feedback import (
    ReplyParseError,
    Unreadable,
    ask,
    check_fits,
    extract,
    fill_template,
    gather_all,
    merge_in_rounds,
    placeholders,
    text_fitting,
    token_budget,
)
from afnio.autodiff.grad_mode import no_grad
from afnio.cognitive.parameter import ParameterType
from afnio.models.model import ChatCompletionModel
from afnio.optim import prompts
from afnio.optim.optimizer import Optimizer, ParamsT
from afnio.optim.options import GroupOptions, check_group, optimizer_defaults

__all__ = ["TGD", "ProposalRejectedWarning", "TGDOptions", "tgd"]

T = TypeVar("T")

BUILTIN_PLACEHOLDERS = frozenset(
    {"variable_role", "variable", "gradients", "past_iterations", "constraints", "examples"}
)
"""Placeholders TGD fills itself; ``inputs`` may not use these names."""

_MAX_CONDENSE_ROUNDS = 4
_MIN_INSTRUCTION_LINE = 30
_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")

ProposalCheck = Callable[[Any], "str | None"]


class ProposalRejectedWarning(UserWarning):
    """A parameter kept its value because no acceptable proposal came back."""


# --------------------------------------------------------------------------- options
def _text_of(value: Any) -> str:
    return str(value.data) if isinstance(value, Variable) else str(value)


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, (str, Variable)):
        return _text_of(content)
    if isinstance(content, (list, tuple)) and all(
        isinstance(part, (str, Variable)) for part in content
    ):
        return "".join(_text_of(part) for part in content)
    raise TypeError(
        f"{where}: message content must be a str, a Variable or a list of them, "
        f"got {type(content).__name__}"
    )


@dataclass(frozen=True)
class TGDOptions(GroupOptions):
    """The options of one TGD parameter group, each declared (with its default) once, here.

    Attributes:
        model_client: The optimizer model.
        messages: Request templates (afnio's placeholder rule: ``{name}`` is filled, any other
            brace is literal); ``None`` uses :data:`~afnio.optim.prompts.TGD_MESSAGES`.
        inputs: Values for the templates' own placeholders.
        constraints: Rules every new value must follow (str or Variable), shown to the model.
        momentum: How many past (value, gradients) entries to keep and show.
        in_context_examples: Examples of good values (str or Variable), shown to the model.
        max_retries: Repair requests after a rejected reply.
        gradient_token_budget: A cap (tokens) on the feedback shown in one request, below what
            the model's window leaves; past it the feedback is condensed. ``None``: the window.
        completion_args: Extra arguments of every request (``temperature``, ...).

    Raises:
        TypeError, ValueError: For an invalid option (raised before anything changes).
    """

    owner = "TGD"
    collects_completion_args = True

    model_client: ChatCompletionModel
    messages: list[dict[str, Any]] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    constraints: list[Any] = field(default_factory=list)
    momentum: int = 0
    in_context_examples: list[Any] = field(default_factory=list)
    max_retries: int = 2
    gradient_token_budget: int | None = None
    completion_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model_client, ChatCompletionModel):
            raise TypeError(
                "TGD: model_client must be a ChatCompletionModel, got "
                f"{type(self.model_client).__name__}"
            )
        for name, low, optional in (
            ("momentum", 0, False), ("max_retries", 0, False), ("gradient_token_budget", 1, True)
        ):
            value = getattr(self, name)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TGD: {name} must be an int >= {low}, got {value!r}")
        secret = [key for key in self.completion_args if "api_key" in key.lower()]
        if secret:
            raise ValueError(
                f"TGD: pass API keys to the model client, not as completion args ({secret})"
            )
        clashing = sorted(BUILTIN_PLACEHOLDERS & set(self.inputs))
        if clashing:
            raise ValueError(
                f"TGD: inputs {clashing} clash with placeholders the optimizer fills itself "
                f"({sorted(BUILTIN_PLACEHOLDERS)})"
            )
        templates = self.templates()
        if not templates:
            raise ValueError("TGD: messages must not be empty")
        used: set[str] = set()
        for index, message in enumerate(templates):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise TypeError(
                    f"TGD: messages[{index}] must be a dict with 'role' and 'content', "
                    f"got {message!r}"
                )
            if message["role"] not in ("system", "user", "assistant"):
                raise ValueError(
                    f"TGD: messages[{index}] role must be 'system', 'user' or 'assistant', "
                    f"got {message['role']!r}"
                )
            used |= set(placeholders(_content_text(message["content"], f"TGD: messages[{index}]")))
        missing = used - BUILTIN_PLACEHOLDERS - set(self.inputs)
        unused = set(self.inputs) - used
        if missing or unused:
            raise ValueError(
                f"TGD: message placeholders and inputs don't match: placeholders {sorted(used)}, "
                f"inputs {sorted(self.inputs)} (built-in: {sorted(BUILTIN_PLACEHOLDERS)}); "
                f"without an input: {sorted(missing)}, not used by any placeholder: "
                f"{sorted(unused)}"
            )

    def templates(self) -> list[dict[str, Any]]:
        """The request templates in use."""
        return prompts.TGD_MESSAGES if self.messages is None else list(self.messages)

# --------------------------------------------------------------------------- rendering
def _describe(param: Variable) -> str:
    role = param.role or "variable (no role given)"
    param_type = getattr(param, "param_type", None)
    if isinstance(param_type, ParameterType) and param_type is not ParameterType.NONE:
        return f"{role} (parameter type: {param_type.value})"
    return role


def _format_value(data: Any) -> str:
    if isinstance(data, list):
        return json.dumps(data, ensure_ascii=False, indent=2)
    return str(data)


def _feedback_texts(gradients: Sequence[Variable]) -> list[str]:
    """Every non-empty piece of feedback, in gradient order (batch elements marked by index)."""
    texts = []
    for gradient in gradients:
        if gradient.is_batched:
            texts.extend(
                f"[element {index}] {str(item).strip()}"
                for index, item in enumerate(gradient.data)
                if str(item).strip()
            )
        elif str(gradient.data).strip():
            texts.append(str(gradient.data).strip())
    return texts


def _numbered(items: Sequence[str]) -> str:
    return "\n".join(f"{number}. {item}" for number, item in enumerate(items, 1))


def _section(tag: str, body: str) -> str:
    return f"<{tag}>\n{body}\n</{tag}>"


def _past_iterations(window: Sequence[dict[str, Any]]) -> str:
    if not window:
        return ""
    iterations = [
        _section(
            "ITERATION",
            _section("PAST_VALUE", _format_value(entry["value"]))
            + "\n"
            + _section("PAST_FEEDBACK", _numbered(entry["gradients"])),
        )
        for entry in window
    ]
    return _section("PAST_ITERATIONS", "\n".join(iterations)) + "\n\n"


@dataclass
class _Request:
    """The parts of one TGD request that fitting may shrink."""

    feedback: list[str]
    window: list[dict[str, Any]]
    examples: list[Any]

    def messages(self, param: Variable, opts: TGDOptions) -> list[dict[str, str]]:
        values = {name: _text_of(value) for name, value in opts.inputs.items()}
        values.update(
            variable_role=_describe(param),
            variable=_section("VARIABLE", _format_value(param.data)),
            gradients=_section("FEEDBACK", _numbered(self.feedback)),
            past_iterations=_past_iterations(self.window),
            constraints=(
                _section("CONSTRAINTS", _numbered([_text_of(c) for c in opts.constraints]))
                + "\n\n" if opts.constraints else ""
            ),
            examples=(
                _section(
                    "EXAMPLES",
                    "\n".join(_section("EXAMPLE", _text_of(e)) for e in self.examples),
                ) + "\n\n" if self.examples else ""
            ),
        )
        where = f"TGD (parameter with role {param.role!r})"
        return [
            {
                "role": message["role"],
                "content": fill_template(_content_text(message["content"], where), values),
            }
            for message in opts.templates()
        ]


def _instruction_lines(messages: Sequence[dict[str, Any]]) -> list[str]:
    """Long static lines of the templates: finding one in a proposal means instructions leaked."""
    lines = []
    for message in messages:
        for line in _content_text(message["content"], "TGD").splitlines():
            line = line.strip()
            if len(line) >= _MIN_INSTRUCTION_LINE and "{" not in line:
                lines.append(line)
    return lines


# --------------------------------------------------------------------------- checking replies
def _check_text(new: str, old: str, instruction_lines: Sequence[str], where: str) -> None:
    if not new and old.strip():
        raise Unreadable(f"{where} is empty")
    old_fields, new_fields = set(_PLACEHOLDER.findall(old)), set(_PLACEHOLDER.findall(new))
    if old_fields - new_fields:
        dropped = ", ".join(f"{{{name}}}" for name in sorted(old_fields - new_fields))
        raise Unreadable(f"{where} drops the placeholder(s) {dropped}")
    if new_fields - old_fields:
        added = ", ".join(f"{{{name}}}" for name in sorted(new_fields - old_fields))
        raise Unreadable(f"{where} adds the placeholder(s) {added}, which nothing would fill")
    lowered_new, lowered_old = new.lower(), old.lower()
    for tag in prompts.MARKUP_TAGS:
        for marker in (f"<{tag}>", f"</{tag}>"):
            if marker.lower() in lowered_new and marker.lower() not in lowered_old:
                raise Unreadable(f"{where} contains the optimizer's tag {marker}")
    for line in instruction_lines:
        if line in new and line not in old:
            raise Unreadable(f"{where} contains the optimizer's instruction {line[:60]!r}")


def _parse_number(text: str, kind: type) -> int | float:
    try:
        number = kind(text)
    except ValueError:
        raise Unreadable(
            f"the proposal {text[:40]!r} is not a{'n int' if kind is int else ' float'}"
        ) from None
    if not math.isfinite(number):
        raise Unreadable(f"the proposal {text[:40]!r} is not a finite number")
    return number


def _parse_proposal(reply: str, old: Any, instruction_lines: Sequence[str]) -> Any:
    """The new value a reply proposes for a parameter holding ``old``.

    Raises:
        Unreadable: Saying what is wrong with it.
    """
    text = extract(reply, prompts.PROPOSAL_TAG)
    if text is None:
        raise Unreadable(f"the reply has no <{prompts.PROPOSAL_TAG}> tag with a closing tag")
    if isinstance(old, str):
        _check_text(text, old, instruction_lines, "the proposal")
        return text
    if isinstance(old, (int, float)):
        return _parse_number(text, type(old))
    try:
        new = json.loads(text)
    except json.JSONDecodeError:
        raise Unreadable("the proposal is not a JSON list") from None
    if not isinstance(new, list) or len(new) != len(old):
        raise Unreadable(f"the proposal must be a JSON list of {len(old)} elements")
    try:
        validate_data(new)
    except TypeError as exc:
        raise Unreadable(f"the proposal is not a valid list: {exc}") from None
    old_is_text = any(isinstance(item, str) for item in old)
    if new and old and old_is_text != isinstance(new[0], str):
        kind = "strings" if old_is_text else "numbers"
        raise Unreadable(f"the proposal's elements must be {kind}")
    if old_is_text:
        for index, (new_item, old_item) in enumerate(zip(new, old)):
            _check_text(new_item, old_item, instruction_lines, f"element {index} of the proposal")
    elif not all(math.isfinite(item) for item in new):
        raise Unreadable("the proposal's elements must be finite numbers")
    return new


def _proposal_schema(old: Any, output_tokens: int) -> dict[str, Any]:
    """The JSON schema of a proposal for a parameter holding ``old`` (for structured outputs),
    short enough to close within the request's ``output_tokens``."""
    if isinstance(old, (int, float)):
        value: dict[str, Any] = {"type": "number"}
    elif isinstance(old, list):
        kind = "string" if any(isinstance(item, str) for item in old) else "number"
        value = {"type": "array", "items": {"type": kind}}
    else:
        length = text_fitting(output_tokens, max(400, 4 * len(old)))
        value = {"type": "string", "minLength": 1, "maxLength": length}
    return {
        "type": "object",
        "properties": {prompts.PROPOSAL_TAG.lower(): value},
        "required": [prompts.PROPOSAL_TAG.lower()],
    }


# --------------------------------------------------------------------------- proposing
@dataclass
class _Outcome:
    changed: bool = False
    new_data: Any = None
    feedback: list[str] | None = None
    notes: list[str] = field(default_factory=list)


async def _condense(param: Variable, feedback: list[str], room: int, opts: TGDOptions) -> list[str]:
    """Condense ``feedback`` in budgeted rounds (one request per chunk) until it fits ``room``.

    Raises:
        Unreadable: When a chunk can't be condensed after the repairs.
    """
    client = opts.model_client

    def parse(reply: str) -> str:
        text = extract(reply, prompts.CONDENSED_TAG)
        if not text:
            raise Unreadable(f"the reply has no non-empty <{prompts.CONDENSED_TAG}>")
        return text

    def request(parts: list[str]) -> list[dict[str, str]]:
        values = {"variable_role": _describe(param), "feedback": "\n".join(parts)}
        return [{"role": m["role"], "content": fill_template(m["content"], values)}
                for m in prompts.CONDENSE_MESSAGES]

    try:
        return await merge_in_rounds(
            feedback,
            render_part=lambda number, text: f"{number}. {text}",
            part_tokens=client.count_tokens,
            base_tokens=0,
            budget=room,
            merge=lambda parts: ask(
                client, request(parts), parse,
                what=f"TGD condensing the feedback of {param.role!r}",
                repair=fill_template(prompts.RETRY_MESSAGE, {"tag": prompts.CONDENSED_TAG}),
                completion_args=opts.completion_args, retries=opts.max_retries,
            ),
            done=lambda texts: sum(map(client.count_tokens, texts)) <= room,
            max_rounds=_MAX_CONDENSE_ROUNDS,
            merge_single=True,
        )
    except ReplyParseError as error:
        raise Unreadable(
            "its gradients exceed the token budget and could not be condensed: "
            + "; ".join(error.reasons)
        ) from None


async def _fit(
    param: Variable, request: _Request, opts: TGDOptions, notes: list[str]
) -> _Request:
    """Shrink ``request`` to the optimizer model's window: oldest momentum first, then condensed
    feedback, then no examples (each noted).

    Raises:
        ContextWindowError: When the value, constraints and instructions alone do not fit.
        Unreadable: When feedback that must be condensed could not be.
    """
    client = opts.model_client
    budget = token_budget(client, opts.completion_args)

    def size(candidate: _Request) -> int:
        return client.count_message_tokens(candidate.messages(param, opts))

    def feedback_room(candidate: _Request) -> int:
        room = budget - size(dataclasses.replace(candidate, feedback=[]))
        cap = opts.gradient_token_budget
        return room if cap is None else min(room, cap)

    dropped = 0
    while request.window and size(request) > budget:
        request = dataclasses.replace(request, window=request.window[1:])
        dropped += 1
    if dropped:
        notes.append(f"the {dropped} oldest momentum entries were left out to fit the window")
    if sum(client.count_tokens(text) for text in request.feedback) > feedback_room(request):
        feedback = await _condense(param, request.feedback, feedback_room(request), opts)
        request = dataclasses.replace(request, feedback=feedback)
    if request.examples and size(request) > budget:
        request = dataclasses.replace(request, examples=[])
        notes.append("the in-context examples were left out to fit the window")
    check_fits(
        size(request), budget, f"TGD: the request for the parameter with role {param.role!r}"
    )
    return request


async def _propose(
    param: Variable,
    gradients: list[Variable],
    buffer: Sequence | None,
    opts: TGDOptions,
    instruction_lines: Sequence[str],
    proposal_check: ProposalCheck | None,
) -> _Outcome | None:
    feedback = _feedback_texts(gradients)
    if not feedback:
        return None
    window = list(buffer or [])[-opts.momentum:] if opts.momentum else []
    notes: list[str] = []
    try:
        request = await _fit(param, _Request(feedback, window, opts.in_context_examples), opts,
                             notes)
    except Unreadable as problem:
        # No momentum entry either: the raw feedback is what did not fit the budget.
        return _Outcome(feedback=None, notes=[str(problem)])
    old = copy.deepcopy(param.data)

    def accept(reply: str) -> Any:
        new = _parse_proposal(reply, old, instruction_lines)
        problem = proposal_check(new) if proposal_check is not None else None
        if problem:
            raise Unreadable(f"the proposal fails the user's check: {problem}")
        return new

    try:
        new_data = await ask(
            opts.model_client,
            request.messages(param, opts),
            accept,
            what=f"TGD (parameter with role {param.role!r})",
            repair=fill_template(prompts.RETRY_MESSAGE, {"tag": prompts.PROPOSAL_TAG}),
            completion_args=opts.completion_args,
            schema=("proposal", _proposal_schema(
                old, opts.model_client.output_reserve(opts.completion_args)
            )),
            retries=opts.max_retries,
        )
    except ReplyParseError as error:
        notes.append(
            f"no acceptable proposal after {len(error.reasons)} request(s): "
            + "; ".join(error.reasons)
        )
        return _Outcome(feedback=request.feedback, notes=notes)
    return _Outcome(changed=True, new_data=new_data, feedback=request.feedback, notes=notes)


def _check_minimal_fits(params: Sequence[Variable], opts: TGDOptions) -> None:
    """Refuse, before anything is sent, a parameter whose value, constraints and instructions
    alone pass the optimizer model's window."""
    client = opts.model_client
    budget = token_budget(client, opts.completion_args)
    for param in params:
        minimal = _Request([], [], []).messages(param, opts)
        check_fits(
            client.count_message_tokens(minimal), budget,
            f"TGD: the parameter with role {param.role!r} (its value, the constraints and the "
            "instructions)",
        )


def _commit(
    params: Sequence[Variable],
    outcomes: Sequence[_Outcome | None],
    momentum_buffer_list: list[list | None],
    momentum: int,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Write every accepted value and momentum entry; return the step records and warnings."""
    records, messages = [], []
    with no_grad():
        for index, (param, outcome) in enumerate(zip(params, outcomes)):
            if outcome is None:
                continue
            before = copy.deepcopy(param.data)
            if outcome.changed:
                param.copy_(outcome.new_data)
            buffer = momentum_buffer_list[index]
            if outcome.feedback is not None and (momentum or buffer is not None):
                buffer = [] if buffer is None else buffer
                buffer.append({"value": before, "gradients": outcome.feedback})
                if len(buffer) > momentum:
                    del buffer[: len(buffer) - momentum]
                momentum_buffer_list[index] = buffer
            for note in outcome.notes:
                verdict = "was updated, but" if outcome.changed else "kept its value:"
                messages.append(f"TGD: parameter with role {param.role!r} {verdict} {note}")
            records.append({
                "role": param.role,
                "before": before,
                "after": copy.deepcopy(param.data),
                "feedback": list(outcome.feedback or []),
                "verdict": "accepted" if outcome.changed else "rejected",
                "reason": None if outcome.changed else "; ".join(outcome.notes) or None,
            })
    return records, messages


async def _astep(
    jobs: Sequence[tuple[list[Variable], list[list[Variable]], list, TGDOptions]],
    proposal_check: ProposalCheck | None,
) -> list[list[_Outcome | None]]:
    for params, grads, _, opts in jobs:
        _check_minimal_fits([p for p, g in zip(params, grads) if _feedback_texts(g)], opts)

    async def group(
        params: list[Variable], grads: list[list[Variable]], buffers: list, opts: TGDOptions
    ) -> list[_Outcome | None]:
        lines = _instruction_lines(opts.templates())
        return await gather_all(
            [
                _propose(param, list(gradients), buffer, opts, lines, proposal_check)
                for param, gradients, buffer in zip(params, grads, buffers)
            ]
        )

    return await gather_all([group(*job) for job in jobs])


def tgd(
    params: Sequence[Variable],
    grads: Sequence[Sequence[Variable]],
    momentum_buffer_list: list[list[dict[str, Any]] | None],
    *,
    proposal_check: ProposalCheck | None = None,
    **options: Any,
) -> None:
    """Functional Textual Gradient Descent: one step over ``params``. See :class:`TGD`.

    Parameters whose gradients hold no feedback are skipped. The others are sent to the model
    concurrently; once every request has finished, accepted values are copied into the
    parameters (under ``no_grad``) and ``momentum_buffer_list[i]`` gets the entry
    ``{"value": old value, "gradients": [feedback shown]}``, trimmed to the last ``momentum``.

    Args:
        params: The parameters to update.
        grads: The gradients of each parameter (usually ``param.grad``).
        momentum_buffer_list: Per parameter, its momentum entries or ``None``; updated in place.
        proposal_check: ``check(new_value) -> str | None``; a returned text rejects the proposal.
        **options: The :class:`TGDOptions` (``model_client`` is required); other keywords are
            completion arguments.

    Raises:
        ValueError, TypeError: For invalid options (nothing is changed).
        ContextWindowError: For a parameter that cannot fit the model's window (nothing sent).
        Exception: Whatever the model client raises; nothing is changed then.
    """
    if not len(params) == len(grads) == len(momentum_buffer_list):
        raise ValueError(
            f"tgd: params, grads and momentum_buffer_list must have the same length, got "
            f"{len(params)}, {len(grads)} and {len(momentum_buffer_list)}"
        )
    chosen, completion = TGDOptions.split(options)
    opts = TGDOptions(**chosen, **completion)
    (outcomes,) = run(_astep([(list(params), list(grads), momentum_buffer_list, opts)],
                             proposal_check))
    _, messages = _commit(params, outcomes, momentum_buffer_list, opts.momentum)
    for message in messages:
        warnings.warn(message, ProposalRejectedWarning, stacklevel=2)


class TGD(Optimizer):
    """Textual Gradient Descent: an optimizer model rewrites each parameter from its feedback.

    Each :meth:`step` sends one request per parameter whose gradients hold feedback, all
    concurrently; a parameter without feedback costs nothing. The request shows the
    parameter's role, its full value, every piece of feedback, the momentum window, the
    constraints and the in-context examples, fitted to the model's window. When every request
    has finished, accepted values are copied into the parameters in place; a parameter whose
    replies were all rejected keeps its value, with a :class:`ProposalRejectedWarning`. If a
    request raises, nothing is changed.

    Per-parameter state: ``state[p]["momentum_buffer"]`` is the list of the last ``momentum``
    entries ``{"value": value before the step, "gradients": [feedback shown]}``, oldest first
    (absent while ``momentum`` is 0). After each step, :attr:`last_step` lists, per parameter
    that had feedback, its value before and after, the feedback shown and the verdict.

    Args:
        params: Parameters, or dicts defining parameter groups (each may set any option).
        model_client: The optimizer model.
        proposal_check: A mechanical check of your own, ``check(new_value) -> str | None``
            (e.g. a length limit or required words): a returned text rejects the proposal like
            a broken placeholder does. It is code, so it is not part of ``state_dict``.
        **options: The other :class:`TGDOptions` (``messages``, ``inputs``, ``constraints``,
            ``momentum``, ``in_context_examples``, ``max_retries``, ``gradient_token_budget``,
            ``completion_args``); any other keyword is a completion argument of every request
            (``temperature``, ...).

    Example:
        >>> import afnio
        >>> from afnio.testing import ScriptedModel
        >>> p = afnio.Variable("Be nice.", role="system prompt", requires_grad=True)
        >>> opt = TGD([p], model_client=ScriptedModel(["<IMPROVED_VARIABLE>Be kind."
        ...                                           "</IMPROVED_VARIABLE>"]))
        >>> opt.step()                   # no gradients: nothing is sent
        >>> p.append_grad(afnio.Variable("say kind"))
        >>> opt.step()
        >>> p.data
        'Be kind.'
        >>> opt.last_step[0]["verdict"]
        'accepted'
    """

    def __init__(
        self,
        params: ParamsT,
        model_client: ChatCompletionModel,
        *,
        proposal_check: ProposalCheck | None = None,
        **options: Any,
    ) -> None:
        if proposal_check is not None and not callable(proposal_check):
            raise TypeError(
                f"TGD: proposal_check must be callable, got {type(proposal_check).__name__}"
            )
        self.proposal_check = proposal_check
        self.last_step: list[dict[str, Any]] = []
        defaults = optimizer_defaults([TGDOptions], options, model_client=model_client)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, after checking its options (see :class:`Optimizer`).

        Raises:
            ValueError, TypeError: For invalid options; the group is then not added.
        """
        if isinstance(param_group, dict):
            check_group([TGDOptions], self.defaults, param_group)
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], T] | None = None) -> T | None:
        """Run one TGD step over every parameter group.

        Args:
            closure: Re-evaluates the program and returns the loss (run under ``enable_grad``).

        Returns:
            The closure's result, or ``None``.

        Raises:
            ValueError: If a group's templates no longer match their inputs.
            ContextWindowError: For a parameter that cannot fit the model's window.
            Exception: Whatever the model client raises; no parameter or state is changed then.
        """
        loss = self._evaluate_closure(closure)
        jobs = []
        for group in self.param_groups:
            params = list(dict.fromkeys(group["params"]))
            buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params]
            jobs.append((params, [list(p.grad) for p in params], buffers,
                         TGDOptions.from_group(group)))
        all_outcomes = run(_astep(jobs, self.proposal_check))
        index_of = {id(p): i for i, p in enumerate(
            p for group in self.param_groups for p in dict.fromkeys(group["params"]))}
        records, messages = [], []
        for (params, _, buffers, opts), outcomes in zip(jobs, all_outcomes):
            group_records, group_messages = _commit(params, outcomes, buffers, opts.momentum)
            changed = [p for p, outcome in zip(params, outcomes) if outcome is not None]
            records += [{"index": index_of[id(p)], **r} for p, r in zip(changed, group_records)]
            messages += group_messages
            for param, buffer in zip(params, buffers):
                if buffer is not None:
                    self.state[param]["momentum_buffer"] = buffer
        self.last_step = records
        for message in messages:
            warnings.warn(message, ProposalRejectedWarning, stacklevel=2)
        return loss

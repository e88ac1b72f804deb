"""Textual Gradient Descent: an optimizer model rewrites each parameter from its gradients.

:class:`TGD` is the optimizer; :func:`tgd` is its functional form (as ``torch.optim.sgd`` is to
``SGD``). One step sends one request per parameter that has feedback, all at once, and only when
every request has finished writes the accepted values (in place, so modules see them at once).

A reply is used only when it passes mechanical checks: the new value sits between
``<IMPROVED_VARIABLE>`` tags, keeps exactly the ``{placeholders}`` of the old value, contains none
of the optimizer's tags or instruction lines, and has the old value's shape. A rejected reply is
retried (``max_retries`` times); after that the parameter keeps its value and a
:class:`ProposalRejectedWarning` says why.

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

import asyncio
import copy
import dataclasses
import json
import re
import string
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from afnio._runtime import run
from afnio._variable import Variable, validate_data
from afnio.autodiff._feedback import chunk_by_budget
from afnio.autodiff.grad_mode import no_grad
from afnio.cognitive.parameter import ParameterType
from afnio.models.model import ChatCompletionModel
from afnio.models.tokens import count_tokens
from afnio.optim import prompts
from afnio.optim.optimizer import Optimizer, ParamsT

__all__ = ["TGD", "ProposalRejectedWarning", "tgd"]

T = TypeVar("T")

BUILTIN_PLACEHOLDERS = frozenset(
    {"variable_role", "variable", "gradients", "past_iterations", "constraints", "examples"}
)
"""Placeholders TGD fills itself; ``inputs`` may not use these names."""

DEFAULT_GRADIENT_TOKEN_BUDGET = 4000
_MAX_CONDENSE_ROUNDS = 4
_MIN_INSTRUCTION_LINE = 30
_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


class ProposalRejectedWarning(UserWarning):
    """A parameter kept its value because no acceptable proposal came back."""


class _Rejected(Exception):
    """A reply that can't be used; the message says why (and is sent back on retry)."""


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class _Options:
    model_client: ChatCompletionModel
    messages: list[dict[str, Any]]
    inputs: dict[str, Any]
    constraints: list[Any]
    momentum: int
    in_context_examples: list[Any]
    max_retries: int
    gradient_token_budget: int
    completion_args: dict[str, Any]
    proposal_check: Callable[[Any], str | None] | None = None


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


def _template_fields(text: str, where: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"{where}: malformed braces in message template ({exc})") from None
    names = set()
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(
                f"{where}: placeholder {{{name}}} is not a plain name; use {{{{ and }}}} for "
                "literal braces"
            )
        names.add(name)
    return names


def _build_options(
    model_client: Any,
    messages: Sequence[dict[str, Any]] | None,
    inputs: dict[str, Any] | None,
    constraints: Iterable[Any] | None,
    momentum: Any,
    in_context_examples: Iterable[Any] | None,
    max_retries: Any,
    gradient_token_budget: Any,
    completion_args: dict[str, Any] | None,
    where: str = "TGD",
) -> _Options:
    """Validate one group's options (raising before anything is changed)."""
    if not isinstance(model_client, ChatCompletionModel):
        raise TypeError(
            f"{where}: model_client must be a ChatCompletionModel, got "
            f"{type(model_client).__name__}"
        )
    for name, value, low in (
        ("momentum", momentum, 0),
        ("max_retries", max_retries, 0),
        ("gradient_token_budget", gradient_token_budget, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{where}: {name} must be an int >= {low}, got {value!r}")
    completion_args = dict(completion_args or {})
    secret = [key for key in completion_args if "api_key" in key.lower()]
    if secret:
        raise ValueError(
            f"{where}: pass API keys to the model client, not as completion args ({secret})"
        )
    inputs = dict(inputs or {})
    clashing = sorted(BUILTIN_PLACEHOLDERS & set(inputs))
    if clashing:
        raise ValueError(
            f"{where}: inputs {clashing} clash with placeholders the optimizer fills itself "
            f"({sorted(BUILTIN_PLACEHOLDERS)})"
        )
    templates = prompts.TGD_MESSAGES if messages is None else list(messages)
    if not templates:
        raise ValueError(f"{where}: messages must not be empty")
    used: set[str] = set()
    for index, message in enumerate(templates):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TypeError(
                f"{where}: messages[{index}] must be a dict with 'role' and 'content', "
                f"got {message!r}"
            )
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(
                f"{where}: messages[{index}] role must be 'system', 'user' or 'assistant', "
                f"got {message['role']!r}"
            )
        text = _content_text(message["content"], f"{where}: messages[{index}]")
        used |= _template_fields(text, f"{where}: messages[{index}]")
    missing = used - BUILTIN_PLACEHOLDERS - set(inputs)
    unused = set(inputs) - used
    if missing or unused:
        raise ValueError(
            f"{where}: message placeholders and inputs don't match: placeholders "
            f"{sorted(used)}, inputs {sorted(inputs)} (built-in: {sorted(BUILTIN_PLACEHOLDERS)}); "
            f"without an input: {sorted(missing)}, not used by any placeholder: {sorted(unused)}"
        )
    return _Options(
        model_client=model_client,
        messages=templates,
        inputs=inputs,
        constraints=list(constraints or []),
        momentum=momentum,
        in_context_examples=list(in_context_examples or []),
        max_retries=max_retries,
        gradient_token_budget=gradient_token_budget,
        completion_args=completion_args,
    )


def _group_options(group: dict[str, Any]) -> _Options:
    return _build_options(
        group["model_client"],
        group["messages"],
        group["inputs"],
        group["constraints"],
        group["momentum"],
        group["in_context_examples"],
        group["max_retries"],
        group["gradient_token_budget"],
        group["completion_args"],
    )


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


def _past_iterations(buffer: Sequence[dict[str, Any]], momentum: int) -> str:
    window = list(buffer)[-momentum:] if momentum else []
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


def _render(template: str, values: dict[str, str], where: str) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"{where}: cannot fill message template ({type(exc).__name__}: {exc}); its "
            "placeholders changed since the optimizer was built"
        ) from None


def _request(param: Variable, feedback: list[str], buffer: Sequence, opts: _Options) -> list:
    values = {name: _text_of(value) for name, value in opts.inputs.items()}
    values.update(
        variable_role=_describe(param),
        variable=_section("VARIABLE", _format_value(param.data)),
        gradients=_section("FEEDBACK", _numbered(feedback)),
        past_iterations=_past_iterations(buffer, opts.momentum),
        constraints=(
            _section("CONSTRAINTS", _numbered([_text_of(c) for c in opts.constraints])) + "\n\n"
            if opts.constraints
            else ""
        ),
        examples=(
            _section(
                "EXAMPLES",
                "\n".join(_section("EXAMPLE", _text_of(e)) for e in opts.in_context_examples),
            )
            + "\n\n"
            if opts.in_context_examples
            else ""
        ),
    )
    where = f"TGD (parameter with role {param.role!r})"
    return [
        {
            "role": message["role"],
            "content": _render(_content_text(message["content"], where), values, where),
        }
        for message in opts.messages
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
def _between_tags(reply: str, tag: str) -> str:
    """The text inside the reply's last ``<tag>…</tag>`` pair.

    A reply that is a JSON object with a string under the lower-cased tag name is accepted too,
    so a model constrained to a JSON schema (a small local model, say) can answer.
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    start = reply.rfind(opening)
    if start < 0:
        value = _json_field(reply, tag.lower())
        if value is not None:
            return value.strip()
        raise _Rejected(f"the reply has no <{tag}> tag")
    start += len(opening)
    end = reply.find(closing, start)
    if end < 0:
        raise _Rejected(f"the reply has no </{tag}> after its last <{tag}>")
    return reply[start:end].strip()


def _json_field(reply: str, key: str) -> str | None:
    try:
        value = json.loads(reply.strip(), strict=False)
    except json.JSONDecodeError:
        return None
    field_value = value.get(key) if isinstance(value, dict) else None
    return field_value if isinstance(field_value, str) else None


def _check_text(new: str, old: str, instruction_lines: Sequence[str], where: str) -> None:
    if not new and old.strip():
        raise _Rejected(f"{where} is empty")
    old_fields, new_fields = set(_PLACEHOLDER.findall(old)), set(_PLACEHOLDER.findall(new))
    if old_fields - new_fields:
        dropped = ", ".join(f"{{{name}}}" for name in sorted(old_fields - new_fields))
        raise _Rejected(f"{where} drops the placeholder(s) {dropped}")
    if new_fields - old_fields:
        added = ", ".join(f"{{{name}}}" for name in sorted(new_fields - old_fields))
        raise _Rejected(f"{where} adds the placeholder(s) {added}, which nothing would fill")
    lowered_new, lowered_old = new.lower(), old.lower()
    for tag in prompts.MARKUP_TAGS:
        for marker in (f"<{tag}>", f"</{tag}>"):
            if marker.lower() in lowered_new and marker.lower() not in lowered_old:
                raise _Rejected(f"{where} contains the optimizer's tag {marker}")
    for line in instruction_lines:
        if line in new and line not in old:
            raise _Rejected(f"{where} contains the optimizer's instruction {line[:60]!r}")


def _accept(
    reply: str,
    old: Any,
    instruction_lines: Sequence[str],
    proposal_check: Callable[[Any], str | None] | None = None,
) -> Any:
    """The new value proposed by ``reply``, or :class:`_Rejected` saying what is wrong."""
    new = _parse_proposal(reply, old, instruction_lines)
    if proposal_check is not None:
        problem = proposal_check(new)
        if problem:
            raise _Rejected(f"the proposal fails the user's check: {problem}")
    return new


def _parse_proposal(reply: str, old: Any, instruction_lines: Sequence[str]) -> Any:
    text = _between_tags(reply, prompts.PROPOSAL_TAG)
    if isinstance(old, str):
        _check_text(text, old, instruction_lines, "the proposal")
        return text
    if isinstance(old, (int, float)):
        kind = type(old)
        try:
            return kind(text)
        except ValueError:
            raise _Rejected(
                f"the proposal {text[:40]!r} is not a{'n int' if kind is int else ' float'}"
            ) from None
    try:
        new = json.loads(text)
    except json.JSONDecodeError:
        raise _Rejected("the proposal is not a JSON list") from None
    if not isinstance(new, list) or len(new) != len(old):
        raise _Rejected(f"the proposal must be a JSON list of {len(old)} elements")
    try:
        validate_data(new)
    except TypeError as exc:
        raise _Rejected(f"the proposal is not a valid list: {exc}") from None
    old_is_text = any(isinstance(item, str) for item in old)
    if new and old and old_is_text != isinstance(new[0], str):
        kind = "strings" if old_is_text else "numbers"
        raise _Rejected(f"the proposal's elements must be {kind}")
    if old_is_text:
        for index, (new_item, old_item) in enumerate(zip(new, old)):
            _check_text(new_item, old_item, instruction_lines, f"element {index} of the proposal")
    return new


# --------------------------------------------------------------------------- proposing
@dataclass
class _Outcome:
    changed: bool = False
    new_data: Any = None
    feedback: list[str] | None = None
    notes: list[str] = field(default_factory=list)


async def _gather_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Await all, and only then raise the first exception (no call is left running)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def _ask(
    opts: _Options, messages: list[dict[str, str]], tag: str, parse: Callable[[str], T]
) -> tuple[bool, T | None, list[str]]:
    """One request plus up to ``max_retries`` retries; returns (ok, value, rejection reasons)."""
    conversation = messages
    reasons: list[str] = []
    for _ in range(opts.max_retries + 1):
        reply = await opts.model_client.achat(conversation, **opts.completion_args)
        try:
            return True, parse(reply), reasons
        except _Rejected as rejection:
            reasons.append(str(rejection))
            retry = prompts.RETRY_MESSAGE.format(reason=rejection, tag=tag)
            conversation = [
                *messages,
                {"role": "assistant", "content": reply},
                {"role": "user", "content": retry},
            ]
    return False, None, reasons


def _token_counts(texts: Sequence[str], opts: _Options) -> list[int]:
    return [count_tokens(text, model=opts.model_client.model or None) for text in texts]


async def _condense(param: Variable, feedback: list[str], opts: _Options) -> tuple[list[str], list]:
    """Condense ``feedback`` chunk by chunk until it fits the token budget.

    Returns the feedback to show and notes for the warning. Raises :class:`_Rejected` when a
    chunk can't be condensed after the retries.
    """
    notes: list[str] = []
    budget = opts.gradient_token_budget
    sizes = _token_counts(feedback, opts)
    total = sum(sizes)
    rounds = 0
    while total > budget and rounds < _MAX_CONDENSE_ROUNDS:
        rounds += 1
        chunks = [[feedback[i] for i in group] for group in chunk_by_budget(0, sizes, budget)]
        requests = [
            [
                {
                    "role": message["role"],
                    "content": message["content"].format(
                        variable_role=_describe(param), feedback=_numbered(chunk)
                    ),
                }
                for message in prompts.CONDENSE_MESSAGES
            ]
            for chunk in chunks
        ]

        def parse(reply: str) -> str:
            text = _between_tags(reply, prompts.CONDENSED_TAG)
            if not text:
                raise _Rejected("the condensed feedback is empty")
            return text

        answers = await _gather_all(
            _ask(opts, request, prompts.CONDENSED_TAG, parse) for request in requests
        )
        failed = [reasons for ok, _, reasons in answers if not ok]
        if failed:
            raise _Rejected(
                "its gradients exceed the token budget and could not be condensed: "
                + "; ".join(failed[0])
            )
        condensed = [text for _, text, _ in answers]
        condensed_sizes = _token_counts(condensed, opts)
        condensed_total = sum(condensed_sizes)
        if condensed_total >= total:
            break
        feedback, sizes, total = condensed, condensed_sizes, condensed_total
    if total > budget:
        notes.append(
            f"its gradients still use {total} tokens after condensing, over the budget of "
            f"{budget}; they were sent in full"
        )
    return feedback, notes


async def _propose(
    param: Variable,
    gradients: list[Variable],
    buffer: Sequence | None,
    opts: _Options,
    instruction_lines: Sequence[str],
) -> _Outcome | None:
    feedback = _feedback_texts(gradients)
    if not feedback:
        return None
    try:
        feedback, notes = await _condense(param, feedback, opts)
    except _Rejected as rejection:
        # No momentum entry either: the raw feedback is what did not fit the budget.
        return _Outcome(feedback=None, notes=[str(rejection)])
    messages = _request(param, feedback, buffer or [], opts)
    old = copy.deepcopy(param.data)
    ok, new_data, reasons = await _ask(
        opts,
        messages,
        prompts.PROPOSAL_TAG,
        lambda reply: _accept(reply, old, instruction_lines, opts.proposal_check),
    )
    if not ok:
        notes.append(
            f"no acceptable proposal after {len(reasons)} request(s): " + "; ".join(reasons)
        )
    return _Outcome(changed=ok, new_data=new_data, feedback=feedback, notes=notes)


async def _apropose(
    params: Sequence[Variable],
    grads: Sequence[Sequence[Variable]],
    momentum_buffer_list: Sequence[list | None],
    opts: _Options,
) -> list[_Outcome | None]:
    instruction_lines = _instruction_lines(opts.messages)
    return await _gather_all(
        _propose(param, list(gradients), buffer, opts, instruction_lines)
        for param, gradients, buffer in zip(params, grads, momentum_buffer_list)
    )


def _commit(
    params: Sequence[Variable],
    outcomes: Sequence[_Outcome | None],
    momentum_buffer_list: list[list | None],
    momentum: int,
) -> list[str]:
    """Write every accepted value and momentum entry; return the warnings to emit."""
    messages = []
    with no_grad():
        for index, (param, outcome) in enumerate(zip(params, outcomes)):
            if outcome is None:
                continue
            entry = {"value": copy.deepcopy(param.data), "gradients": outcome.feedback}
            if outcome.changed:
                param.copy_(outcome.new_data)
            buffer = momentum_buffer_list[index]
            if outcome.feedback is not None and (momentum or buffer is not None):
                buffer = [] if buffer is None else buffer
                buffer.append(entry)
                if len(buffer) > momentum:
                    del buffer[: len(buffer) - momentum]
                momentum_buffer_list[index] = buffer
            for note in outcome.notes:
                verdict = "was updated, but" if outcome.changed else "kept its value:"
                messages.append(f"TGD: parameter with role {param.role!r} {verdict} {note}")
    return messages


def _check_lengths(params: Sequence, grads: Sequence, buffers: Sequence) -> None:
    if not len(params) == len(grads) == len(buffers):
        raise ValueError(
            f"tgd: params, grads and momentum_buffer_list must have the same length, got "
            f"{len(params)}, {len(grads)} and {len(buffers)}"
        )


def tgd(
    params: Sequence[Variable],
    grads: Sequence[Sequence[Variable]],
    momentum_buffer_list: list[list[dict[str, Any]] | None],
    *,
    model_client: ChatCompletionModel,
    messages: Sequence[dict[str, Any]] | None = None,
    inputs: dict[str, Any] | None = None,
    constraints: Iterable[str | Variable] | None = None,
    momentum: int = 0,
    in_context_examples: Iterable[str | Variable] | None = None,
    max_retries: int = 2,
    gradient_token_budget: int = DEFAULT_GRADIENT_TOKEN_BUDGET,
    completion_args: dict[str, Any] | None = None,
    proposal_check: Callable[[Any], str | None] | None = None,
) -> None:
    """Functional Textual Gradient Descent: one step over ``params``. See :class:`TGD`.

    Parameters whose gradients hold no feedback are skipped. The others are sent to
    ``model_client`` concurrently; once every request has finished, accepted values are copied
    into the parameters (under ``no_grad``) and ``momentum_buffer_list[i]`` gets the entry
    ``{"value": old value, "gradients": [feedback shown]}``, trimmed to the last ``momentum``.

    Args:
        params: The parameters to update.
        grads: The gradients of each parameter (usually ``param.grad``).
        momentum_buffer_list: Per parameter, its momentum entries or ``None``; updated in place.
        model_client: The optimizer model.
        messages: Request templates (see :mod:`afnio.optim.prompts`); default
            :data:`~afnio.optim.prompts.TGD_MESSAGES`.
        inputs: Values for the templates' own placeholders.
        constraints: Rules every new value must follow, shown to the model.
        momentum: How many past (value, gradients) entries to keep and show.
        in_context_examples: Examples of good values, shown to the model.
        max_retries: Extra requests after a rejected reply.
        gradient_token_budget: Token budget of the feedback in one request; past it, feedback
            is condensed chunk by chunk by the same model.
        completion_args: Extra arguments for every request.
        proposal_check: ``check(new_value) -> str | None``; a returned text rejects the
            proposal (and is shown to the model on retry), ``None`` or ``""`` accepts it.

    Raises:
        ValueError, TypeError: For invalid options (nothing is changed).
        Exception: Whatever the model client raises; nothing is changed then.
    """
    opts = _build_options(
        model_client, messages, inputs, constraints, momentum, in_context_examples,
        max_retries, gradient_token_budget, completion_args, where="tgd",
    )
    opts = dataclasses.replace(opts, proposal_check=proposal_check)
    _check_lengths(params, grads, momentum_buffer_list)
    outcomes = run(_apropose(params, grads, momentum_buffer_list, opts))
    for message in _commit(params, outcomes, momentum_buffer_list, momentum):
        warnings.warn(message, ProposalRejectedWarning, stacklevel=2)


class TGD(Optimizer):
    """Textual Gradient Descent: an optimizer model rewrites each parameter from its feedback.

    Each :meth:`step` sends one request per parameter whose gradients hold feedback, all
    concurrently; a parameter without feedback costs nothing. The request shows the
    parameter's role, its full value, every piece of feedback, the momentum window, the
    constraints and the in-context examples. When every request has finished, accepted values
    are copied into the parameters in place; a parameter whose replies were all rejected keeps
    its value, with a :class:`ProposalRejectedWarning`. If a request raises, nothing is changed.

    Per-parameter state: ``state[p]["momentum_buffer"]`` is the list of the last ``momentum``
    entries ``{"value": value before the step, "gradients": [feedback shown]}``, oldest first
    (absent while ``momentum`` is 0). Every option below can be set per parameter group.

    Args:
        params: Parameters, or dicts defining parameter groups.
        model_client: The optimizer model.
        messages: Request templates with placeholders (see :mod:`afnio.optim.prompts` for the
            built-in ones); ``None`` uses :data:`~afnio.optim.prompts.TGD_MESSAGES`.
        inputs: Values for the other placeholders of ``messages``. A placeholder without an
            input, or an input without a placeholder, is a ``ValueError``.
        constraints: Rules every new value must follow (str or Variable), shown to the model.
        momentum: How many past (value, gradients) entries to keep and show.
        in_context_examples: Examples of good values (str or Variable), shown to the model.
        max_retries: Extra requests after a rejected reply (default 2).
        gradient_token_budget: Token budget of the feedback in one request; past it, the
            feedback is condensed chunk by chunk (one request per chunk) by the same model,
            never truncated.
        proposal_check: A mechanical check of your own, ``check(new_value) -> str | None``
            (e.g. a length limit or required words): a returned text rejects the proposal like
            a broken placeholder does. It is code, so it is not part of ``state_dict``.
        **completion_args: Extra arguments for every request (``temperature``, ...).

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
    """

    def __init__(
        self,
        params: ParamsT,
        model_client: ChatCompletionModel,
        messages: Sequence[dict[str, Any]] | None = None,
        inputs: dict[str, Any] | None = None,
        constraints: Iterable[str | Variable] | None = None,
        momentum: int = 0,
        *,
        in_context_examples: Iterable[str | Variable] | None = None,
        max_retries: int = 2,
        gradient_token_budget: int = DEFAULT_GRADIENT_TOKEN_BUDGET,
        proposal_check: Callable[[Any], str | None] | None = None,
        **completion_args: Any,
    ) -> None:
        if proposal_check is not None and not callable(proposal_check):
            raise TypeError(
                f"TGD: proposal_check must be callable, got {type(proposal_check).__name__}"
            )
        self.proposal_check = proposal_check
        defaults = dict(
            model_client=model_client,
            messages=None if messages is None else list(messages),
            inputs=dict(inputs or {}),
            constraints=list(constraints or []),
            momentum=momentum,
            in_context_examples=list(in_context_examples or []),
            max_retries=max_retries,
            gradient_token_budget=gradient_token_budget,
            completion_args=completion_args,
        )
        _group_options(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, after checking its options (see :class:`Optimizer`).

        Raises:
            ValueError, TypeError: For invalid options; the group is then not added.
        """
        if isinstance(param_group, dict):
            _group_options({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], T] | None = None) -> T | None:
        """Run one TGD step over every parameter group.

        Args:
            closure: Re-evaluates the program and returns the loss (run under ``enable_grad``).

        Returns:
            The closure's result, or ``None``.

        Raises:
            ValueError: If a group's templates no longer match their inputs.
            Exception: Whatever the model client raises; no parameter or state is changed then.
        """
        loss = self._evaluate_closure(closure)
        jobs = []
        for group in self.param_groups:
            params = list(dict.fromkeys(group["params"]))
            buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params]
            grads = [list(p.grad) for p in params]
            opts = dataclasses.replace(_group_options(group), proposal_check=self.proposal_check)
            jobs.append((group, params, grads, buffers, opts))

        async def propose_all() -> list[list[_Outcome | None]]:
            return await _gather_all(
                _apropose(params, grads, buffers, opts)
                for _, params, grads, buffers, opts in jobs
            )

        all_outcomes = run(propose_all())
        messages = []
        for (group, params, _, buffers, _), outcomes in zip(jobs, all_outcomes):
            messages += _commit(params, outcomes, buffers, group["momentum"])
            for param, buffer in zip(params, buffers):
                if buffer is not None:
                    self.state[param]["momentum_buffer"] = buffer
        for message in messages:
            warnings.warn(message, ProposalRejectedWarning, stacklevel=2)
        return loss

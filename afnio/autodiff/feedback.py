"""The feedback layer: the one way afnio asks a model for text.

Textual gradients of the LM ops and evaluators, GradComponent backward and every optimizer go
through the same five steps, configured once (:mod:`afnio._settings`):

1. **render** — fill a template with afnio's one placeholder rule (:func:`fill_template`);
2. **fit** — measure the prompt with the model's tokenizer against its context window minus the
   request's output reserve (and the gradient token cap, if set); callers chunk or condense what
   can be condensed, and what cannot fit raises :class:`ContextWindowError` before sending
   (:func:`token_budget`, :func:`check_fits`, :func:`chunk_by_budget`);
3. **ask** — send it, with one retry-and-repair policy: a reply that can't be read is shown back
   to the model with the reason, up to ``reply_retries`` times (:func:`ask`); a backend that
   offers structured outputs is asked for a JSON schema instead of tags;
4. **parse** — one parser for tagged (``<TAG>…</TAG>``, the last pair, any case) or JSON
   (``{"tag": …}``) replies (:func:`extract`);
5. **condense** — merge many pieces of feedback in budgeted rounds (:func:`merge_in_rounds`).

Usage is recorded by the clients themselves; the layer counts repairs and salvaged replies
(:func:`get_feedback_stats`).

Template rule (for user templates and afnio's own prompts alike):

* ``{name}``, where ``name`` is a Python identifier, is a placeholder;
* ``{{name}}`` is the literal text ``{name}``;
* every other brace is literal, so JSON such as ``{"score": 1}`` needs no escaping.

Substituted values are never scanned again, so a value containing braces stays as it is.
"""

from __future__ import annotations

import abc
import asyncio
import json
import re
import threading
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from afnio._settings import get_settings, set_settings
from afnio.autodiff import prompts
from afnio.autodiff.graph import FAN_IN_SEPARATOR
from afnio.models.errors import ContextWindowError, StructuredOutputUnsupportedError
from afnio.models.model import ChatCompletionModel

__all__ = [
    "BackwardModel",
    "ContextWindowError",
    "GradientPrompts",
    "OutputFeedback",
    "FeedbackFormatWarning",
    "ReplyParseError",
    "Unreadable",
    "ask",
    "check_fits",
    "chunk_by_budget",
    "element_gradient",
    "extract",
    "fill_prompt",
    "fill_template",
    "gather_all",
    "get_feedback_stats",
    "get_gradient_token_budget",
    "parse_feedback",
    "merge_feedback",
    "merge_in_rounds",
    "placeholders",
    "reset_feedback_stats",
    "salvage_feedback",
    "set_gradient_token_budget",
    "shared_gradient",
    "text_fitting",
    "token_budget",
]

T = TypeVar("T")

_PLACEHOLDER = re.compile(r"\{\{([^\W\d]\w*)\}\}|\{([^\W\d]\w*)\}")


# --------------------------------------------------------------------------- render
def placeholders(template: str) -> list[str]:
    """The placeholder names in ``template``, in order of first appearance.

    Example:
        >>> placeholders('Answer {question} as JSON like {"a": 1}; {{literal}} stays')
        ['question']
    """
    names: list[str] = []
    for match in _PLACEHOLDER.finditer(template):
        name = match.group(2)
        if name is not None and name not in names:
            names.append(name)
    return names


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """Replace each ``{name}`` in ``template`` by ``values[name]`` (see the module's rule).

    Placeholders without a value are left as they are; values are inserted verbatim.

    Example:
        >>> fill_template('Q: {q} -> {"json": {{q}}}', {"q": "2+2?"})
        'Q: 2+2? -> {"json": {q}}'
    """

    def replace(match: re.Match) -> str:
        if match.group(1) is not None:
            return "{" + match.group(1) + "}"
        name = match.group(2)
        return values[name] if name in values else match.group(0)

    return _PLACEHOLDER.sub(replace, template)


def fill_prompt(template: str, values: Mapping[str, str] | None = None) -> str:
    """Fill one of afnio's own prompts: ``values`` plus ``{max_sentences}``, the feedback length
    bound in force (the ``max_feedback_sentences`` setting).

    Example:
        >>> fill_prompt("In at most {max_sentences} sentences, judge {what}.", {"what": "this"})
        'In at most 4 sentences, judge this.'
    """
    bound = get_settings().max_feedback_sentences
    return fill_template(template, {"max_sentences": str(bound), **(values or {})})


# --------------------------------------------------------------------------- fit
def token_budget(
    client: ChatCompletionModel, completion_args: Mapping[str, Any], cap: int | None = None
) -> int:
    """Prompt tokens one request to ``client`` may use: its context window minus the request's
    output reserve, and at most ``cap`` (the gradient token cap) when one is set.

    Example:
        >>> from afnio.testing import ScriptedModel
        >>> token_budget(ScriptedModel(context_window=1000), {"max_tokens": 200})
        800
        >>> token_budget(ScriptedModel(context_window=1000), {"max_tokens": 200}, cap=500)
        500
    """
    available = client.context_window - client.output_reserve(completion_args)
    return min(available, cap) if cap is not None else available


def set_gradient_token_budget(tokens: int | None) -> None:
    """Cap every gradient prompt at ``tokens`` (below the backward model's window, which always
    applies); ``None`` removes the cap. A process-wide setting (see :func:`afnio.settings`).

    A shared variable's gradient prompt that would pass the limit is split into chunks of
    samples, whose feedback is merged by condense calls; nothing is dropped.

    Raises:
        ValueError: If ``tokens`` is not a positive int or None.
    """
    set_settings(gradient_token_budget=tokens)


def get_gradient_token_budget() -> int | None:
    """The gradient prompt cap in force (``None``: the backward model's window is the limit)."""
    return get_settings().gradient_token_budget


def text_fitting(output_tokens: int, wanted: int) -> int:
    """The longest string (in characters) a structured reply may hold so that the whole JSON
    object still closes within ``output_tokens`` (at a cautious 3 characters per token, with
    room for the braces and key), and at most ``wanted``.

    Example:
        >>> text_fitting(48, 600), text_fitting(512, 600)
        (96, 600)
    """
    return max(16, min(wanted, 3 * (output_tokens - 16)))


def check_fits(needed: int, budget: int, what: str) -> None:
    """Raise :class:`ContextWindowError` (before anything is sent) when ``needed`` > ``budget``.

    Args:
        needed: Prompt tokens of the request.
        budget: Tokens available (see :func:`token_budget`).
        what: Names the op and the variable's role.
    """
    if needed > budget:
        raise ContextWindowError(
            f"{what}: the prompt needs {needed} tokens but only {budget} are available (the "
            "model's context window minus its output reserve, or the gradient token cap); "
            "nothing was sent",
            needed=needed,
            available=budget,
        )


def chunk_by_budget(base_tokens: int, item_tokens: Sequence[int], budget: int) -> list[list[int]]:
    """Group item indices, in order, so each group's ``base + items`` stays within ``budget``.

    An item that alone passes the budget gets a group of its own (it is never cut; the caller
    decides whether it can be condensed or must be refused).

    Example:
        >>> chunk_by_budget(10, [5, 5, 5, 30, 1], 22)
        [[0, 1], [2], [3], [4]]
    """
    groups: list[list[int]] = []
    current: list[int] = []
    used = base_tokens
    for index, tokens in enumerate(item_tokens):
        if current and used + tokens > budget:
            groups.append(current)
            current, used = [], base_tokens
        current.append(index)
        used += tokens
    if current:
        groups.append(current)
    return groups


# --------------------------------------------------------------------------- parse
class ReplyParseError(ValueError):
    """A model's reply could not be read, even after repair retries.

    Attributes:
        reply: The last reply.
        reasons: Why each reply was unreadable, in order.
    """

    def __init__(self, message: str, reply: str, reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.reply = reply
        self.reasons = list(reasons)


class Unreadable(Exception):
    """Raised by a reply parser: the reply can't be used; the message says why (and is shown to
    the model in the repair request)."""


class FeedbackFormatWarning(UserWarning):
    """A feedback reply lacked its format even after repairs; its text was used as it is."""


def _last_tagged(reply: str, tag: str) -> str | None:
    """The text between the last closing tag and the opening tag nearest before it."""
    lowered, opening, closing = reply.lower(), f"<{tag.lower()}>", f"</{tag.lower()}>"
    end = lowered.rfind(closing)
    start = lowered.rfind(opening, 0, end) if end >= 0 else -1
    return reply[start + len(opening):end].strip() if start >= 0 else None


def _json_objects(reply: str) -> list[dict]:
    """Every JSON object in ``reply`` (fenced or bare), outermost first."""
    decoder = json.JSONDecoder(strict=False)  # raw newlines: small models emit them
    objects, position = [], 0
    while (start := reply.find("{", position)) >= 0:
        try:
            value, end = decoder.raw_decode(reply, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        if isinstance(value, dict):
            objects.append(value)
        position = end
    return objects


def extract(reply: str, tag: str) -> str | None:
    """The text a reply gives for ``tag``: inside its last ``<TAG>…</TAG>`` pair (any case; the
    opening tag nearest before the last closing one, so an echo of the instructions before the
    answer does no harm), else the
    string under ``tag.lower()`` in the last JSON object that has that key (a number or a list
    there comes back as its JSON text).

    Example:
        >>> extract("Use <FEEDBACK> and </FEEDBACK>: <FEEDBACK>Be brief.</FEEDBACK>", "FEEDBACK")
        'Be brief.'
        >>> extract("I answer in <ANSWER> tags: <ANSWER>4</ANSWER>", "answer")
        '4'
        >>> extract('```json\\n{"score": 0.5, "explanation": "half"}\\n```', "SCORE")
        '0.5'
        >>> extract("no answer here", "FEEDBACK") is None
        True
    """
    tagged = _last_tagged(reply, tag)
    if tagged is not None:
        return tagged
    key = tag.lower()
    for value in reversed(_json_objects(reply)):
        item = value.get(key)
        if isinstance(item, str):
            return item.strip()
        if isinstance(item, (int, float, list)) and not isinstance(item, bool):
            return json.dumps(item, ensure_ascii=False)
    return None


def salvage_feedback(reply: str) -> str | None:
    """An untagged reply as feedback: its text without markup, or ``None`` when nothing is
    left but boilerplate (no words at all, or a bare acknowledgement).

    Example:
        >>> salvage_feedback("The prompt should name the three labels.")
        'The prompt should name the three labels.'
        >>> salvage_feedback("```\\n<FEEDBACK>\\n```") is None
        True
        >>> salvage_feedback('{ "feedback" : "Name the three labels and say what each')
        'Name the three labels and say what each'
    """
    reply = re.sub(r'^\s*\{\s*"\w+"\s*:\s*"?', "", reply)  # a cut-off {"feedback": "...
    text = re.sub(r"</?[A-Za-z_][\w ]*>|```\w*", " ", reply)
    text = " ".join(text.split())
    words = re.findall(r"[^\W\d_]+", text)
    if len(words) < 3:
        return None
    return text


def parse_feedback(reply: str) -> str:
    """Feedback from a backward model's reply: ``<FEEDBACK>…</FEEDBACK>`` or ``{"feedback": …}``
    (an empty pair means "no change needed" and gives ``""``).

    Raises:
        Unreadable: When the reply has neither.

    Example:
        >>> parse_feedback("Sure. <FEEDBACK> Name the deadline. </FEEDBACK>")
        'Name the deadline.'
        >>> parse_feedback('{"feedback": "Be brief."}')
        'Be brief.'
    """
    feedback = extract(reply, "FEEDBACK")
    if feedback is None:
        raise Unreadable("the reply has no <FEEDBACK>...</FEEDBACK>")
    return feedback


# --------------------------------------------------------------------------- ask
_stats: Counter[str] = Counter()
_stats_lock = threading.Lock()


def _count(name: str) -> None:
    with _stats_lock:
        _stats[name] += 1


def get_feedback_stats() -> dict[str, int]:
    """Counts since the last reset: ``requests`` sent by the layer, ``repairs`` (re-asks after an
    unreadable reply), ``salvaged`` (untagged feedback used as it is), ``unreadable`` (replies
    given up on) and ``tag_fallbacks`` (backends that refused structured output)."""
    with _stats_lock:
        return {
            name: _stats[name]
            for name in ("requests", "repairs", "salvaged", "unreadable", "tag_fallbacks")
        }


def reset_feedback_stats() -> None:
    """Set the counts of :func:`get_feedback_stats` back to zero."""
    with _stats_lock:
        _stats.clear()


def _quote(reply: str, limit: int = 2000) -> str:
    if len(reply) <= limit:
        return repr(reply)
    return repr(reply[:limit]) + f" ... ({len(reply) - limit} more characters)"


async def _send(
    client: ChatCompletionModel,
    messages: list[dict[str, Any]],
    completion_args: Mapping[str, Any],
    schema: tuple[str, dict[str, Any]] | None,
) -> str:
    """One request; with ``schema`` (name, JSON schema) the backend's structured output is used
    when it has one, and a backend that turns it down is asked again with the tag protocol."""
    args = dict(completion_args)
    if schema is not None and "response_format" not in args:
        structured = client.structured_output_args(schema[1], schema[0])
        if structured:
            _count("requests")
            try:
                return await client.achat(messages, **args, **structured)
            except StructuredOutputUnsupportedError:
                _count("tag_fallbacks")
    _count("requests")
    return await client.achat(messages, **args)


async def ask(
    client: ChatCompletionModel,
    messages: list[dict[str, Any]],
    parse: Callable[[str], T],
    *,
    what: str,
    repair: str,
    completion_args: Mapping[str, Any] | None = None,
    schema: tuple[str, dict[str, Any]] | None = None,
    retries: int | None = None,
    fallback: Callable[[str], T | None] | None = None,
) -> T:
    """Ask ``client`` and read the reply, with afnio's one retry-and-repair policy.

    ``parse(reply)`` returns the value or raises :class:`Unreadable` with the reason. An
    unreadable reply is shown back to the model with ``repair`` (a template whose ``{reason}``
    is filled) up to ``retries`` times. When every reply was unreadable, ``fallback(last
    reply)`` may still give a value (counted and warned about); otherwise
    :class:`ReplyParseError` quotes the last reply.

    Args:
        client: The model to ask.
        messages: The request.
        parse: Reads a reply.
        what: Names the op and variable, for errors and warnings.
        repair: The follow-up user message after an unreadable reply (``{reason}`` is filled).
        completion_args: Arguments of every request.
        schema: ``(name, JSON schema)`` the reply can be constrained to on backends with
            structured outputs (the parser must accept the JSON form).
        retries: Repair requests after the first (default: the ``reply_retries`` setting).
        fallback: Salvages a value from the last unreadable reply, or returns ``None``.

    Raises:
        ReplyParseError: When no reply could be read or salvaged.

    Example:
        >>> from afnio.testing import ScriptedModel
        >>> from afnio._runtime import run
        >>> model = ScriptedModel(["no tags", "<ANSWER>4</ANSWER>"])
        >>> def read(reply):
        ...     value = extract(reply, "ANSWER")
        ...     if value is None:
        ...         raise Unreadable("the reply has no <ANSWER> tags")
        ...     return value
        >>> run(ask(model, [{"role": "user", "content": "2+2?"}], read, what="demo",
        ...         repair="Your reply could not be used: {reason}."))
        '4'
        >>> model.requests[1][0][-1]["content"]
        'Your reply could not be used: the reply has no <ANSWER> tags.'
    """
    if retries is None:
        retries = get_settings().reply_retries
    args = completion_args or {}
    conversation = list(messages)
    reasons: list[str] = []
    reply = ""
    for attempt in range(retries + 1):
        if attempt:
            if client.count_message_tokens(conversation) > token_budget(client, args):
                break  # the repair request itself would not fit the window
            _count("repairs")
        reply = await _send(client, conversation, args, schema)
        try:
            return parse(reply)
        except Unreadable as problem:
            reasons.append(str(problem))
            conversation = [
                *messages,
                {"role": "assistant", "content": reply},
                {"role": "user", "content": fill_template(repair, {"reason": str(problem)})},
            ]
    if fallback is not None:
        salvaged = fallback(reply)
        if salvaged is not None:
            _count("salvaged")
            use = "its text is used as it is" if salvaged else "it counts as no feedback"
            warnings.warn(
                f"{what}: the reply lacked its format after {len(reasons)} attempt(s) "
                f"({reasons[-1]}); {use}",
                FeedbackFormatWarning,
                stacklevel=2,
            )
            return salvaged
    _count("unreadable")
    raise ReplyParseError(
        f"{what}: could not read the model's reply after {len(reasons)} attempt(s) "
        f"({'; '.join(dict.fromkeys(reasons))}); last reply: {_quote(reply)}",
        reply,
        reasons,
    )


async def gather_all(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Run concurrently; if one fails, cancel the others and wait for them before raising, so
    no request is left running.

    Example:
        >>> from afnio._runtime import run
        >>> async def double(x):
        ...     return 2 * x
        >>> run(gather_all([double(1), double(2)]))
        [2, 4]
    """
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        pending = [task for task in tasks if not task.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if not task.cancelled():
                # Mark secondary failures as seen; the first one is already propagating.
                task.exception()


# --------------------------------------------------------------------------- condense
async def _ready(value: T) -> T:
    return value


async def merge_in_rounds(
    texts: Sequence[str],
    *,
    render_part: Callable[[int, str], str],
    part_tokens: Callable[[str], int],
    base_tokens: int,
    budget: int,
    merge: Callable[[list[str]], Awaitable[str]],
    done: Callable[[list[str]], bool] = lambda texts: len(texts) <= 1,
    max_rounds: int | None = None,
    merge_single: bool = False,
) -> list[str]:
    """Merge ``texts`` with condense calls, in budget-sized groups, round by round, until
    ``done(texts)`` (by default: one text is left) or after ``max_rounds``.

    Each round renders the texts as numbered parts (``render_part(number, text)``), groups them
    with :func:`chunk_by_budget` (``base_tokens`` plus each part's ``part_tokens``), and sends
    every group of two or more (of one or more with ``merge_single``) to ``merge``
    concurrently. Nothing is cut: when every part alone fills the budget, parts are merged in
    pairs anyway (the client still refuses a request that passes the model's window).

    Returns:
        The remaining texts (empty texts dropped).
    """
    texts = [text for text in texts if text]
    rounds = 0
    while (len(texts) > 1 or merge_single) and not done(texts) and rounds != max_rounds:
        rounds += 1
        parts = [render_part(number + 1, text) for number, text in enumerate(texts)]
        groups = chunk_by_budget(base_tokens, [part_tokens(part) for part in parts], budget)
        if len(groups) == len(texts) > 1:
            groups = [list(range(n, min(n + 2, len(texts)))) for n in range(0, len(texts), 2)]
        merged = await gather_all(
            [
                merge([parts[i] for i in group])
                if len(group) > 1 or merge_single
                else _ready(texts[group[0]])
                for group in groups
            ]
        )
        texts = [text for text in merged if text]
    return texts


# --------------------------------------------------------------------------- the backward model
@dataclass(frozen=True)
class BackwardModel:
    """The model that writes an op's textual gradients and its completion arguments, captured
    when the op's forward ran (see :meth:`capture`). The other settings (gradient token cap,
    feedback length, retries) are read when the gradients are computed.

    Attributes:
        client: The backward model client (``None`` when none was set at forward time).
        completion_args: Arguments of every gradient request.
        retries: Repair requests after an unreadable reply (``None``: the ``reply_retries``
            setting).
    """

    client: ChatCompletionModel | None
    completion_args: Mapping[str, Any]
    retries: int | None = None

    @classmethod
    def capture(
        cls,
        client: ChatCompletionModel | None = None,
        completion_args: Mapping[str, Any] | None = None,
    ) -> BackwardModel:
        """The op's own client and arguments where given, else those of the settings in force.

        Example:
            >>> from afnio.testing import ScriptedModel
            >>> import afnio
            >>> with afnio.settings(backward_model_client=ScriptedModel(model="critic")):
            ...     captured = BackwardModel.capture()
            >>> captured.client.model
            'critic'
        """
        settings = get_settings()
        return cls(
            client if client is not None else settings.backward_model_client,
            dict(settings.backward_completion_args if completion_args is None else completion_args),
        )

    def require(self, what: str) -> ChatCompletionModel:
        """The client, or a RuntimeError naming ``what`` needed it.

        Raises:
            RuntimeError: When no backward client was set when the forward ran.
        """
        if self.client is None:
            raise RuntimeError(
                f"{what}: no model client to write textual gradients: none was set when this "
                "graph was built; call afnio.set_backward_model_client(...) (or use `with "
                "afnio.settings(backward_model_client=...)`) before the forward pass, or pass "
                "a backward client to the op"
            )
        return self.client

    def budget(self) -> int:
        """Prompt tokens one gradient request may use (window minus output reserve, capped by
        the ``gradient_token_budget`` setting)."""
        return token_budget(
            self.client, self.completion_args, get_settings().gradient_token_budget
        )

    def tokens(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of a request, counted with the backward model's tokenizer."""
        return self.client.count_message_tokens(messages)

    def text_tokens(self, text: str) -> int:
        """Tokens of a piece of text, counted with the backward model's tokenizer."""
        return self.client.count_tokens(text)

    async def feedback(self, messages: list[dict[str, Any]], what: str) -> str:
        """Ask for feedback: checked against the window first, read from tags or JSON, repaired,
        then an untagged reply used as it is, or as no feedback (``""``) when it is empty or
        boilerplate (with a :class:`FeedbackFormatWarning` either way) — never an error.

        Raises:
            ContextWindowError: When the request does not fit the model's window (not sent).
        """
        client = self.require(what)
        check_fits(self.tokens(messages), token_budget(client, self.completion_args), what)
        length = text_fitting(
            client.output_reserve(self.completion_args),
            150 * get_settings().max_feedback_sentences,
        )
        schema = {
            "type": "object",
            "properties": {"feedback": {"type": "string", "maxLength": length}},
            "required": ["feedback"],
        }
        return await ask(
            client,
            messages,
            parse_feedback,
            what=what,
            repair=fill_prompt(prompts.FEEDBACK_FORMAT_CORRECTION),
            completion_args=self.completion_args,
            schema=("feedback", schema),
            retries=self.retries,
            fallback=lambda reply: salvage_feedback(reply) or "",
        )


# ------------------------------------------------------------------------- one variable's gradient
class GradientPrompts(abc.ABC):
    """The requests an op renders to get one variable's textual gradient. The layer decides
    which to send — one per batch element, or one shared request chunked to fit and merged —
    and fits, asks, parses and merges them the same way for every op."""

    @abc.abstractmethod
    def element(self, position: int | None, feedback: str) -> list[dict[str, str]]:
        """The request about the single sample ``position`` (``None``: a scalar call)."""

    @abc.abstractmethod
    def sample(self, position: int, feedback: str) -> str:
        """Sample ``position`` as one block of a shared request."""

    @abc.abstractmethod
    def shared(self, samples: list[str]) -> list[dict[str, str]]:
        """The request about the blocks ``samples`` (rendered by :meth:`sample`)."""

    @abc.abstractmethod
    def merge(self, parts: str) -> list[dict[str, str]]:
        """The request merging the feedback several chunk requests wrote (rendered ``parts``)."""


async def merge_feedback(
    backward: BackwardModel,
    texts: Sequence[str],
    request: Callable[[str], list[dict[str, str]]],
    what: str,
) -> str:
    """Merge pieces of feedback into one with condense requests (``request(rendered parts)``),
    in groups that fit the backward model, round by round."""
    merged = await merge_in_rounds(
        texts,
        render_part=lambda number, text: fill_template(
            prompts.REDUCE_PART, {"number": str(number), "text": text}
        ),
        part_tokens=lambda part: backward.text_tokens(part) + 1,
        base_tokens=backward.tokens(request("")),
        budget=backward.budget(),
        merge=lambda parts: backward.feedback(request("\n".join(parts)), what),
    )
    return merged[0] if merged else ""


class OutputFeedback:
    """The feedback on an op's output, one text per batch element (``""``: none).

    An element whose feedback joins several pieces (fan-in from several consumers) and alone
    makes a request too long is condensed first — once, whichever variable asks first.

    Args:
        backward: The backward model.
        texts: Feedback per batch element.
        condense: Renders the request merging the pieces of one element's feedback.
    """

    def __init__(
        self,
        backward: BackwardModel,
        texts: Sequence[str],
        condense: Callable[[str], list[dict[str, str]]],
    ) -> None:
        self.backward = backward
        self.texts = list(texts)
        self._condense = condense
        self._condensed: dict[int, asyncio.Future[str]] = {}

    @property
    def live(self) -> list[int]:
        """The elements with feedback."""
        return [index for index, text in enumerate(self.texts) if text]

    async def fitted(self, index: int, fits: Callable[[str], bool], what: str) -> str:
        """Element ``index``'s feedback, condensed when ``fits`` refuses it and it has pieces."""
        feedback = self.texts[index]
        # A single piece is never condensed, so skip measuring the prompt (the costly part).
        pieces = [piece for piece in feedback.split(FAN_IN_SEPARATOR) if piece.strip()]
        if len(pieces) < 2 or fits(feedback) or not fits(""):
            return feedback  # one piece is never cut; with no room at all, check_fits refuses
        if index not in self._condensed:
            self._condensed[index] = asyncio.ensure_future(
                merge_feedback(self.backward, pieces, self._condense, what)
            )
        return await asyncio.shield(self._condensed[index])


async def element_gradient(
    backward: BackwardModel,
    requests: GradientPrompts,
    feedback: OutputFeedback,
    position: int | None,
    what: str,
) -> str:
    """The gradient written from the single sample ``position`` (``None``: a scalar call)."""
    budget = backward.budget()
    index = 0 if position is None else position

    def fits(text: str) -> bool:
        return backward.tokens(requests.element(position, text)) <= budget

    text = await feedback.fitted(index, fits, what)
    return await backward.feedback(requests.element(position, text), what)


async def shared_gradient(
    backward: BackwardModel,
    requests: GradientPrompts,
    feedback: OutputFeedback,
    positions: Sequence[int],
    what: str,
) -> str:
    """One gradient for a variable every sample in ``positions`` used: one request over all of
    them, split into chunks only when it would not fit, the chunks' feedback then merged."""
    budget = backward.budget()
    base = backward.tokens(requests.shared([]))

    def fits_alone(position: int) -> Callable[[str], bool]:
        return lambda text: base + backward.text_tokens(requests.sample(position, text)) + 2 <= (
            budget
        )

    texts = await gather_all(
        [feedback.fitted(position, fits_alone(position), what) for position in positions]
    )
    samples = [requests.sample(position, text) for position, text in zip(positions, texts)]
    # +2 for the blank line joining samples; counting pieces keeps this linear in the batch.
    sizes = [backward.text_tokens(sample) + 2 for sample in samples]
    groups = chunk_by_budget(base, sizes, budget)
    window = token_budget(backward.client, backward.completion_args)
    for group in groups:  # a sample too long even alone: refuse before any chunk is sent
        check_fits(base + sum(sizes[i] for i in group), window, what)
    answers = await gather_all(
        [backward.feedback(requests.shared([samples[i] for i in group]), what) for group in groups]
    )
    return await merge_feedback(backward, answers, requests.merge, what)

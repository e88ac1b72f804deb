"""Private helpers of the LM ops: template filling, defensive reply parsing, token-budget chunks.

Template rule (used for user messages and for afnio's own prompts alike):

* ``{name}``, where ``name`` is a Python identifier, is a placeholder;
* ``{{name}}`` is the literal text ``{name}``;
* every other brace is literal, so JSON such as ``{"score": 1}`` needs no escaping.

Substituted values are never scanned again, so a value containing braces stays as it is.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from afnio.autodiff import prompts
from afnio.models.model import ChatCompletionModel
from afnio.models.tokens import count_message_tokens

__all__ = [
    "ReplyParseError",
    "ask",
    "chunk_by_budget",
    "fill_prompt",
    "fill_template",
    "gather_all",
    "get_gradient_token_budget",
    "merge_in_rounds",
    "parse_feedback",
    "parse_judgement",
    "placeholders",
    "prompt_tokens",
    "set_gradient_token_budget",
]

T = TypeVar("T")

_PLACEHOLDER = re.compile(r"\{\{([^\W\d]\w*)\}\}|\{([^\W\d]\w*)\}")

DEFAULT_GRADIENT_TOKEN_BUDGET = 8000
_gradient_token_budget = DEFAULT_GRADIENT_TOKEN_BUDGET

DEFAULT_REPLY_RETRIES = 2


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
    bound (:data:`afnio.autodiff.prompts.MAX_FEEDBACK_SENTENCES`, read at call time).

    Example:
        >>> fill_prompt("In at most {max_sentences} sentences, judge {what}.", {"what": "this"})
        'In at most 4 sentences, judge this.'
    """
    return fill_template(
        template, {"max_sentences": str(prompts.MAX_FEEDBACK_SENTENCES), **(values or {})}
    )


def set_gradient_token_budget(tokens: int) -> None:
    """Set the largest prompt (in tokens) one gradient call may send.

    A shared variable's gradient call that would pass the budget is split into chunks of samples,
    and the chunks' feedback is merged by extra "condense" calls; nothing is dropped.

    Args:
        tokens: A positive number of tokens.

    Raises:
        ValueError: If ``tokens`` is not a positive int.
    """
    global _gradient_token_budget
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise ValueError(
            f"set_gradient_token_budget: tokens must be a positive int, got {tokens!r}"
        )
    _gradient_token_budget = tokens


def get_gradient_token_budget() -> int:
    """The prompt-size budget (tokens) of one gradient call (default 8000)."""
    return _gradient_token_budget


def chunk_by_budget(base_tokens: int, item_tokens: Sequence[int], budget: int) -> list[list[int]]:
    """Group item indices, in order, so each group's ``base + items`` stays within ``budget``.

    An item that alone passes the budget gets a group of its own (it is never cut).

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


def prompt_tokens(messages: list[dict[str, Any]], client: ChatCompletionModel) -> int:
    """Tokens of a request to ``client`` (counted offline)."""
    return count_message_tokens(messages, getattr(client, "model", None) or None)


class ReplyParseError(ValueError):
    """A model's reply could not be parsed, even after retries. ``reply`` holds the last reply."""

    def __init__(self, message: str, reply: str) -> None:
        super().__init__(message)
        self.reply = reply


def _tagged(reply: str, tag: str) -> str | None:
    match = re.search(rf"<{tag}>(.*?)</{tag}>", reply, re.DOTALL | re.IGNORECASE)
    return match.group(1).strip() if match else None


def _json_object(reply: str) -> dict | None:
    """The first JSON object in ``reply`` (fenced or bare), or None."""
    decoder = json.JSONDecoder(strict=False)  # raw newlines: small models emit them
    for match in re.finditer(r"\{", reply):
        try:
            value, _ = decoder.raw_decode(reply, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_feedback(reply: str) -> str | None:
    """Feedback text from a backward model's reply, or None when the reply has none.

    Accepts ``<FEEDBACK>…</FEEDBACK>`` (any case) or a JSON object with a string ``"feedback"``.
    An empty tag pair means "no change needed" and gives ``""``.

    Example:
        >>> parse_feedback("Sure. <FEEDBACK> Name the deadline. </FEEDBACK>")
        'Name the deadline.'
        >>> parse_feedback('{"feedback": "Be brief."}')
        'Be brief.'
        >>> parse_feedback("Be brief.") is None
        True
    """
    tagged = _tagged(reply, "FEEDBACK")
    if tagged is not None:
        return tagged
    value = _json_object(reply)
    if value is not None and isinstance(value.get("feedback"), str):
        return value["feedback"].strip()
    return None


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def parse_judgement(reply: str) -> tuple[int | float, str] | None:
    """``(score, explanation)`` from a judge's reply, or None when it can't be read.

    Accepts a JSON object ``{"score": <number>, "explanation": <text>}`` or the tags
    ``<SCORE>…</SCORE>`` and ``<EXPLANATION>…</EXPLANATION>``.

    Example:
        >>> parse_judgement('```json\\n{"score": 0.5, "explanation": "Half right."}\\n```')
        (0.5, 'Half right.')
        >>> parse_judgement("<SCORE>1</SCORE><EXPLANATION>Correct.</EXPLANATION>")
        (1, 'Correct.')
    """
    value = _json_object(reply)
    if value is not None:
        score = _number(value.get("score"))
        explanation = value.get("explanation")
        if score is not None and isinstance(explanation, str):
            return score, explanation.strip()
    score_text, explanation = _tagged(reply, "SCORE"), _tagged(reply, "EXPLANATION")
    if score_text is not None and explanation is not None:
        score = _number(score_text)
        if score is not None:
            return score, explanation
    return None


def _quote(reply: str, limit: int = 2000) -> str:
    if len(reply) <= limit:
        return repr(reply)
    return repr(reply[:limit]) + f" ... ({len(reply) - limit} more characters)"


async def ask(
    client: ChatCompletionModel,
    messages: list[dict[str, Any]],
    completion_args: Mapping[str, Any],
    parse: Callable[[str], T | None],
    correction: str,
    what: str,
    retries: int = DEFAULT_REPLY_RETRIES,
) -> T:
    """Send ``messages``, parse the reply, and on a malformed reply ask again up to ``retries``
    times (showing the model its reply and ``correction``).

    Args:
        client: The model to ask.
        messages: The request.
        completion_args: Extra arguments for the request.
        parse: Returns the parsed value, or None for a malformed reply.
        correction: The follow-up user message sent after a malformed reply.
        what: Names the op and variable for the error message.
        retries: Extra attempts after the first.

    Raises:
        ReplyParseError: When every attempt was malformed; the message quotes the last reply.
    """
    conversation = list(messages)
    reply = ""
    for _ in range(retries + 1):
        reply = await client.achat(conversation, **completion_args)
        parsed = parse(reply)
        if parsed is not None:
            return parsed
        conversation = [
            *messages,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": correction},
        ]
    raise ReplyParseError(
        f"{what}: could not parse the model's reply after {retries + 1} attempts; "
        f"last reply: {_quote(reply)}",
        reply,
    )


async def gather_all(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """``asyncio.gather`` that, if one fails, cancels the others before raising."""
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
) -> str:
    """Merge ``texts`` into one with condense calls, in budget-sized groups, round by round.

    Each round renders the texts as numbered parts (``render_part(number, text)``), groups them
    with :func:`chunk_by_budget` (``base_tokens`` plus each part's ``part_tokens``), and sends
    every group of two or more to ``merge`` concurrently. Nothing is cut: when every part alone
    fills the budget, parts are merged in pairs anyway.

    Returns:
        The single remaining text (``""`` when all texts are empty).
    """
    texts = [text for text in texts if text]
    while len(texts) > 1:
        parts = [render_part(number + 1, text) for number, text in enumerate(texts)]
        groups = chunk_by_budget(base_tokens, [part_tokens(part) for part in parts], budget)
        if len(groups) == len(texts):
            groups = [list(range(n, min(n + 2, len(texts)))) for n in range(0, len(texts), 2)]
        merged = await gather_all(
            [
                merge([parts[i] for i in group]) if len(group) > 1 else _ready(texts[group[0]])
                for group in groups
            ]
        )
        texts = [text for text in merged if text]
    return texts[0] if texts else ""

"""Scored history (OPRO-style): the optimizer model sees past values with their scores.

:class:`OPRO` keeps, per parameter, every value it has scored. Each step shows the model the
``history_size`` best of them in ascending order of score (the best last), the current value
and — unless ``use_feedback=False`` — the textual gradients, and asks for a value that scores
higher. The proposals are written, scored with the closure (see :mod:`afnio.optim.scoring`), and
kept only if the score did not drop (else rolled back, as a gated step would be). Either way
the new value and its score join the history, so the next request knows what did not work.

Example:
    >>> import afnio
    >>> from afnio.optim import OPRO
    >>> from afnio.testing import ScriptedModel
    >>> prompt = afnio.Parameter("Reply.", role="system prompt")
    >>> model = ScriptedModel(["<IMPROVED_VARIABLE>Reply briefly.</IMPROVED_VARIABLE>"])
    >>> optimizer = OPRO([prompt], model_client=model, use_feedback=False)
    >>> optimizer.step(lambda: float(len(prompt.data) > 6))   # 0.0 before, 1.0 after
    1.0
    >>> [(e["value"], e["score"]) for e in optimizer.state[prompt]["history"]]
    [('Reply.', 0.0), ('Reply briefly.', 1.0)]
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from afnio._runtime import run
from afnio._variable import Variable
from afnio.autodiff.feedback import (
    ReplyParseError,
    Unreadable,
    ask,
    check_fits,
    fill_template,
    gather_all,
    placeholders,
    token_budget,
)
from afnio.autodiff.grad_mode import no_grad
from afnio.models.model import ChatCompletionModel
from afnio.optim import prompts
from afnio.optim.optimizer import Optimizer, ParamsT
from afnio.optim.options import GroupOptions, check_group, optimizer_defaults
from afnio.optim.scoring import read_score
from afnio.optim.tgd import (
    ProposalCheck,
    ProposalRejectedWarning,
    TGDOptions,
    _condense,
    _content_text,
    _describe,
    _feedback_texts,
    _format_value,
    _instruction_lines,
    _numbered,
    _parse_proposal,
    _proposal_schema,
    _section,
    _text_of,
)

__all__ = ["OPRO", "OPROOptions"]

BUILTIN_PLACEHOLDERS = frozenset(
    {"variable_role", "variable", "history", "gradients", "constraints"}
)
"""Placeholders OPRO fills; custom ``messages`` may use only these."""


@dataclass(frozen=True)
class OPROOptions(GroupOptions):
    """The options of one OPRO parameter group.

    Attributes:
        model_client: The optimizer model.
        messages: Request templates (``{name}`` placeholders from :data:`BUILTIN_PLACEHOLDERS`,
            other braces literal); ``None`` uses :data:`~afnio.optim.prompts.OPRO_MESSAGES`.
        history_size: How many of the best scored values each request shows.
        max_history: How many scored values are kept per parameter (the best ones).
        use_feedback: Propose only for parameters with textual gradients, and show them;
            ``False``: propose for every parameter each step, from the history alone (no
            ``backward()`` needed).
        constraints: Rules every new value must follow, shown to the model.
        max_retries: Repair requests after an unusable reply.
        completion_args: Extra arguments of every request.

    Raises:
        TypeError, ValueError: For an invalid option.
    """

    owner = "OPRO"
    collects_completion_args = True

    model_client: ChatCompletionModel
    messages: list[dict[str, Any]] | None = None
    history_size: int = 8
    max_history: int = 50
    use_feedback: bool = True
    constraints: list[Any] = field(default_factory=list)
    max_retries: int = 2
    completion_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model_client, ChatCompletionModel):
            raise TypeError(
                "OPRO: model_client must be a ChatCompletionModel, got "
                f"{type(self.model_client).__name__}"
            )
        for name, low in (("history_size", 1), ("max_history", 1), ("max_retries", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"OPRO: {name} must be an int >= {low}, got {value!r}")
        if self.max_history < self.history_size:
            raise ValueError(
                f"OPRO: max_history ({self.max_history}) must be >= history_size "
                f"({self.history_size})"
            )
        if not isinstance(self.use_feedback, bool):
            raise TypeError(f"OPRO: use_feedback must be a bool, got {self.use_feedback!r}")
        secret = [key for key in self.completion_args if "api_key" in key.lower()]
        if secret:
            raise ValueError(
                f"OPRO: pass API keys to the model client, not as completion args ({secret})"
            )
        for index, message in enumerate(self.templates()):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise TypeError(
                    f"OPRO: messages[{index}] must be a dict with 'role' and 'content', "
                    f"got {message!r}"
                )
            used = set(placeholders(_content_text(message["content"], f"OPRO: messages[{index}]")))
            unknown = sorted(used - BUILTIN_PLACEHOLDERS)
            if unknown:
                raise ValueError(
                    f"OPRO: messages[{index}] uses placeholders {unknown} that OPRO does not "
                    f"fill (it fills {sorted(BUILTIN_PLACEHOLDERS)})"
                )

    def templates(self) -> list[dict[str, Any]]:
        """The request templates in use."""
        return prompts.OPRO_MESSAGES if self.messages is None else list(self.messages)

    def condense_options(self) -> TGDOptions:
        """The options TGD's feedback condensing runs with."""
        return TGDOptions(model_client=self.model_client, max_retries=self.max_retries,
                          completion_args=dict(self.completion_args))

# --------------------------------------------------------------------------- history
def _remember(history: list[dict[str, Any]], value: Any, score: float, limit: int) -> None:
    """Add a scored value (a value already there gets the running mean of its scores), then
    keep the ``limit`` best."""
    for entry in history:
        if entry["value"] == value:
            count = entry["evaluations"]
            entry["score"] = (entry["score"] * count + score) / (count + 1)
            entry["evaluations"] = count + 1
            break
    else:
        history.append({"value": copy.deepcopy(value), "score": score, "evaluations": 1})
    if len(history) > limit:
        ranked = sorted(range(len(history)), key=lambda i: (-history[i]["score"], -i))
        keep = set(ranked[:limit])
        history[:] = [entry for i, entry in enumerate(history) if i in keep]


def _shown(history: Sequence[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """The ``size`` best entries, in ascending order of score (the best last; among equal
    scores the newer one later)."""
    ranked = sorted(range(len(history)), key=lambda i: (history[i]["score"], i))
    return [history[i] for i in ranked[-size:]]


def _history_block(entries: Sequence[dict[str, Any]]) -> str:
    if not entries:
        return _section("SCORED_HISTORY", "(no value has been scored yet)")
    return _section("SCORED_HISTORY", "\n".join(
        _section("ENTRY", _section("SCORE", f"{entry['score']:.4g}") + "\n"
                 + _section("PAST_VALUE", _format_value(entry["value"])))
        for entry in entries
    ))


def _messages(param: Variable, opts: OPROOptions, entries: Sequence[dict[str, Any]],
              feedback: Sequence[str]) -> list[dict[str, str]]:
    values = {
        "variable_role": _describe(param),
        "variable": _section("VARIABLE", _format_value(param.data)),
        "history": _history_block(entries),
        "gradients": _section("FEEDBACK", _numbered(list(feedback))) + "\n\n" if feedback else "",
        "constraints": (
            _section("CONSTRAINTS", _numbered([_text_of(c) for c in opts.constraints])) + "\n\n"
            if opts.constraints else ""
        ),
    }
    return [
        {"role": m["role"], "content": fill_template(_content_text(m["content"], "OPRO"), values)}
        for m in opts.templates()
    ]


async def _fit(param: Variable, opts: OPROOptions, entries: list[dict[str, Any]],
               feedback: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Drop the lowest-scored entries shown, then condense the feedback, until the request fits.

    Raises:
        ContextWindowError: When the value, constraints and instructions alone do not fit.
        Unreadable: When feedback that must be condensed could not be.
    """
    client = opts.model_client
    budget = token_budget(client, opts.completion_args)

    def size(shown: list[dict[str, Any]], texts: list[str]) -> int:
        return client.count_message_tokens(_messages(param, opts, shown, texts))

    while len(entries) > 1 and size(entries, feedback) > budget:
        entries = entries[1:]
    if feedback and size(entries, feedback) > budget:
        room = budget - size(entries, [])
        feedback = await _condense(param, feedback, room, opts.condense_options())
    check_fits(size(entries, feedback), budget,
               f"OPRO: the request for the parameter with role {param.role!r}")
    return entries, feedback


async def _propose(param: Variable, opts: OPROOptions, history: list[dict[str, Any]],
                   feedback: list[str], proposal_check: ProposalCheck | None
                   ) -> tuple[Any | None, str | None]:
    """``(new value, None)`` or ``(None, why there is none)``."""
    try:
        entries, feedback = await _fit(param, opts, _shown(history, opts.history_size), feedback)
    except Unreadable as problem:
        return None, str(problem)
    old = copy.deepcopy(param.data)
    lines = _instruction_lines(opts.templates())

    def accept(reply: str) -> Any:
        new = _parse_proposal(reply, old, lines)
        problem = proposal_check(new) if proposal_check is not None else None
        if problem:
            raise Unreadable(f"the proposal fails the user's check: {problem}")
        return new

    try:
        new = await ask(
            opts.model_client, _messages(param, opts, entries, feedback), accept,
            what=f"OPRO (parameter with role {param.role!r})",
            repair=fill_template(prompts.RETRY_MESSAGE, {"tag": prompts.PROPOSAL_TAG}),
            completion_args=opts.completion_args, schema=("proposal", _proposal_schema(
                old, opts.model_client.output_reserve(opts.completion_args)
            )),
            retries=opts.max_retries,
        )
    except ReplyParseError as error:
        return None, (
            f"no acceptable proposal after {len(error.reasons)} request(s): "
            + "; ".join(error.reasons)
        )
    return new, None


class OPRO(Optimizer):
    """Optimization by PROmpting with a scored history of past values.

    ``step(closure)`` (the closure re-evaluates the program and returns its score; see
    :mod:`afnio.optim.scoring`):

    1. ``before = closure()``; each parameter's current value joins its history with it;
    2. one request per parameter (those with feedback, or all with ``use_feedback=False``),
       all at once, showing the best past values with their scores;
    3. the proposals are written and ``after = closure()``; they are kept if
       ``after >= before``, else rolled back (verdict ``"rolled_back"``);
    4. the proposals join the history with ``after``.

    Scores of different minibatches are not on the same footing; the history is most useful
    with a closure over fixed data (a held-out sample), which the Trainer's default closure (the
    training batch) is not — pass ``evaluate=`` for that.

    Per-parameter state: ``state[p]["history"]`` — ``{"value", "score", "evaluations"}``
    entries (a value scored several times keeps the mean), at most ``max_history``, the best
    kept; ``state[p]["accepted"]`` / ``state[p]["rejected"]``.

    Cost of a step with *P* proposing parameters: *P* optimizer requests (plus repairs and
    condensing), and two closure evaluations (the one before is free when the closure knows it,
    as the Trainer's does; the one after is skipped when no proposal was usable).

    Args:
        params: Parameters, or dicts defining parameter groups.
        model_client: The optimizer model.
        proposal_check: ``check(new_value) -> str | None``, as in TGD (code, not saved).
        evaluate: A closure of your own that every step uses instead of the one passed to
            :meth:`step` (e.g. over a held-out sample). Code, so not saved.
        **options: The other :class:`OPROOptions`; any other keyword is a completion argument.

    Raises:
        TypeError, ValueError: For invalid options.
    """

    needs_closure = True

    def __init__(
        self,
        params: ParamsT,
        model_client: ChatCompletionModel,
        *,
        proposal_check: ProposalCheck | None = None,
        evaluate: Callable[[], Any] | None = None,
        **options: Any,
    ) -> None:
        for name, value in (("proposal_check", proposal_check), ("evaluate", evaluate)):
            if value is not None and not callable(value):
                raise TypeError(f"OPRO: {name} must be callable, got {type(value).__name__}")
        self.proposal_check = proposal_check
        self.evaluate = evaluate
        defaults = optimizer_defaults([OPROOptions], options, model_client=model_client)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its options (see :class:`Optimizer`)."""
        if isinstance(param_group, dict):
            check_group([OPROOptions], self.defaults, param_group)
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> float | None:
        """One OPRO step over every parameter group (see the class docstring).

        Returns:
            The score of the values the parameters hold after the step, or ``None`` when no
            parameter was up for a proposal (nothing is sent or scored then).

        Raises:
            ValueError: Without a closure (and no ``evaluate``).
            ContextWindowError: For a parameter that cannot fit the model's window.
            Exception: Whatever the model client or the closure raises; the parameters keep
                their values then.
        """
        score_fn = self.evaluate if self.evaluate is not None else closure
        if score_fn is None:
            raise ValueError(
                "OPRO.step: needs a closure that re-evaluates the program and returns its score "
                "(or give OPRO evaluate=...); see afnio.optim.scoring"
            )
        jobs = []
        for group in self.param_groups:
            opts = OPROOptions.from_group(group)
            for param in dict.fromkeys(group["params"]):
                feedback = _feedback_texts(list(param.grad))
                if feedback or not opts.use_feedback:
                    jobs.append((param, opts, feedback if opts.use_feedback else []))
        if not jobs:
            self.last_step = []
            return None
        with no_grad():
            before = read_score(score_fn(), "OPRO")
        for param, opts, _ in jobs:
            history = self.state[param].setdefault("history", [])
            _remember(history, param.data, before, opts.max_history)
        results = run(gather_all([
            _propose(param, opts, self.state[param]["history"], feedback, self.proposal_check)
            for param, opts, feedback in jobs
        ]))
        olds = [copy.deepcopy(param.data) for param, _, _ in jobs]

        def restore() -> None:
            with no_grad():
                for (param, _, _), old in zip(jobs, olds):
                    if param.data != old:
                        param.copy_(copy.deepcopy(old))

        changed = False
        try:
            with no_grad():
                for (param, _, _), (new, _) in zip(jobs, results):
                    if new is not None and new != param.data:
                        param.copy_(copy.deepcopy(new))
                        changed = True
                after = read_score(score_fn(), "OPRO") if changed else before
        except BaseException:
            restore()
            raise
        kept = after >= before
        if not kept:
            restore()
        self._record(jobs, results, olds, before, after, kept)
        return after if kept else before

    def _record(self, jobs: list, results: list, olds: list, before: float, after: float,
                kept: bool) -> None:
        index_of = self._param_indices()
        records, messages = [], []
        for (param, opts, feedback), (new, problem), old in zip(jobs, results, olds):
            state = self.state[param]
            for name in ("accepted", "rejected"):
                state.setdefault(name, 0)
            if new is not None and new != old:
                _remember(state["history"], new, after, opts.max_history)
            accepted = new is not None and kept
            state["accepted" if accepted else "rejected"] += 1
            if new is None:
                verdict, reason = "rejected", problem
                messages.append(f"OPRO: parameter with role {param.role!r} kept its value: "
                                f"{problem}")
            elif kept:
                verdict, reason = "accepted", None
            else:
                verdict = "rolled_back"
                reason = f"the score fell from {before:g} to {after:g}, so the step was rolled back"
            records.append({
                "index": index_of[id(param)],
                "role": param.role,
                "before": old,
                # a rolled-back entry reports the proposal it undid
                "after": copy.deepcopy(new if verdict == "rolled_back" else param.data),
                "feedback": list(feedback),
                "verdict": verdict,
                "reason": reason,
                "score_before": before,
                "score_after": after,
            })
        self.last_step = records
        for message in messages:
            warnings.warn(message, ProposalRejectedWarning, stacklevel=3)

"""Candidate search (ProTeGi/APO-style): several proposals per step, scored, a beam kept.

Each :meth:`CandidateSearch.step` asks the optimizer model for ``num_proposals`` rewrites of
every parameter that has feedback (TGD's request, each marked "proposal i of k" so they
differ) and ``num_paraphrases`` paraphrases of its current value (the best one so far), all at
once. The candidates — the current values, the rest of the beam kept from the last step, the
proposals and the paraphrases — are scored on the minibatch by a
:class:`~afnio.optim.scoring.Scorer`, concurrently, under a budget of sample evaluations,
selected by **successive halving** or **UCB**; the best ``beam_width`` survive, and the
parameters take the best one. The current values are always a candidate: with halving, a step
only moves to values that scored at least as well on the same samples.

With several parameters, candidate *j* combines proposal *j* of each parameter (and beam
entry *j* of each), and they are scored together.

Example:
    >>> import afnio
    >>> from afnio.optim import CandidateSearch, FunctionScorer
    >>> from afnio.testing import ScriptedModel
    >>> prompt = afnio.Parameter("Answer.", role="system prompt")
    >>> def rewrite(messages, **_):   # proposal 1 helps, proposal 2 does not
    ...     good = "proposal 1 of 2" in messages[-1]["content"]
    ...     value = "Answer in French." if good else "Hm."
    ...     return f"<IMPROVED_VARIABLE>{value}</IMPROVED_VARIABLE>"
    >>> search = CandidateSearch([prompt], model_client=ScriptedModel(rewrite),
    ...                          num_proposals=2, num_paraphrases=0, beam_width=2)
    >>> scorer = FunctionScorer(lambda values, idx: float("French" in values[prompt]),
    ...                         [prompt], num_samples=4)
    >>> prompt.append_grad(afnio.Variable("answer in French"))
    >>> search.step(scorer)
    1.0
    >>> prompt.data, [entry["value"] for entry in search.state[prompt]["beam"]]
    ('Answer in French.', ['Answer in French.', 'Answer.'])
"""

from __future__ import annotations

import copy
import dataclasses
import random
import warnings
from dataclasses import dataclass
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
    token_budget,
)
from afnio.autodiff.grad_mode import no_grad
from afnio.models.model import ChatCompletionModel
from afnio.optim import prompts
from afnio.optim.optimizer import Optimizer, ParamsT
from afnio.optim.options import GroupOptions, check_group, optimizer_defaults
from afnio.optim.scoring import Scorer
from afnio.optim.selection import Arm, halving_plan, successive_halving, ucb
from afnio.optim.tgd import (
    ProposalCheck,
    ProposalRejectedWarning,
    TGDOptions,
    _check_minimal_fits,
    _content_text,
    _describe,
    _feedback_texts,
    _format_value,
    _instruction_lines,
    _numbered,
    _Outcome,
    _parse_proposal,
    _proposal_schema,
    _propose,
    _section,
    _text_of,
)

__all__ = ["CandidateSearch", "SearchOptions"]

_SELECTIONS = ("halving", "ucb")


@dataclass(frozen=True)
class SearchOptions(GroupOptions):
    """The search options of one candidate-search parameter group (besides TGD's own).

    Attributes:
        num_proposals: Rewrites asked for per parameter and step (*k*).
        num_paraphrases: Paraphrases of the current value asked for per parameter and step.
        beam_width: Candidates kept for the next step, the best first (*b*).
        selection: ``"halving"`` (successive halving: every survivor scored on the same
            samples, the worse half dropped each round) or ``"ucb"`` (upper confidence bound:
            the candidates with the highest bound are scored on further samples).
        budget: Sample evaluations one step may spend on scoring (a candidate scored on one
            sample is one evaluation; for a program that sends one request per sample, one
            request). ``None``: enough to score every candidate on every sample.
        ucb_exploration: UCB's exploration weight *c* in ``mean + c * sqrt(2 ln t / n)``.
        seed: Seeds the order in which the minibatch's samples are used.

    Raises:
        ValueError: For an invalid option.
    """

    owner = "CandidateSearch"

    num_proposals: int = 4
    num_paraphrases: int = 1
    beam_width: int = 2
    selection: str = "halving"
    budget: int | None = None
    ucb_exploration: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("num_proposals", 1), ("num_paraphrases", 0), ("beam_width", 1),
                          ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CandidateSearch: {name} must be an int >= {low}, got {value!r}")
        if self.selection not in _SELECTIONS:
            raise ValueError(
                f"CandidateSearch: selection must be one of {_SELECTIONS}, got {self.selection!r}"
            )
        exploration = self.ucb_exploration
        if isinstance(exploration, bool) or not isinstance(exploration, (int, float)) or not (
            exploration >= 0
        ):
            raise ValueError(
                f"CandidateSearch: ucb_exploration must be a number >= 0, got {exploration!r}"
            )
        if self.budget is not None:
            most = self.max_candidates
            if isinstance(self.budget, bool) or not isinstance(self.budget, int) or (
                self.budget < most
            ):
                raise ValueError(
                    f"CandidateSearch: budget must be None or an int >= {most} (one sample "
                    f"evaluation for each of up to {most} candidates: beam_width + "
                    f"num_proposals + num_paraphrases), got {self.budget!r}"
                )

    @property
    def max_candidates(self) -> int:
        """The most candidates one step can have: the beam, the proposals, the paraphrases."""
        return self.beam_width + self.num_proposals + self.num_paraphrases

_OPTIONS = (SearchOptions, TGDOptions)
"""CandidateSearch's option classes; TGD's collects the completion arguments, so it is last."""


# --------------------------------------------------------------------------- proposals
def _variant(opts: TGDOptions, attempt: int, total: int) -> TGDOptions:
    """TGD's request with the "proposal i of k" line added to its last user message."""
    line = fill_template(prompts.CANDIDATE_ATTEMPT, {"attempt": str(attempt), "total": str(total)})
    templates = [dict(message) for message in opts.templates()]
    last_user = max(i for i, m in enumerate(templates) if m["role"] == "user") if any(
        m["role"] == "user" for m in templates
    ) else len(templates) - 1
    content = _content_text(templates[last_user]["content"], "CandidateSearch")
    templates[last_user]["content"] = content + "\n\n" + line
    return dataclasses.replace(opts, messages=templates)


async def _paraphrase(
    param: Variable,
    opts: TGDOptions,
    attempt: int,
    total: int,
    proposal_check: ProposalCheck | None,
) -> Any | None:
    """One paraphrase of the parameter's value, or ``None`` when no reply was usable."""
    old = copy.deepcopy(param.data)
    values = {
        "variable_role": _describe(param),
        "variable": _section("VARIABLE", _format_value(old)),
        "constraints": (
            _section("CONSTRAINTS", _numbered([_text_of(c) for c in opts.constraints])) + "\n\n"
            if opts.constraints else ""
        ),
        "attempt": str(attempt),
        "total": str(total),
    }
    messages = [
        {"role": m["role"], "content": fill_template(m["content"], values)}
        for m in prompts.PARAPHRASE_MESSAGES
    ]
    what = f"CandidateSearch paraphrasing the parameter with role {param.role!r}"
    client = opts.model_client
    check_fits(client.count_message_tokens(messages), token_budget(client, opts.completion_args),
               what)
    lines = _instruction_lines(prompts.PARAPHRASE_MESSAGES)

    def accept(reply: str) -> Any:
        new = _parse_proposal(reply, old, lines)
        problem = proposal_check(new) if proposal_check is not None else None
        if problem:
            raise Unreadable(f"the proposal fails the user's check: {problem}")
        return new

    try:
        return await ask(
            client, messages, accept, what=what,
            repair=fill_template(prompts.RETRY_MESSAGE, {"tag": prompts.PROPOSAL_TAG}),
            completion_args=opts.completion_args, schema=("proposal", _proposal_schema(
                old, client.output_reserve(opts.completion_args)
            )),
            retries=opts.max_retries,
        )
    except ReplyParseError:
        return None


@dataclass
class _Proposals:
    """What the optimizer model wrote for one parameter this step."""

    outcomes: list[_Outcome]
    paraphrases: list[Any | None]

    @property
    def feedback(self) -> list[str]:
        for outcome in self.outcomes:
            if outcome.feedback is not None:
                return list(outcome.feedback)
        return []

    @property
    def notes(self) -> list[str]:
        return [note for outcome in self.outcomes for note in outcome.notes]


# --------------------------------------------------------------------------- the optimizer
class CandidateSearch(Optimizer):
    """Candidate search: *k* proposals (and paraphrases) per step, scored, a beam kept.

    Every request to the optimizer model is TGD's (same prompt, fitting, checks and repairs:
    see :class:`~afnio.optim.TGD`), so a proposal that breaks a placeholder, leaks a tag or
    fails ``proposal_check`` is not a candidate. Scoring needs a
    :class:`~afnio.optim.scoring.Scorer` as the closure (it scores values without writing them
    into the parameters, on parts of the minibatch, concurrently); the Trainer passes a
    :class:`~afnio.optim.scoring.ModuleScorer` of the training batch.

    Per-parameter state: ``state[p]["beam"]`` — the ``beam_width`` best candidates of the last
    step, best first, as ``{"value", "score", "samples"}`` (the mean per-sample score and how
    many samples it was measured on); ``state[p]["step"]`` — steps taken;
    ``state[p]["accepted"]`` / ``state[p]["rejected"]`` — steps where ``p`` changed / kept its
    value although it had feedback; ``state[p]["momentum_buffer"]`` as in TGD.

    Cost of a step with *P* parameters holding feedback: *P·(k + m)* optimizer requests (plus
    repairs of unreadable replies and condensing, as in TGD), then at most ``budget`` sample
    evaluations (with halving exactly ``sum(survivors × new samples)`` of
    :func:`halving_plan` for the step's distinct candidates; with UCB the whole budget unless
    every candidate has seen every sample). No feedback: nothing is sent.

    Args:
        params: Parameters, or dicts defining parameter groups (each may set any option).
        model_client: The optimizer model.
        proposal_check: ``check(new_value) -> str | None``, as in TGD (code, not saved).
        **options: :class:`SearchOptions` and :class:`~afnio.optim.tgd.TGDOptions`; any other
            keyword is a completion argument of every request.

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
        **options: Any,
    ) -> None:
        if proposal_check is not None and not callable(proposal_check):
            raise TypeError(
                "CandidateSearch: proposal_check must be callable, got "
                f"{type(proposal_check).__name__}"
            )
        self.proposal_check = proposal_check
        defaults = optimizer_defaults(_OPTIONS, options, model_client=model_client)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its options (see :class:`Optimizer`)."""
        if isinstance(param_group, dict):
            check_group(_OPTIONS, self.defaults, param_group)
        super().add_param_group(param_group)

    # ----------------------------------------------------------------- one step
    def _jobs(self) -> list[tuple[Variable, TGDOptions, SearchOptions]]:
        jobs = []
        for group in self.param_groups:
            tgd_opts, search = TGDOptions.from_group(group), SearchOptions.from_group(group)
            for param in dict.fromkeys(group["params"]):
                if _feedback_texts(list(param.grad)):
                    jobs.append((param, tgd_opts, search))
        return jobs

    async def _propose_all(
        self, jobs: list[tuple[Variable, TGDOptions, SearchOptions]]
    ) -> list[_Proposals]:
        for param, opts, _ in jobs:
            _check_minimal_fits([param], opts)

        async def one(param: Variable, opts: TGDOptions, search: SearchOptions) -> _Proposals:
            buffer = self.state.get(param, {}).get("momentum_buffer")
            k, m = search.num_proposals, search.num_paraphrases
            variants = [_variant(opts, i + 1, k) for i in range(k)]
            results = await gather_all(
                [
                    _propose(param, list(param.grad), buffer, variant,
                             _instruction_lines(variant.templates()), self.proposal_check)
                    for variant in variants
                ]
                + [_paraphrase(param, opts, j + 1, m, self.proposal_check) for j in range(m)]
            )
            return _Proposals([r or _Outcome() for r in results[:k]], list(results[k:]))

        return await gather_all([one(*job) for job in jobs])

    def _arms(self, params: list[Variable], proposals: list[_Proposals]) -> list[Arm]:
        """Distinct candidates: the current values first, then the beam, proposals and
        paraphrases (a candidate equal to an earlier one is dropped)."""
        current = {id(p): copy.deepcopy(p.data) for p in params}
        arms = [Arm(dict(current), "current")]
        beams = [self.state.get(p, {}).get("beam") or [] for p in params]
        for j in range(1, max((len(b) for b in beams), default=0)):
            arms.append(Arm({
                id(p): copy.deepcopy(beam[j]["value"]) if j < len(beam) else current[id(p)]
                for p, beam in zip(params, beams)
            }, "beam"))
        width = max((len(pr.outcomes) for pr in proposals), default=0)
        for j in range(width):
            values = {}
            for p, pr in zip(params, proposals):
                outcome = pr.outcomes[j] if j < len(pr.outcomes) else None
                changed = outcome is not None and outcome.changed
                values[id(p)] = copy.deepcopy(outcome.new_data) if changed else current[id(p)]
            arms.append(Arm(values, "proposal"))
        width = max((len(pr.paraphrases) for pr in proposals), default=0)
        for j in range(width):
            values = {}
            for p, pr in zip(params, proposals):
                text = pr.paraphrases[j] if j < len(pr.paraphrases) else None
                values[id(p)] = copy.deepcopy(text) if text is not None else current[id(p)]
            arms.append(Arm(values, "paraphrase"))
        distinct: list[Arm] = []
        for arm in arms:
            if all(arm.values != other.values for other in distinct):
                distinct.append(arm)
        return distinct

    def step(self, closure: Scorer | None = None) -> float | None:  # type: ignore[override]
        """Propose, score and select: one candidate-search step over every parameter group.

        Args:
            closure: A :class:`~afnio.optim.scoring.Scorer` of the minibatch.

        Returns:
            The best candidate's mean per-sample score, or ``None`` when no parameter had
            feedback (nothing is sent then).

        Raises:
            TypeError: If ``closure`` is not a Scorer.
            ContextWindowError: For a parameter that cannot fit the model's window.
            Exception: Whatever the model client or the scorer raises; nothing is changed then.
        """
        if not isinstance(closure, Scorer):
            raise TypeError(
                "CandidateSearch.step: needs a Scorer as the closure, to score candidates "
                "without writing them into the parameters (afnio.optim.ModuleScorer for a "
                "Module and a batch, FunctionScorer for your own function), got "
                f"{type(closure).__name__}"
            )
        jobs = self._jobs()
        if not jobs:
            self.last_step = []
            return None
        params = [param for param, _, _ in jobs]
        search = jobs[0][2]
        proposals = run(self._propose_all(jobs))
        arms = self._arms(params, proposals)
        step_number = self.state.get(params[0], {}).get("step", 0)
        order = list(range(closure.num_samples))
        random.Random(f"{search.seed}:{step_number}").shuffle(order)
        budget = search.budget if search.budget is not None else len(arms) * len(order)
        by_id = {id(p): p for p in params}
        if len(arms) == 1:
            ranking = [0]
        elif search.selection == "halving":
            plan = halving_plan(len(arms), len(order), budget)
            ranking = run(successive_halving(closure, arms, by_id, order, plan))
        else:
            ranking = run(ucb(closure, arms, by_id, order, budget, search.beam_width,
                              float(search.ucb_exploration)))
        best = arms[ranking[0]]
        self._commit(params, jobs, proposals, arms, ranking)
        return None if best.samples == 0 else best.mean

    def _commit(
        self,
        params: list[Variable],
        jobs: list[tuple[Variable, TGDOptions, SearchOptions]],
        proposals: list[_Proposals],
        arms: list[Arm],
        ranking: list[int],
    ) -> None:
        best = arms[ranking[0]]
        index_of = self._param_indices()
        records, messages = [], []
        with no_grad():
            for (param, opts, search), proposed in zip(jobs, proposals):
                before = copy.deepcopy(param.data)
                new = best.values[id(param)]
                if new != before:
                    param.copy_(copy.deepcopy(new))
                state = self.state[param]
                state["beam"] = [
                    {
                        "value": copy.deepcopy(arms[i].values[id(param)]),
                        "score": None if arms[i].samples == 0 else arms[i].mean,
                        "samples": arms[i].samples,
                    }
                    for i in ranking[: search.beam_width]
                ]
                state["step"] = state.get("step", 0) + 1
                changed = new != before
                for name in ("accepted", "rejected"):
                    state.setdefault(name, 0)
                state["accepted" if changed else "rejected"] += 1
                if opts.momentum:
                    buffer = state.setdefault("momentum_buffer", [])
                    buffer.append({"value": before, "gradients": proposed.feedback})
                    del buffer[: max(0, len(buffer) - opts.momentum)]
                current = arms[0]
                reason = None
                if not changed:
                    usable = sum(o.changed for o in proposed.outcomes) + sum(
                        p is not None for p in proposed.paraphrases
                    )
                    reason = (
                        "no candidate scored higher than the current value "
                        f"({current.mean:g} on {current.samples} samples)"
                        if usable else "; ".join(proposed.notes) or "no usable proposal"
                    )
                    if not usable and proposed.notes:
                        messages.append(
                            f"CandidateSearch: parameter with role {param.role!r} kept its "
                            f"value: {reason}"
                        )
                records.append({
                    "index": index_of[id(param)],
                    "role": param.role,
                    "before": before,
                    "after": copy.deepcopy(param.data),
                    "feedback": proposed.feedback,
                    "verdict": "accepted" if changed else "rejected",
                    "reason": reason,
                    "score_before": None if current.samples == 0 else current.mean,
                    "score_after": None if best.samples == 0 else best.mean,
                    "candidates": len(arms),
                })
        self.last_step = records
        for message in messages:
            warnings.warn(message, ProposalRejectedWarning, stacklevel=3)


"""Few-shot demonstrations: choose input/output examples for a prompt by validation score.

A ``DEMOS`` parameter holds demonstrations rendered into text (:func:`render_demos`) that your
program puts into a prompt like any other Variable. :class:`DemoOptimizer` fills it:

1. **bootstrap** — :meth:`DemoOptimizer.record` collects training samples whose outputs passed
   the evaluator (call it from ``training_step``; calls made under ``no_grad`` — validation,
   re-scoring — are ignored, so validation data never becomes a demonstration);
2. **search** — each step with new demonstrations, a seeded random search scores candidate
   demo sets (mutations of the current set and fresh random sets) with your validation
   closure and keeps the best; the current set is always a candidate and wins ties, so the
   validation score never drops.

It writes no text of its own — it only chooses among outputs your program already produced —
so it needs no optimizer model and no textual gradients, and works with small models.

Example:
    >>> import afnio
    >>> from afnio.optim import DemoOptimizer, demos_parameter
    >>> demos = demos_parameter("examples of questions and their answers")
    >>> def validation_score():          # your program on validation data; higher is better
    ...     return float("Q: 2+2\\nA: 4" in demos.data)
    >>> optimizer = DemoOptimizer([demos], evaluate=validation_score, max_demos=1,
    ...                           template="Q: {input}\\nA: {output}")
    >>> optimizer.record(["2+2", "3+3"], ["4", "7"], passed=[True, False])
    1
    >>> optimizer.step()
    1.0
    >>> print(demos.data)
    Q: 2+2
    A: 4
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from afnio._runtime import run
from afnio._variable import Variable
from afnio.autodiff.feedback import fill_template, gather_all, placeholders
from afnio.autodiff.grad_mode import is_grad_enabled, no_grad
from afnio.cognitive.parameter import Parameter, ParameterType
from afnio.optim import prompts
from afnio.optim.optimizer import Optimizer, ParamsT
from afnio.optim.options import GroupOptions
from afnio.optim.scoring import Scorer, read_score
from afnio.optim.selection import Arm, racing_plan, successive_halving

__all__ = ["DemoOptimizer", "DemoOptions", "demos_parameter", "render_demos"]

_MAX_TRIES = 20  # draws per wanted candidate before giving up on finding a new distinct set
_SELECTIONS = ("halving", "full")


def render_demos(
    demos: Sequence[Mapping[str, str]],
    template: str = prompts.DEMO_TEMPLATE,
    separator: str = prompts.DEMO_SEPARATOR,
    header: str = "",
) -> str:
    """Render demonstrations as text: each through ``template`` (placeholders ``{input}`` and
    ``{output}``, other braces literal), joined by ``separator``, after ``header``. No
    demonstrations render as ``""``.

    Example:
        >>> render_demos([{"input": "hi", "output": "greeting"}], header="Examples:\\n")
        'Examples:\\nInput: hi\\nOutput: greeting'
    """
    if not demos:
        return ""
    return header + separator.join(
        fill_template(template, {"input": demo["input"], "output": demo["output"]})
        for demo in demos
    )


def demos_parameter(role: str = "few-shot demonstrations", data: str = "") -> Parameter:
    """A ``DEMOS`` parameter for :class:`DemoOptimizer`: a string, with ``requires_grad=False``
    (the demonstration optimizer needs no textual gradients, so none are asked for).

    Example:
        >>> demos_parameter("examples of tickets and their team").param_type.value
        'demos'
    """
    return Parameter(data, role=role, requires_grad=False, param_type=ParameterType.DEMOS)


@dataclass(frozen=True)
class DemoOptions(GroupOptions):
    """The options of one demonstration parameter group.

    Attributes:
        max_demos: Demonstrations per set, at most.
        num_candidates: Candidate sets scored per search, besides the current one.
        template: How one demonstration is rendered (``{input}``, ``{output}``).
        separator: What goes between two demonstrations.
        header: Text before the demonstrations (only when there are some).
        max_pool: Passing samples kept per parameter (the first ones recorded).
        search_every: Steps between two searches, at least (a search also needs new
            demonstrations since the last one; the first comes at the first step with any).
        selection: ``"halving"`` (with a Scorer: the other sets race by successive halving on
            the validation samples, the winner is scored on all of them; about half the
            requests for four sets) or ``"full"`` (every set scored on every sample). With a
            plain closure every set is scored in full either way.
        seed: Seeds the random search (and the order the race visits the samples in).

    Raises:
        TypeError, ValueError: For an invalid option.
    """

    owner = "DemoOptimizer"

    max_demos: int = 4
    num_candidates: int = 8
    template: str = prompts.DEMO_TEMPLATE
    separator: str = prompts.DEMO_SEPARATOR
    header: str = ""
    max_pool: int = 200
    search_every: int = 1
    selection: str = "halving"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("max_demos", 1), ("num_candidates", 1), ("max_pool", 1),
                          ("search_every", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DemoOptimizer: {name} must be an int >= {low}, got {value!r}")
        for name in ("template", "separator", "header"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(
                    f"DemoOptimizer: {name} must be a str, got {type(getattr(self, name)).__name__}"
                )
        if self.selection not in _SELECTIONS:
            raise ValueError(
                f"DemoOptimizer: selection must be one of {_SELECTIONS}, got {self.selection!r}"
            )
        names = set(placeholders(self.template))
        if names != {"input", "output"}:
            raise ValueError(
                "DemoOptimizer: template must use exactly the placeholders {input} and {output}, "
                f"got {sorted(names)}"
            )

def _texts(value: Any, what: str) -> list[str]:
    data = value.data if isinstance(value, Variable) else value
    if isinstance(data, (list, tuple)):
        return [str(item) for item in data]
    return [str(data)]


def _passes(value: Any) -> list[bool]:
    data = value.data if isinstance(value, Variable) else value
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    for item in items:
        if not isinstance(item, (bool, int, float)):
            raise TypeError(
                "DemoOptimizer.record: passed must hold bools or numbers (a number > 0 "
                f"passes), got {type(item).__name__}"
            )
    return [bool(item > 0) if not isinstance(item, bool) else item for item in items]


class DemoOptimizer(Optimizer):
    """Chooses few-shot demonstrations for ``DEMOS`` parameters by validation score.

    Each parameter holds text (use :func:`demos_parameter`); the optimizer renders the chosen
    demonstrations into it with the group's ``template``/``separator``/``header``.

    ``step(closure=None)``, per parameter whose pool grew since its last search (and at least
    ``search_every`` steps after it): the current set and up to ``num_candidates`` other
    distinct sets — half mutations of the current set (one demonstration added or swapped),
    half random sets of up to ``max_demos`` — drawn with a ``random.Random`` seeded by ``(seed,
    parameter index, search number)``, are rendered and scored with the validation closure; the
    best is kept only if it scores higher than the current set over all the validation samples
    (the current set wins ties), so the validation score never drops.

    With a :class:`~afnio.optim.scoring.Scorer` as the closure the sets are scored without
    touching the parameter, concurrently, and with ``selection="halving"`` they race
    (:func:`~afnio.optim.selection.racing_plan`): every round the better half goes on to twice
    the samples, in a seeded order, and the last one standing is scored on all of them, as is
    the current set. A plain closure scores whole sets one after another, each written into
    the parameter in turn (and the winner written last).

    Per-parameter state (all JSON-safe, so resume is exact): ``pool`` (``{"input", "output"}``
    dicts, in recording order), ``chosen`` (pool indices of the current set), ``score`` (its
    validation score at the last search), ``searches``, ``searched_pool`` / ``searched_step``
    (pool size and step count at the last search), ``steps``, ``accepted`` / ``rejected``
    (searches that changed / kept the set).

    Cost of a search, with *C* ≤ ``num_candidates`` distinct other sets and a validation set of
    *V* samples: ``(1 + C)·V`` sample evaluations with ``selection="full"`` or a plain closure;
    with halving *V* for the current set plus about ``V·(1 + log2(C)/2)`` for the race (for
    *C* = 4 and *V* = 66: 66 + 4·17 + 2·16 + 1·33 = 199 instead of 5·66 = 330). A program sending
    one request per sample sends that many requests (fewer when a response cache already holds
    the current set's). The search's count is ``last_step[i]["evaluations"]``. A step without a
    search costs nothing; no optimizer model, no textual gradients (``uses_gradients`` is
    ``False``: a Trainer whose only optimizer this is skips ``backward()``).

    Args:
        params: The ``DEMOS`` parameters, or dicts defining parameter groups.
        evaluate: The validation closure (see :mod:`afnio.optim.scoring`): your program on
            validation data, returning its score. Code, so not saved. Without it, the closure
            given to :meth:`step` is used (the Trainer's scores the training batch).
        **options: :class:`DemoOptions`.

    Raises:
        TypeError: For a parameter that does not hold a string, or an unknown option.
        ValueError: For an invalid option.
    """

    uses_gradients = False

    def __init__(
        self,
        params: ParamsT,
        *,
        evaluate: Callable[[], Any] | None = None,
        **options: Any,
    ) -> None:
        if evaluate is not None and not callable(evaluate):
            raise TypeError(
                f"DemoOptimizer: evaluate must be callable, got {type(evaluate).__name__}"
            )
        unknown = sorted(set(options) - set(DemoOptions.names()))
        if unknown:
            raise TypeError(
                f"DemoOptimizer: unknown options {unknown}; it takes {DemoOptions.names()}"
            )
        self.evaluate = evaluate
        defaults = {**dataclasses.asdict(DemoOptions()), **options}
        DemoOptions.from_group(defaults)
        super().__init__(params, defaults)

    @property
    def needs_closure(self) -> bool:  # type: ignore[override]
        """``True`` unless the optimizer was given its own ``evaluate``."""
        return self.evaluate is None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its options and parameters."""
        if isinstance(param_group, dict):
            DemoOptions.from_group({**self.defaults, **param_group})
            params = param_group.get("params", [])
            for param in [params] if isinstance(params, Variable) else list(params):
                if isinstance(param, Variable) and not isinstance(param.data, str):
                    raise TypeError(
                        f"DemoOptimizer: the parameter with role {param.role!r} must hold a "
                        f"string (the rendered demonstrations), got {type(param.data).__name__}"
                    )
            param_group["params"] = params
        super().add_param_group(param_group)

    def _params(self) -> list[tuple[Variable, DemoOptions]]:
        return [
            (param, DemoOptions.from_group(group))
            for group in self.param_groups
            for param in dict.fromkeys(group["params"])
        ]

    # ----------------------------------------------------------------- bootstrapping
    def record(
        self,
        inputs: Any,
        outputs: Any,
        passed: Any,
        param: Variable | None = None,
    ) -> int:
        """Add the samples that passed to a parameter's pool of demonstrations.

        Does nothing under ``no_grad`` (validation and re-scoring run there), so only training
        samples become demonstrations.

        Args:
            inputs: The inputs (a Variable, a list or a str); one per sample.
            outputs: The program's outputs, one per sample.
            passed: Per sample, a bool or a number (``> 0`` passes), e.g. the evaluator's
                per-sample scores.
            param: The parameter whose pool grows (optional when there is only one).

        Returns:
            How many new demonstrations joined the pool (duplicates and those past
            ``max_pool`` don't).

        Raises:
            ValueError: If the lengths differ, or ``param`` is needed or unknown.
        """
        if not is_grad_enabled():
            return 0
        pairs = self._params()
        if param is None:
            if len(pairs) != 1:
                raise ValueError(
                    f"DemoOptimizer.record: the optimizer has {len(pairs)} parameters; say "
                    "which pool to grow with param="
                )
            param, opts = pairs[0]
        else:
            found = [opts for p, opts in pairs if p is param]
            if not found:
                raise ValueError(
                    f"DemoOptimizer.record: the parameter with role {param.role!r} is not one "
                    "of this optimizer's"
                )
            opts = found[0]
        texts_in, texts_out = _texts(inputs, "inputs"), _texts(outputs, "outputs")
        verdicts = _passes(passed)
        if not len(texts_in) == len(texts_out) == len(verdicts):
            raise ValueError(
                f"DemoOptimizer.record: inputs, outputs and passed must have the same length, "
                f"got {len(texts_in)}, {len(texts_out)} and {len(verdicts)}"
            )
        pool = self.state[param].setdefault("pool", [])
        known = {(demo["input"], demo["output"]) for demo in pool}
        added = 0
        for text_in, text_out, ok in zip(texts_in, texts_out, verdicts):
            if ok and (text_in, text_out) not in known and len(pool) < opts.max_pool:
                pool.append({"input": text_in, "output": text_out})
                known.add((text_in, text_out))
                added += 1
        return added

    # ----------------------------------------------------------------- searching
    @staticmethod
    def _candidates(current: list[int], pool_size: int, opts: DemoOptions,
                    rng: random.Random) -> list[list[int]]:
        """The current set first, then up to ``num_candidates`` distinct others."""
        size = min(opts.max_demos, pool_size)
        sets = [sorted(current)]
        seen = {tuple(sets[0])}
        wanted = opts.num_candidates
        mutations = wanted // 2 if current else 0
        for kind, count in (("mutation", mutations), ("random", wanted - mutations)):
            made = 0
            for _ in range(count * _MAX_TRIES):
                if made == count:
                    break
                if kind == "random":
                    chosen = sorted(rng.sample(range(pool_size), size))
                else:
                    unused = [i for i in range(pool_size) if i not in current]
                    if not unused:
                        break
                    chosen = list(current)
                    if len(chosen) < opts.max_demos:
                        chosen.append(rng.choice(unused))
                    else:
                        chosen[rng.randrange(len(chosen))] = rng.choice(unused)
                    chosen = sorted(chosen)
                if tuple(chosen) not in seen:
                    seen.add(tuple(chosen))
                    sets.append(chosen)
                    made += 1
        return sets

    def _choose(self, param: Variable, texts: list[str], score_fn: Callable[[], Any],
                opts: DemoOptions, rng: random.Random) -> tuple[int, float, float, int]:
        """Score the rendered sets (``texts[0]`` the current one) and pick the best.

        Returns:
            The winner's position, the current set's score, the winner's score and how many
            sample evaluations the search took (``0`` when a plain closure scored whole sets).
        """
        if not isinstance(score_fn, Scorer):
            scores = self._score_in_turn(param, texts, score_fn)
            best = max(range(len(texts)), key=lambda i: (scores[i], -i))
            return best, scores[0], scores[best], 0
        order = list(range(score_fn.num_samples))
        key = id(param)
        others = [Arm({key: text}, "candidate") for text in texts[1:]]
        if opts.selection == "halving":
            rng.shuffle(order)
            plan = racing_plan(len(others), len(order))
        else:
            plan = [(len(others), len(order))]
        jobs = [score_fn.ascore({param: texts[0]}, order)]
        if others:
            jobs.append(successive_halving(score_fn, others, {key: param}, order, plan))
        current, *race = run(gather_all(jobs))
        evaluations = len(order) + sum(arm.samples for arm in others)
        if race and others[race[0][0]].mean > current:
            return 1 + race[0][0], current, others[race[0][0]].mean, evaluations
        return 0, current, current, evaluations

    @staticmethod
    def _score_in_turn(param: Variable, texts: list[str], score_fn: Callable[[], Any]
                       ) -> list[float]:
        """Each set written into the parameter in turn and scored by the closure."""
        scores = []
        original = param.data
        try:
            for text in texts:
                with no_grad():
                    param.copy_(text)
                    scores.append(read_score(score_fn(), "DemoOptimizer"))
        finally:
            with no_grad():
                param.copy_(original)
        return scores

    def step(self, closure: Callable[[], Any] | None = None) -> float | None:
        """Search for better demonstration sets (see the class docstring).

        Args:
            closure: The validation closure, when the optimizer was not given ``evaluate``.

        Returns:
            The validation score of the last parameter searched, or ``None`` if none was.

        Raises:
            ValueError: Without a closure (and no ``evaluate``).
            Exception: Whatever the closure raises; the parameter keeps its set then.
        """
        score_fn = self.evaluate if self.evaluate is not None else closure
        if score_fn is None:
            raise ValueError(
                "DemoOptimizer.step: needs a validation closure that returns the program's "
                "score (give the optimizer evaluate=... or pass one to step)"
            )
        index_of = self._param_indices()
        records, result = [], None
        for param, opts in self._params():
            state = self.state[param]
            state["steps"] = state.get("steps", 0) + 1
            pool = state.get("pool", [])
            grew = len(pool) > state.get("searched_pool", 0)
            waited = state["steps"] - state.get("searched_step", -opts.search_every)
            if not pool or not grew or waited < opts.search_every:
                continue
            searches = state.get("searches", 0)
            rng = random.Random(f"{opts.seed}:{index_of[id(param)]}:{searches}")
            current = list(state.get("chosen", []))
            sets = self._candidates(current, len(pool), opts, rng)
            render = [
                render_demos([pool[i] for i in chosen], opts.template, opts.separator,
                             opts.header)
                for chosen in sets
            ]
            best, score_before, score_after, evaluations = self._choose(
                param, render, score_fn, opts, rng
            )
            before = copy.deepcopy(param.data)
            with no_grad():
                param.copy_(render[best])
            changed = best != 0
            state.update(chosen=sets[best], score=score_after, searches=searches + 1,
                         searched_pool=len(pool), searched_step=state["steps"])
            for name in ("accepted", "rejected"):
                state.setdefault(name, 0)
            state["accepted" if changed else "rejected"] += 1
            records.append({
                "index": index_of[id(param)],
                "role": param.role,
                "before": before,
                "after": copy.deepcopy(param.data),
                "feedback": [],
                "verdict": "accepted" if changed else "rejected",
                "reason": None if changed else (
                    f"none of {len(sets) - 1} other demonstration sets scored higher than the "
                    f"current one ({score_before:g})"
                ),
                "score_before": score_before,
                "score_after": score_after,
                "candidates": len(sets),
                "evaluations": evaluations,
            })
            result = score_after
        self.last_step = records
        return result

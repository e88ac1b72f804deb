"""Scores of parameter values: what gated steps, candidate search, scored history and the
demonstration optimizer compare.

**The closure contract.** The optimizers that compare scores take ``step(closure)``, where
``closure()`` re-evaluates the program *with the parameters' current values* on the data the
comparison is about (the minibatch, or a held-out sample you name) and returns its score:

- a number, or a numeric Variable (a batch of scores is averaged), or
- the evaluator's ``(score, explanation)`` pair, or ``{"loss": (score, explanation), ...}`` (what
  a ``training_step`` returns); the score is read from it.

Higher is better. The closure must not call ``backward()``: the optimizers call it under
``no_grad`` (no graph, no gradient requests). Scores are only ever compared with scores of the
same closure, so any consistent scale works (a sum over a fixed batch as well as a mean).

**Scorers.** A closure can only score the values the parameters hold, one after another. A
:class:`Scorer` is a closure that can also score *other* values without touching the
parameters, on any subset of its samples, so candidates are scored concurrently and a bandit
can spend its budget sample by sample: :class:`ModuleScorer` (a Module's step on a batch; the
Trainer builds one per training batch) and :class:`FunctionScorer` (your own function).

Example:
    >>> import afnio
    >>> prompt = afnio.Variable("Answer:", role="prefix", requires_grad=True)
    >>> def accuracy(values, indices):
    ...     answers = [values[prompt] + str(i) for i in indices]
    ...     return sum(a.startswith("A:") for a in answers) / len(indices)
    >>> scorer = FunctionScorer(accuracy, [prompt], num_samples=4)
    >>> scorer()                                    # the current value, every sample
    0.0
    >>> run(scorer.ascore({prompt: "A:"}, [0, 1]))   # another value, 2 samples
    1.0
    >>> prompt.data                                 # untouched
    'Answer:'
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import copy
import functools
import inspect
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from afnio._runtime import run
from afnio._variable import Variable
from afnio.autodiff.grad_mode import no_grad

__all__ = [
    "FunctionScorer",
    "ModuleScorer",
    "Scorer",
    "count_samples",
    "read_score",
    "take_samples",
]

_REDUCTIONS = ("sum", "mean")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unwrap_score(result: Any, what: str) -> Any:
    """The score inside a closure result (a number, a Variable or a list of numbers)."""
    if isinstance(result, Mapping):
        if "loss" not in result:
            raise TypeError(
                f"{what}: the closure returned a dict without a 'loss' entry (keys "
                f"{sorted(map(str, result))}); return a number or the (score, explanation) pair"
            )
        result = result["loss"]
    if isinstance(result, (tuple, list)) and len(result) == 2 and not all(
        _is_number(item) for item in result
    ):
        result = result[0]
    return result.data if isinstance(result, Variable) else result


def read_score(result: Any, what: str = "closure") -> float:
    """The score a closure returned, as a float (see the module's contract).

    Args:
        result: A number, a numeric Variable, a ``(score, explanation)`` pair or a dict whose
            ``"loss"`` holds that pair. A batch of scores is averaged.
        what: Names the caller in errors.

    Raises:
        TypeError: For anything else, naming what was returned.
        ValueError: For a score that is not finite.

    Example:
        >>> read_score((Variable(3), Variable("two wrong")))
        3.0
        >>> read_score(Variable([1, 0, 1, 1]))
        0.75
    """
    data = _unwrap_score(result, what)
    if isinstance(data, list) and data and all(_is_number(item) for item in data):
        value = float(sum(data)) / len(data)
    elif _is_number(data):
        value = float(data)
    else:
        raise TypeError(
            f"{what}: the closure must return a score (a number, a numeric Variable or the "
            f"evaluator's (score, explanation) pair), got {type(result).__name__} holding "
            f"{type(data).__name__}"
        )
    if not math.isfinite(value):
        raise ValueError(f"{what}: the closure returned a score that is not finite ({value})")
    return value


def per_sample_score(result: Any, num_samples: int, score_reduction: str, what: str) -> float:
    """The per-sample score of a step's result: a batch score averaged, a scalar score divided
    by ``num_samples`` when the evaluator summed (``score_reduction="sum"``)."""
    data = _unwrap_score(result, what)
    value = read_score(result, what)
    if isinstance(data, list) or score_reduction != "sum":
        return value
    return value / max(num_samples, 1)


# --------------------------------------------------------------------------- batches
def count_samples(batch: Any) -> int:
    """The number of samples in ``batch``: the length of the first batched Variable or list
    found (tuples and dicts are searched breadth first), else 1.

    Example:
        >>> count_samples((Variable(["a", "b", "c"]), ["x", "y", "z"]))
        3
    """
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, Variable):
            if item.is_batched:
                return len(item.data)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, tuple):
            stack.extend(item)
        elif isinstance(item, list):
            return len(item)
    return 1


def take_samples(batch: Any, indices: Sequence[int]) -> Any:
    """The samples ``indices`` of ``batch``: every batched Variable and list of the batch's
    length is indexed (tuples, lists of Variables and dicts are walked); anything else — a
    scalar, a value of another length — is shared by every sample and kept as it is.

    Example:
        >>> questions = Variable(["q0", "q1", "q2"], role="questions")
        >>> part = take_samples((questions, ["a0", "a1", "a2"]), [2, 0])
        >>> part[0].data, part[1]
        (['q2', 'q0'], ['a2', 'a0'])
    """
    size = count_samples(batch)
    indices = list(indices)

    def take(item: Any) -> Any:
        if isinstance(item, Variable):
            if item.is_batched and len(item.data) == size:
                return Variable([item.data[i] for i in indices], role=item.role)
            return item
        if isinstance(item, Mapping):
            return {key: take(value) for key, value in item.items()}
        if isinstance(item, tuple):
            return tuple(take(value) for value in item)
        if isinstance(item, list):
            if len(item) == size:
                return [item[i] for i in indices]
            return [take(value) for value in item]
        return item

    return take(batch)


# --------------------------------------------------------------------------- scorers
class Scorer(abc.ABC):
    """A closure that can also score other values, on any subset of its samples.

    Calling it (``scorer()``) is the closure contract: the score of the parameters' current
    values on every sample. :meth:`ascore` scores given values without writing them into the
    parameters, so several candidates can be scored at once.
    """

    @property
    @abc.abstractmethod
    def num_samples(self) -> int:
        """How many samples the scorer evaluates."""

    @abc.abstractmethod
    def __call__(self) -> float:
        """The score of the parameters' current values on every sample (higher is better)."""

    @abc.abstractmethod
    async def ascore(self, values: Mapping[Variable, Any], indices: Sequence[int]) -> float:
        """The mean per-sample score on the samples ``indices`` when each parameter in
        ``values`` holds its given value (the others their current one). The parameters
        themselves are not changed."""

    def _check_indices(self, indices: Sequence[int], what: str) -> list[int]:
        indices = list(indices)
        if not indices:
            raise ValueError(f"{what}: indices must name at least one sample")
        bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < self.num_samples]
        if bad:
            raise ValueError(
                f"{what}: sample indices must be ints in [0, {self.num_samples}), got {bad[:5]}"
            )
        return indices


@functools.cache
def _workers() -> ThreadPoolExecutor:
    # A pool of its own: the loop's default executor serves the response cache, which a
    # scoring thread may be waiting on.
    return ThreadPoolExecutor(max_workers=32, thread_name_prefix="afnio-scoring")


def _in_thread(function: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    """Run a synchronous function in a worker thread with the caller's context variables."""
    context = contextvars.copy_context()
    return asyncio.get_running_loop().run_in_executor(_workers(), context.run, function, *args)


class FunctionScorer(Scorer):
    """A scorer from your own function ``fn(values, indices) -> float``.

    ``values`` maps each parameter to the value to score (a parameter not being varied maps to
    its current value); ``indices`` are the samples to score. ``fn`` returns the mean score
    over those samples (higher is better). It may be ``async``; a synchronous ``fn`` runs in a
    worker thread, so several candidates are scored at once. It must not change the
    parameters: read the values from ``values``.

    Args:
        fn: The scoring function.
        params: The parameters ``fn`` reads (the keys of ``values``).
        num_samples: How many samples there are.

    Raises:
        TypeError: If ``fn`` is not callable or a param is not a Variable.
        ValueError: If ``num_samples`` is not a positive int.

    Example:
        >>> p = Variable("x", role="prefix", requires_grad=True)
        >>> scorer = FunctionScorer(lambda values, idx: float(values[p] == "y"), [p], 3)
        >>> scorer(), run(scorer.ascore({p: "y"}, [0]))
        (0.0, 1.0)
    """

    def __init__(
        self,
        fn: Callable[[dict[Variable, Any], list[int]], float | Awaitable[float]],
        params: Sequence[Variable],
        num_samples: int,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"FunctionScorer: fn must be callable, got {type(fn).__name__}")
        params = list(params)
        for param in params:
            if not isinstance(param, Variable):
                raise TypeError(
                    f"FunctionScorer: params must be Variables, got {type(param).__name__}"
                )
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(
                f"FunctionScorer: num_samples must be a positive int, got {num_samples!r}"
            )
        self.fn = fn
        self.params = params
        self._num_samples = num_samples

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def _values(self, values: Mapping[Variable, Any]) -> dict[Variable, Any]:
        merged = {param: copy.deepcopy(param.data) for param in self.params}
        for param, value in values.items():
            if param not in merged:
                raise ValueError(
                    f"FunctionScorer: the parameter with role {param.role!r} is not one of the "
                    "params the scorer was given"
                )
            merged[param] = value
        return merged

    def __call__(self) -> float:
        with no_grad():
            result = self.fn(self._values({}), list(range(self.num_samples)))
            if inspect.isawaitable(result):
                result = run(_awaited(result))
        return read_score(result, "FunctionScorer")

    async def ascore(self, values: Mapping[Variable, Any], indices: Sequence[int]) -> float:
        indices = self._check_indices(indices, "FunctionScorer.ascore")
        merged = self._values(values)
        with no_grad():
            if inspect.iscoroutinefunction(self.fn):
                result = await self.fn(merged, indices)
            else:
                result = await _in_thread(self.fn, merged, indices)
                if inspect.isawaitable(result):
                    result = await result
        return read_score(result, "FunctionScorer")


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class ModuleScorer(Scorer):
    """A scorer that runs a Module's step on a batch: ``module.<step>(batch, batch_idx)``.

    Calling it runs the step on the live module (under ``no_grad``) and returns the per-sample
    score. :meth:`ascore` runs it on a deep copy of the module holding the given values (model
    clients are shared by the copy, so usage, limits and the response cache are the
    originals'), on the chosen samples of the batch (:func:`take_samples`), in a worker
    thread — so candidates are scored concurrently.

    The step's result is read like the Trainer reads it: ``(score, explanation)`` or
    ``{"loss": ...}``; a scalar score is divided by the number of samples when
    ``score_reduction="sum"`` (the evaluators' default reduction).

    Since the step runs again, keep side effects out of it or skip them when
    ``afnio.is_grad_enabled()`` is false (scoring runs under ``no_grad``).

    Args:
        module: The program (an :class:`afnio.cognitive.Module` or anything with the step).
        batch: The samples.
        step: The name of the method to run (``"training_step"``).
        batch_idx: Passed to the step.
        score_reduction: ``"sum"`` or ``"mean"``: how the evaluator reduced a batch.
        baseline: The per-sample score the step already gave for the values the parameters
            hold now (e.g. from the training step that wrote the gradients). While the module's
            parameters keep those values, calling the scorer returns it without sending a
            request.

    Raises:
        TypeError: If the module has no such step.
        ValueError: For an unknown ``score_reduction``.
    """

    def __init__(
        self,
        module: Any,
        batch: Any,
        *,
        step: str = "training_step",
        batch_idx: int = 0,
        score_reduction: str = "sum",
        baseline: float | None = None,
    ) -> None:
        if not callable(getattr(module, step, None)):
            raise TypeError(
                f"ModuleScorer: {type(module).__name__} has no method {step!r} to score with"
            )
        if score_reduction not in _REDUCTIONS:
            raise ValueError(
                f"ModuleScorer: score_reduction must be one of {_REDUCTIONS}, got "
                f"{score_reduction!r}"
            )
        self.module = module
        self.batch = batch
        self.step = step
        self.batch_idx = batch_idx
        self.score_reduction = score_reduction
        self.baseline = baseline
        self._num_samples = count_samples(batch)
        self._baseline_values = self._current_values() if baseline is not None else None

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def _parameters(self) -> list[Variable]:
        parameters = getattr(self.module, "parameters", None)
        return list(parameters()) if callable(parameters) else []

    def _current_values(self) -> list[Any]:
        return [copy.deepcopy(param.data) for param in self._parameters()]

    def _score(self, module: Any, batch: Any, num_samples: int) -> float:
        with no_grad():
            result = getattr(module, self.step)(batch, self.batch_idx)
        return per_sample_score(
            result, num_samples, self.score_reduction, f"ModuleScorer ({self.step})"
        )

    def __call__(self) -> float:
        if self._baseline_values is not None and self._current_values() == self._baseline_values:
            return float(self.baseline)
        return self._score(self.module, self.batch, self.num_samples)

    def _trial(self, values: Mapping[Variable, Any]) -> Any:
        """A deep copy of the module whose copies of the given parameters hold the values."""
        # Shared, not copied: this scorer (a module may hold it) and the optimizers the Trainer
        # attached (the copy reports to the same ones).
        memo: dict[int, Any] = {id(self): self}
        optimizers = getattr(self.module, "__dict__", {}).get("_optimizers")
        if isinstance(optimizers, list):
            memo[id(optimizers)] = optimizers
            memo.update((id(optimizer), optimizer) for optimizer in optimizers)
        trial = copy.deepcopy(self.module, memo)
        with no_grad():
            for param, value in values.items():
                twin = memo.get(id(param))
                if twin is None:
                    raise ValueError(
                        f"ModuleScorer: the parameter with role {param.role!r} is not part of "
                        f"the {type(self.module).__name__} being scored"
                    )
                twin.copy_(copy.deepcopy(value))
        return trial

    async def ascore(self, values: Mapping[Variable, Any], indices: Sequence[int]) -> float:
        indices = self._check_indices(indices, "ModuleScorer.ascore")
        trial = self._trial(values)
        part = take_samples(self.batch, indices)
        return await _in_thread(self._score, trial, part, len(indices))

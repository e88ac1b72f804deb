"""Evaluation of an agent over a dataset, in this process or sharded over Ray workers.

:func:`evaluate` runs an agent's ``validation_step`` (or ``test_step``) over every batch of a
dataset under ``eval()`` and ``no_grad()`` and returns the metrics (weighted by batch size, as
the Trainer computes them), each batch's score and explanation, and the usage. Given a
:class:`RayEvaluation` it shards the batches over Ray workers instead; ``Trainer.validate`` and
``Trainer.test`` take the same object (``distributed=``).

How a sharded evaluation runs:

- The batches are read from the loader in this process (so the order is the loader's) and cut
  into contiguous shards, one per worker.
- The agent's **parameters travel as data**: its ``state_dict()`` encoded by
  :func:`afnio.save` (plain JSON, model clients as secret-free descriptions). Each worker builds
  its own agent with your ``agent_factory`` — which creates the agent's clients there, with keys
  from the worker's environment — and loads that state into it. No client, key or live object
  of this process is pickled.
- Each worker runs its shard's batches one after another, each batch with afnio's usual
  concurrency (every sample's requests in flight at once), and sends back per batch: the metric
  values, the score and explanation, and the usage (in total and per model).
- This process puts the batches back in order, adds each batch's usage to the run-wide totals
  once (so :func:`~afnio.models.usage.track_usage`, the Trainer's rows and budgets see it) and
  computes the metrics exactly as a single process does. With models that answer each request
  the same way wherever it runs (scripted, cached, or deterministic servers), the results,
  their order, the metrics and the usage equal those of a single-process run (costs up to the
  rounding of summing prices in another order; the Trainer's rows round them to 10 decimals).

What it costs: ``ray.init`` (seconds, once per process), one task per shard (milliseconds) and
building the agent once per shard; see ``docs/scaling.md`` for measured numbers and when it
pays off.

Example (needs Ray, so not run here)::

    import ray
    from afnio.trainer import RayEvaluation, Trainer, evaluate

    ray.init(num_cpus=8)
    sharded = RayEvaluation(MyAgent, num_workers=8)   # MyAgent() builds the agent and its clients
    result = evaluate(agent, val_set, batch_size=16, distributed=sharded)
    print(result.metrics["score"], result.usage.cost_usd)
    Trainer().validate(agent, val_loader, distributed=sharded)
"""

from __future__ import annotations

import io
import logging
import math
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from afnio.autodiff.grad_mode import no_grad
from afnio.models.usage import Usage, record_usage, track_usage
from afnio.serialization import load, save
from afnio.trainer.history import json_safe
from afnio.trainer.metrics import MetricAccumulator, parse_step_output, step_values
from afnio.trainer.recorder import StepRecorder
from afnio.utils.data import DataLoader
from afnio.utils.ray import remote_function, require_ray

__all__ = [
    "BatchResult",
    "EvaluationResult",
    "RayEvaluation",
    "RemoteStepError",
    "evaluate",
    "run_batches",
]

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
_REDUCTIONS = ("sum", "mean")


class RemoteStepError(RuntimeError):
    """A step failed in a Ray worker with an exception that could not be sent back as it was.

    The message holds the original exception's type and text.

    Example:
        >>> str(RemoteStepError("ValueError: the model refused"))
        'ValueError: the model refused'
    """


@dataclass(frozen=True)
class BatchResult:
    """What one evaluation step gave.

    Attributes:
        batch_idx: The batch's index in the loader's order.
        size: Samples in the batch.
        values: The step's metric values: ``score`` (per sample) and any extra metrics.
        score: The evaluator's score, as plain data (a number, or a list for a batch score).
        explanation: The evaluator's explanation, as plain data (one text per sample).
        usage: What the batch's requests used (``requests``, tokens, ``cost_usd``).
        usage_by_model: The same per model client (``provider/model``), rounded as the
            Trainer's history rounds it.
        error: ``"Type: message"`` of the exception the step raised, or ``None``.
        exception: That exception itself (not compared).

    Example:
        >>> BatchResult(0, 2, {"score": 0.5}, 1, ["", "why"], {"requests": 0}, {}).error is None
        True
    """

    batch_idx: int
    size: int
    values: dict[str, float]
    score: Any
    explanation: Any
    usage: dict[str, int | float]
    usage_by_model: dict[str, dict[str, int | float]]
    error: str | None = None
    exception: BaseException | None = field(default=None, compare=False, repr=False)


@dataclass
class EvaluationResult:
    """The outcome of :func:`evaluate`.

    Attributes:
        metrics: ``{"score": ..., <extras>...}``: batch-size-weighted means over the batches
            that did not fail.
        batches: One :class:`BatchResult` per batch, in the loader's order.
        usage: The sum of the batches' usage.
        usage_by_model: The sum of the batches' usage per model client.

    Example:
        >>> EvaluationResult({"score": 1.0}, [], Usage(), {}).errors
        []
    """

    metrics: dict[str, float]
    batches: list[BatchResult]
    usage: Usage
    usage_by_model: dict[str, dict[str, int | float]]

    @property
    def errors(self) -> list[BatchResult]:
        """The batches whose step failed (skipped with ``on_error="skip"``)."""
        return [batch for batch in self.batches if batch.error is not None]


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _run_one(agent: Any, step: Callable[..., Any], batch_idx: int, batch: Any, hook: str,
             reduction: str) -> BatchResult:
    recorder = StepRecorder(agent, [])
    failure: Exception | None = None
    values: dict[str, float] = {}
    size = 0
    score: Any = None
    explanation: Any = None
    with track_usage() as used:
        recorder.start_usage(Usage())
        try:
            parsed = parse_step_output(step(batch, batch_idx), hook)
            values, size = step_values(parsed, batch, hook, reduction)
            score, explanation = json_safe(parsed.score), json_safe(parsed.explanation)
        except Exception as error:  # reported with the batch; the caller applies on_error
            failure = error
    spent = Usage(**used.as_dict())
    by_model = recorder.stop_usage(spent)["by_model"]
    return BatchResult(
        batch_idx, size, values, score, explanation, spent.as_dict(), by_model,
        None if failure is None else _error_text(failure), failure,
    )


def run_batches(
    agent: Any,
    batches: Iterable[tuple[int, Any]],
    hook: str = "validation_step",
    score_reduction: str = "sum",
    on_error: str = "raise",
) -> Iterator[BatchResult]:
    """Run ``agent.<hook>(batch, batch_idx)`` on each ``(batch_idx, batch)``, one by one.

    The caller sets the agent's mode and grad mode (evaluations run under ``eval()`` and
    ``no_grad()``). A failing step is yielded with its ``error``; with ``on_error="raise"``
    nothing after it runs.

    Args:
        agent: The agent.
        batches: ``(batch_idx, batch)`` pairs.
        hook: ``"validation_step"`` or ``"test_step"`` (any method with that signature).
        score_reduction: How the evaluator reduced a batch's score (``"sum"`` or ``"mean"``).
        on_error: ``"raise"`` (stop after a failing step) or ``"skip"`` (go on).

    Yields:
        One :class:`BatchResult` per batch run.

    Example:
        >>> import afnio
        >>> from afnio.autodiff.evaluator import ExactMatchEvaluator
        >>> class Echo:
        ...     def validation_step(self, batch, batch_idx):
        ...         return ExactMatchEvaluator.apply(afnio.Variable(batch), ["a", "b"])
        >>> [r.values for r in run_batches(Echo(), enumerate([["a", "b"], ["a", "x"]]))]
        [{'score': 1.0}, {'score': 0.5}]
    """
    step = getattr(agent, hook)
    for batch_idx, batch in batches:
        result = _run_one(agent, step, batch_idx, batch, hook, score_reduction)
        yield result
        if result.error is not None and on_error == "raise":
            return


def _check_choice(who: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{who}: {name} must be one of {allowed}, got {value!r}")


class RayEvaluation:
    """How to shard an evaluation over Ray workers (see :mod:`afnio.trainer.distributed`).

    Args:
        agent_factory: Builds the agent in a worker, with its model clients (keys from the
            worker's environment), e.g. the agent's class. It must be serializable by Ray
            (defined in an importable module, or registered with
            ``ray.cloudpickle.register_pickle_by_value``). The evaluated agent's state is
            loaded into what it returns (``load_state_dict``, strict).
        num_workers: Shards (one Ray task each); ``None``: the cluster's CPUs divided by
            ``num_cpus_per_worker``. Never more than there are batches.
        num_cpus_per_worker: CPUs Ray reserves for each shard's task.
        setup: Called in each worker before ``agent_factory`` (prices, settings, logging).
        **remote_args: More Ray task options (``memory``, ``resources``, ``runtime_env``...).

    Raises:
        TypeError: If ``agent_factory`` or ``setup`` is not callable.
        ValueError: If ``num_workers`` or ``num_cpus_per_worker`` is not positive.

    Example:
        >>> from afnio.cognitive import Module
        >>> RayEvaluation(Module, num_workers=4)
        RayEvaluation(agent_factory=Module, num_workers=4, num_cpus_per_worker=1.0)
    """

    def __init__(
        self,
        agent_factory: Callable[[], Any],
        *,
        num_workers: int | None = None,
        num_cpus_per_worker: float = 1.0,
        setup: Callable[[], Any] | None = None,
        **remote_args: Any,
    ) -> None:
        if not callable(agent_factory):
            raise TypeError(
                f"RayEvaluation: agent_factory must be callable (e.g. the agent's class), got "
                f"{type(agent_factory).__name__}"
            )
        if setup is not None and not callable(setup):
            raise TypeError(f"RayEvaluation: setup must be callable or None, got {setup!r}")
        if num_workers is not None and (
            isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1
        ):
            raise ValueError(
                f"RayEvaluation: num_workers must be None or an int >= 1, got {num_workers!r}"
            )
        if isinstance(num_cpus_per_worker, bool) or not isinstance(
            num_cpus_per_worker, (int, float)
        ) or not (0 < num_cpus_per_worker < math.inf):
            raise ValueError(
                f"RayEvaluation: num_cpus_per_worker must be a number > 0, got "
                f"{num_cpus_per_worker!r}"
            )
        self.agent_factory = agent_factory
        self.num_workers = num_workers
        self.num_cpus_per_worker = float(num_cpus_per_worker)
        self.setup = setup
        self.remote_args = dict(remote_args)

    def __repr__(self) -> str:
        name = getattr(self.agent_factory, "__qualname__", type(self.agent_factory).__name__)
        return (
            f"RayEvaluation(agent_factory={name}, num_workers={self.num_workers}, "
            f"num_cpus_per_worker={self.num_cpus_per_worker})"
        )

    def _shard_count(self, ray: Any, batches: int) -> int:
        if self.num_workers is not None:
            return min(self.num_workers, batches)
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        return max(1, min(batches, int(cpus // self.num_cpus_per_worker)))

    def run(
        self,
        agent: Any,
        loader: Iterable[Any],
        hook: str = "validation_step",
        score_reduction: str = "sum",
        on_error: str = "raise",
    ) -> Iterator[BatchResult]:
        """Evaluate every batch of ``loader`` in Ray workers; yield the results in order.

        Starts a local Ray cluster (``ray.init()``) if none is connected. Each batch's usage is
        added to the run-wide totals once, when its shard's results arrive. A failing step is
        yielded with its ``error``; with ``on_error="raise"`` its shard stops there, and
        closing this generator early (as the Trainer does on a failure) waits for the other
        shards, counting what they used.

        Args:
            agent: The agent whose state is evaluated (it is not run here).
            loader: The batches, read here in order.
            hook: The agent's hook to run.
            score_reduction: ``"sum"`` or ``"mean"`` (see :func:`evaluate`).
            on_error: ``"raise"`` or ``"skip"``.

        Yields:
            One :class:`BatchResult` per batch (batches of a shard stopped by an error are
            missing), in the loader's order.

        Raises:
            ImportError: If Ray is not installed.
            Exception: What ``agent_factory``, ``setup`` or loading the state raised in a
                worker (Ray's error, also an instance of the original exception's class).
        """
        ray = require_ray(feature="RayEvaluation")
        batches = list(enumerate(loader))
        if not batches:
            return
        buffer = io.BytesIO()
        save(agent.state_dict(), buffer)
        if not ray.is_initialized():
            ray.init()
        count = self._shard_count(ray, len(batches))
        shards = [
            batches[k * len(batches) // count:(k + 1) * len(batches) // count]
            for k in range(count)
        ]
        task = remote_function(_evaluate_shard).options(
            num_cpus=self.num_cpus_per_worker, **self.remote_args
        )
        state = ray.put(buffer.getvalue())
        pending = [
            task.remote(self.agent_factory, self.setup, state, shard, hook, score_reduction,
                        on_error)
            for shard in shards
        ]
        ready: dict[int, BatchResult] = {}
        order = [batch_idx for batch_idx, _ in batches]
        position = 0
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for result in ray.get(done[0]):
                    record_usage(Usage(**result.usage))
                    ready[result.batch_idx] = result
                while position < len(order) and order[position] in ready:
                    yield ready.pop(order[position])
                    position += 1
            for batch_idx in order[position:]:
                if batch_idx in ready:
                    yield ready.pop(batch_idx)
        finally:
            for ref in pending:
                try:
                    for result in ray.get(ref):
                        record_usage(Usage(**result.usage))
                except Exception as error:  # another error is already on its way out
                    logger.error("RayEvaluation: a shard still running when the evaluation "
                                 "stopped failed too: %s", _error_text(error))


def _portable(result: BatchResult, dumps: Callable[[Any], bytes]) -> BatchResult:
    """``result`` with an exception Ray can send back (a RemoteStepError if it can't)."""
    if result.exception is None:
        return result
    try:
        dumps(result.exception)
        exception: BaseException = result.exception
    except (pickle.PicklingError, TypeError, AttributeError, ValueError):
        exception = RemoteStepError(result.error)
    return BatchResult(result.batch_idx, result.size, result.values, result.score,
                       result.explanation, result.usage, result.usage_by_model, result.error,
                       exception)


def _evaluate_shard(
    agent_factory: Callable[[], Any],
    setup: Callable[[], Any] | None,
    state: bytes,
    batches: list[tuple[int, Any]],
    hook: str,
    score_reduction: str,
    on_error: str,
) -> list[BatchResult]:
    """One shard, in a Ray worker: build the agent, load the state, run the batches."""
    from ray import cloudpickle

    if setup is not None:
        setup()
    agent = agent_factory()
    agent.load_state_dict(load(io.BytesIO(state)))
    if callable(getattr(agent, "eval", None)):
        agent.eval()
    with no_grad():
        results = list(run_batches(agent, batches, hook, score_reduction, on_error))
    return [_portable(result, cloudpickle.dumps) for result in results]


def _sum_by_model(results: Iterable[BatchResult]) -> dict[str, dict[str, int | float]]:
    totals: dict[str, Usage] = {}
    for result in results:
        for label, usage in result.usage_by_model.items():
            totals[label] = totals.get(label, Usage()) + Usage(**usage)
    return {label: usage.as_dict() for label, usage in sorted(totals.items())}


def evaluate(
    agent: Any,
    data: Iterable[Any],
    *,
    batch_size: int | None = None,
    hook: str = "validation_step",
    score_reduction: str = "sum",
    on_error: str = "raise",
    distributed: RayEvaluation | None = None,
) -> EvaluationResult:
    """Run ``agent.<hook>`` over ``data`` under ``eval()`` and ``no_grad()``; collect the results.

    Args:
        agent: An afnio Module (or anything with the hook, ``eval``/``train`` and, for
            ``distributed``, ``state_dict``).
        data: A DataLoader (or any iterable of batches), or, with ``batch_size``, a dataset
            (a sequence of samples) to batch with :class:`~afnio.utils.data.DataLoader`.
        batch_size: Batch ``data`` (a dataset) in batches of this size, in order.
        hook: ``"validation_step"`` (default) or ``"test_step"``.
        score_reduction: How the evaluator reduced each batch's score: ``"sum"`` (divide by
            the batch size) or ``"mean"``, as for the Trainer.
        on_error: ``"raise"``: a failing step raises (with a note naming the batch);
            ``"skip"``: it is left out of the metrics and listed in ``errors``.
        distributed: A :class:`RayEvaluation` to shard the batches over Ray workers;
            ``None`` runs here.

    Returns:
        The :class:`EvaluationResult`.

    Raises:
        ValueError: If ``score_reduction``, ``on_error`` or ``batch_size`` is invalid.
        TypeError: If ``distributed`` is not a RayEvaluation.
        Exception: A failing step's exception with ``on_error="raise"``.

    Example:
        >>> import afnio
        >>> from afnio.autodiff.evaluator import ExactMatchEvaluator
        >>> from afnio.cognitive import Module
        >>> class Upper(Module):
        ...     def validation_step(self, batch, batch_idx):
        ...         words, targets = batch
        ...         guess = afnio.Variable([w.upper() for w in words.data], role="guesses")
        ...         return ExactMatchEvaluator.apply(guess, targets)
        >>> data = [(afnio.Variable(w, role="word"), t) for w, t in
        ...         [("a", "A"), ("b", "B"), ("c", "x")]]
        >>> result = evaluate(Upper(), data, batch_size=2)
        >>> result.metrics, [batch.score for batch in result.batches]
        ({'score': 0.6666666666666666}, [2, 0])
    """
    who = "evaluate"
    _check_choice(who, "score_reduction", score_reduction, _REDUCTIONS)
    _check_choice(who, "on_error", on_error, ON_ERROR)
    if distributed is not None and not isinstance(distributed, RayEvaluation):
        raise TypeError(
            f"{who}: distributed must be a RayEvaluation or None, got {type(distributed).__name__}"
        )
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{who}: batch_size must be None or an int >= 1, got {batch_size!r}")
        data = DataLoader(data, batch_size=batch_size)
    if distributed is not None:
        results = list(distributed.run(agent, data, hook, score_reduction, on_error))
    else:
        was_training = bool(getattr(agent, "training", False))
        agent.eval()
        try:
            with no_grad():
                results = list(run_batches(agent, enumerate(data), hook, score_reduction,
                                           on_error))
        finally:
            if was_training:
                agent.train()
    accumulator = MetricAccumulator()
    usage = Usage()
    for result in results:
        usage += Usage(**result.usage)
        if result.error is None:
            accumulator.add(result.values, result.size)
        elif on_error == "raise":
            error = result.exception or RemoteStepError(result.error)
            if hasattr(error, "add_note"):
                error.add_note(f"afnio evaluate: {hook} failed at batch {result.batch_idx}")
            raise error
    return EvaluationResult(accumulator.means(), results, usage, _sum_by_model(results))


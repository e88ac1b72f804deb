"""Metrics for the Trainer: reading step outputs, batch-size-weighted averages, the run's log.

How a step's output becomes metrics:

- A step returns ``(score, explanation)`` or a dict whose ``"loss"`` holds that pair; other
  dict entries are extra metrics (numbers or numeric Variables).
- The **score** becomes the per-sample metric ``<prefix>_score``: a numeric *batch* score is
  averaged over its elements; a *scalar* score is divided by the batch size when the evaluator
  summed over the batch (``score_reduction="sum"``, the usual evaluator ``reduction_fn``) and
  taken as it is when it already averaged (``score_reduction="mean"``).
- An **extra metric** is read as that batch's mean (a numeric batch Variable is averaged).
- Per-epoch values are averages over batches **weighted by batch size**, so a short last batch
  counts for what it holds.
- The batch size is the explanation's batch size when it is a batch, else the length of the
  first batched Variable or list found in the batch (tuples and dicts are searched, breadth
  first), else 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from afnio._variable import Variable
from afnio.optim.scoring import count_samples
from afnio.trainer.loggers import CSVLogger, JSONLLogger, Logger

__all__ = [
    "MetricAccumulator",
    "MetricsLog",
    "StepOutput",
    "batch_size_of",
    "parse_step_output",
    "score_per_sample",
    "step_values",
]


class StepOutput:
    """A step's loss pair and extra metrics, read from what a ``*_step`` hook returned.

    Attributes:
        score: The evaluator's score Variable (or a plain number), or ``None`` when the hook
            returned nothing (allowed only for manual optimization).
        explanation: The explanation Variable whose ``backward()`` gives the textual gradients.
        extras: Extra metrics by name, as floats (batch means).
    """

    def __init__(self, score: Any, explanation: Variable | None, extras: dict[str, float]) -> None:
        self.score = score
        self.explanation = explanation
        self.extras = extras


def _number(value: Any, hook: str, name: str) -> float:
    """A float from a number or numeric Variable (a batch is averaged)."""
    data = value.data if isinstance(value, Variable) else value
    if isinstance(data, list):
        if not data or not all(_is_number(item) for item in data):
            raise TypeError(
                f"{hook}: metric {name!r} must be a number or a numeric Variable, got a batch "
                f"holding {sorted({type(item).__name__ for item in data}) or 'nothing'}"
            )
        return float(sum(data)) / len(data)
    if not _is_number(data):
        role = f" (role {value.role!r})" if isinstance(value, Variable) else ""
        raise TypeError(
            f"{hook}: metric {name!r}{role} must be a number or a numeric Variable, "
            f"got {type(data).__name__}"
        )
    return float(data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_step_output(output: Any, hook: str, allow_none: bool = False) -> StepOutput:
    """Read what ``training_step`` / ``validation_step`` / ``test_step`` returned.

    Args:
        output: ``(score, explanation)``, or ``{"loss": (score, explanation), **extras}``, or
            ``None`` (only when ``allow_none``).
        hook: The hook's name, quoted in errors.
        allow_none: Accept ``None`` and a dict without ``"loss"`` (manual optimization).

    Returns:
        The parsed :class:`StepOutput`.

    Raises:
        TypeError: If the output has another shape, or a metric is not numeric.
    """
    extras: dict[str, float] = {}
    loss: Any = output
    if isinstance(output, Mapping):
        for name, value in output.items():
            if name != "loss":
                extras[str(name)] = _number(value, hook, str(name))
        if "loss" not in output:
            if allow_none:
                return StepOutput(None, None, extras)
            raise TypeError(
                f"{hook}: the returned dict has no 'loss' entry (keys: "
                f"{sorted(map(str, output))}); put the evaluator's (score, explanation) pair "
                "under 'loss'"
            )
        loss = output["loss"]
    if loss is None and allow_none:
        return StepOutput(None, None, extras)
    if not (isinstance(loss, (tuple, list)) and len(loss) == 2):
        raise TypeError(
            f"{hook}: expected the evaluator's (score, explanation) pair, got {type(loss).__name__}"
        )
    score, explanation = loss
    if not isinstance(explanation, Variable):
        raise TypeError(
            f"{hook}: the explanation (second item of the loss pair) must be a Variable, got "
            f"{type(explanation).__name__}"
        )
    if not isinstance(score, Variable) and not _is_number(score):
        raise TypeError(
            f"{hook}: the score (first item of the loss pair) must be a numeric Variable or a "
            f"number, got {type(score).__name__}"
        )
    return StepOutput(score, explanation, extras)


def batch_size_of(batch: Any, explanation: Variable | None = None) -> int:
    """The number of samples in ``batch`` (see the module docstring for the rule)."""
    if explanation is not None and explanation.is_batched:
        return len(explanation.data)
    return count_samples(batch)


def score_per_sample(score: Any, batch_size: int, reduction: str, hook: str) -> float:
    """The per-sample metric of a score (see the module docstring)."""
    value = _number(score, hook, "score")
    data = score.data if isinstance(score, Variable) else score
    if isinstance(data, list) or reduction != "sum":
        return value
    return value / batch_size


def step_values(
    parsed: StepOutput, batch: Any, hook: str, reduction: str
) -> tuple[dict[str, float], int]:
    """A step's metric values (its per-sample ``score`` and extras) and its batch size.

    Args:
        parsed: What :func:`parse_step_output` read from the hook.
        batch: The batch the hook ran on (for its size).
        hook: The hook's name, quoted in errors.
        reduction: How the evaluator reduced the batch: ``"sum"`` or ``"mean"``.

    Example:
        >>> import afnio
        >>> step = parse_step_output((3, afnio.Variable(["", "", "", ""])), "validation_step")
        >>> step_values(step, None, "validation_step", "sum")
        ({'score': 0.75}, 4)
    """
    values = dict(parsed.extras)
    size = batch_size_of(batch, parsed.explanation)
    if parsed.score is not None:
        values["score"] = score_per_sample(parsed.score, size, reduction, hook)
    return values, size


class MetricAccumulator:
    """Batch-size-weighted running means of named metrics.

    Example:
        >>> acc = MetricAccumulator()
        >>> acc.add({"score": 1.0}, weight=3)
        >>> acc.add({"score": 0.0}, weight=1)
        >>> acc.means()
        {'score': 0.75}
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, values: Mapping[str, float], weight: float) -> None:
        """Add one batch's values, each counted ``weight`` times."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * weight
            self.weights[name] = self.weights.get(name, 0.0) + weight

    def means(self, prefix: str = "") -> dict[str, float]:
        """The weighted means so far, names prefixed with ``prefix``."""
        return {
            prefix + name: total / self.weights[name]
            for name, total in self.sums.items()
            if self.weights[name] > 0
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain data to resume the averages from."""
        return {"sums": dict(self.sums), "weights": dict(self.weights)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.weights = {str(k): float(v) for k, v in state["weights"].items()}


class MetricsLog:
    """The run's metric rows, kept in memory and sent to loggers.

    Rows are kept in memory (and in checkpoints, so a resumed run rewrites exactly the rows the
    checkpoint knew about). By default (a ``directory`` and no ``loggers``) the rows go to
    ``metrics.jsonl`` (one JSON object per line) and ``metrics.csv`` (one column per key seen in
    any row, in order of first appearance), both rewritten on every :meth:`append`.

    Args:
        directory: Where the two files go; ``None`` keeps rows in memory only.
        loggers: Send rows to these :class:`~afnio.trainer.loggers.Logger` objects instead of
            the two default files.

    Example:
        >>> log = MetricsLog(None)
        >>> log.append({"stage": "fit", "epoch": 0, "train_score": 0.5})
        >>> log.rows
        [{'stage': 'fit', 'epoch': 0, 'train_score': 0.5}]
    """

    def __init__(self, directory: Path | None, loggers: Sequence[Logger] | None = None) -> None:
        self.directory = directory
        self.rows: list[dict[str, Any]] = []
        self._jsonl: JSONLLogger | None = None
        self._csv: CSVLogger | None = None
        if loggers is not None:
            self.loggers: list[Logger] = list(loggers)
        elif directory is not None:
            self._jsonl, self._csv = JSONLLogger(directory), CSVLogger(directory)
            self.loggers = [self._jsonl, self._csv]
        else:
            self.loggers = []

    @property
    def jsonl_path(self) -> Path | None:
        """Path of ``metrics.jsonl`` (``None`` when not writing the default files)."""
        return None if self._jsonl is None else self._jsonl.path

    @property
    def csv_path(self) -> Path | None:
        """Path of ``metrics.csv`` (``None`` when not writing the default files)."""
        return None if self._csv is None else self._csv.path

    def append(self, row: Mapping[str, Any], step: int | None = None) -> None:
        """Add a row and send it to every logger (``step``: the ``global_step`` it belongs to)."""
        self.rows.append(dict(row))
        for logger in self.loggers:
            logger.log_metrics(dict(row), step)

    def replace(self, rows: list[Mapping[str, Any]]) -> None:
        """Start over from ``rows`` (used when a fit starts or resumes) and tell every logger."""
        self.rows = [dict(row) for row in rows]
        self.write()

    def write(self) -> None:
        """Send the whole list of rows to every logger again (files are rewritten from it)."""
        for logger in self.loggers:
            logger.log_history([dict(row) for row in self.rows])

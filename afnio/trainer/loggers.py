"""Loggers: where the Trainer sends metrics, hyperparameters, prompt versions and files.

The shape follows Lightning's loggers. A :class:`Logger` receives

- :meth:`~Logger.log_hyperparams` once per fit, with the run's configuration (Trainer
  arguments, optimizer options; never an API key);
- :meth:`~Logger.log_metrics` with one row per finished epoch (``stage="fit"``), per
  ``validate``/``test`` call and, when the Trainer's ``log_every_n_steps`` asks for them, per
  training step (``stage="train_step"``);
- :meth:`~Logger.log_history` when a fit starts (with no rows) or resumes (with the epoch rows
  the checkpoint knew), so loggers that rewrite files start from the right rows;
- :meth:`~Logger.log_text` with each new value of a parameter (a prompt version);
- :meth:`~Logger.log_artifact` with files of the run (the HTML report);
- :meth:`~Logger.finalize` when a fit ends: ``"success"``, ``"failed"`` or ``"interrupted"``.

Every hook does nothing by default, so a logger overrides only what it stores.
``Trainer(logger=True)`` (the default) uses :class:`JSONLLogger` and :class:`CSVLogger` in the
run directory; the MLflow logger lives in :mod:`afnio.trainer.mlflow_logger` (``pip install
afnio[mlflow]``).

Example:
    >>> class PrintScores(Logger):
    ...     def log_metrics(self, metrics, step=None):
    ...         if "train_score" in metrics:
    ...             print(step, metrics["train_score"])
    >>> PrintScores().log_metrics({"stage": "fit", "train_score": 0.5}, step=4)
    4 0.5
"""

from __future__ import annotations

import abc
import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CSVLogger", "FINAL_STATUSES", "JSONLLogger", "Logger", "STEP_STAGE"]

FINAL_STATUSES = ("success", "failed", "interrupted")
"""What :meth:`Logger.finalize` receives: a finished fit, a raised error, or a run stopped early
(Ctrl-C or a spent budget) that can be resumed."""

STEP_STAGE = "train_step"
"""The ``stage`` of per-step metric rows (see ``Trainer(log_every_n_steps=)``)."""


class Logger:
    """Base class of Trainer loggers; every hook does nothing unless overridden.

    Example:
        >>> logger = Logger()
        >>> logger.log_metrics({"train_score": 1.0}, step=1)  # ignored by the base class
        >>> logger.finalize("success")
    """

    def setup(self, run_dir: Path) -> None:
        """Called by the Trainer with its run directory (``default_root_dir``) when built.

        Args:
            run_dir: Where the Trainer writes checkpoints, history and the report.
        """

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record the run's configuration (JSON-safe, nested dicts allowed)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record one row of metrics.

        Args:
            metrics: Names to values; numbers are metrics, other values (``stage``) describe
                the row.
            step: The Trainer's ``global_step`` when the row was made.
        """

    def log_history(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Start over from ``rows``: called when a fit starts (empty) or resumes."""

    def log_text(self, text: str, name: str, step: int) -> None:
        """Record a text version, e.g. a parameter's value after ``step``.

        Args:
            text: The text.
            name: What it is a version of (a parameter name such as ``"system_prompt"``).
            step: The ``global_step`` it belongs to (0 = the value the fit started from).
        """

    def log_artifact(self, path: str | os.PathLike, name: str | None = None) -> None:
        """Record a file of the run (the Trainer sends ``report.html``).

        Args:
            path: The file.
            name: A folder to file it under, if the logger has folders.
        """

    def finalize(self, status: str) -> None:
        """The fit ended with ``status`` (one of :data:`FINAL_STATUSES`)."""


class _RowFileLogger(Logger, abc.ABC):
    """A logger that keeps its rows and rewrites one file from them on every change."""

    filename = ""

    def __init__(
        self, save_dir: str | os.PathLike | None = None, include_steps: bool = False
    ) -> None:
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.include_steps = bool(include_steps)
        self.rows: list[dict[str, Any]] = []

    @property
    def path(self) -> Path | None:
        """The file written (``None`` until a directory is known)."""
        return None if self.save_dir is None else self.save_dir / self.filename

    def setup(self, run_dir: Path) -> None:
        """Adopt the Trainer's run directory unless a ``save_dir`` was given."""
        if self.save_dir is None:
            self.save_dir = Path(run_dir)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Add the row (step rows only with ``include_steps``) and rewrite the file."""
        if metrics.get("stage") == STEP_STAGE and not self.include_steps:
            return
        self.rows.append(dict(metrics))
        self._write()

    def log_history(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Replace the rows and rewrite the file."""
        self.rows = [dict(row) for row in rows]
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_rows(self.path)

    @abc.abstractmethod
    def _write_rows(self, path: Path) -> None:
        """Write every row to ``path``."""


class JSONLLogger(_RowFileLogger):
    """Writes ``metrics.jsonl``: one JSON object per row, keys in the order they were logged.

    Args:
        save_dir: The folder of the file; ``None`` = the Trainer's run directory.
        include_steps: Also write per-step rows (``stage="train_step"``).

    Example:
        >>> import tempfile
        >>> logger = JSONLLogger(tempfile.mkdtemp())
        >>> logger.log_metrics({"stage": "fit", "epoch": 0, "train_score": 0.5}, step=3)
        >>> logger.path.read_text()
        '{"stage": "fit", "epoch": 0, "train_score": 0.5}\\n'
    """

    filename = "metrics.jsonl"

    def _write_rows(self, path: Path) -> None:
        lines = "".join(json.dumps(row, sort_keys=False) + "\n" for row in self.rows)
        path.write_text(lines, encoding="utf-8")


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class CSVLogger(_RowFileLogger):
    """Writes ``metrics.csv``: one column per key seen in any row, in order of first appearance.

    Args:
        save_dir: The folder of the file; ``None`` = the Trainer's run directory.
        include_steps: Also write per-step rows (``stage="train_step"``).

    Example:
        >>> import tempfile
        >>> logger = CSVLogger(tempfile.mkdtemp())
        >>> logger.log_metrics({"stage": "fit", "train_score": 0.5})
        >>> logger.log_metrics({"stage": "test", "test_score": 1.0})
        >>> logger.path.read_text().splitlines()
        ['stage,train_score,test_score', 'fit,0.5,', 'test,,1.0']
    """

    filename = "metrics.csv"

    def _write_rows(self, path: Path) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns.extend(key for key in row if key not in columns)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({key: _csv_value(value) for key, value in row.items()})

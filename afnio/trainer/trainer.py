"""The Trainer: fit, validate, test and predict an agent, with checkpoints, logs and cost.

The agent is an :class:`afnio.cognitive.Module` (or anything with the same hooks):

- ``training_step(batch, batch_idx)`` returns ``(score, explanation)`` (the evaluator's output)
  or ``{"loss": (score, explanation), **extra_metrics}``; ``validation_step`` / ``test_step``
  return the same shape; ``predict_step(batch, batch_idx)`` is optional (else ``agent(batch)``).
- ``configure_optimizers()`` returns an optimizer or a list of them; the Trainer stores the list
  in ``agent._optimizers`` so ``agent.optimizers()`` works inside the hooks.
- With ``agent.automatic_optimization`` True (the default) each training batch runs
  ``zero_grad()`` → ``training_step`` → ``explanation.backward()`` → ``step()`` on every
  optimizer; with False, ``training_step`` does all of that itself (and may return ``None``).
  An optimizer that compares scores (``needs_closure``: a
  :class:`~afnio.optim.GatedOptimizer`, candidate search, scored history) gets
  ``step(closure)``, the closure being a :class:`~afnio.optim.ModuleScorer` that re-runs
  ``training_step`` on the same batch under ``no_grad`` (it knows the training step's own score,
  so the score before the step costs nothing). ``backward()`` is skipped when no optimizer uses
  textual gradients (the demonstration optimizer). ``Trainer(gate_steps=True)`` wraps every
  optimizer in a :class:`~afnio.optim.GatedOptimizer`.
- Each fit row counts the epoch's proposals from the optimizers' ``last_step``:
  ``accepted``, ``rejected`` (refused or rolled back) and ``rolled_back``; the progress bar
  shows them too.

How scores become metrics is described in :mod:`afnio.trainer.metrics`.

Files, under ``default_root_dir`` (the working directory by default):

- ``metrics.jsonl`` / ``metrics.csv``: one row per finished epoch (``stage="fit"``) with the
  training and validation metrics and that epoch's usage (``requests``, ``prompt_tokens``,
  ``completion_tokens``, ``cached_tokens``, ``cost_usd``) plus running totals
  (``total_tokens``, ``total_cost_usd``); ``validate``/``test`` add rows of their own.
- ``checkpoints/epoch=E.ckpt`` after each epoch, ``checkpoints/last.ckpt`` (the latest state,
  also written when a run stops early: budget, error, interruption, ``should_stop``, every
  ``checkpoint_every_n_batches``) and ``checkpoints/best.ckpt`` (the epoch with the best
  ``monitor`` value).

``fit(..., ckpt_path=)`` resumes exactly: the agent and optimizer states, the epoch and the
number of batches already done in it are restored; the loader is set to that epoch with
``set_epoch`` (so a seeded loader replays the same order) and the finished batches are skipped.
The whole checkpoint is checked first (every field, the agent's and each optimizer's state); a
bad one raises a ``ValueError`` naming the file and the field, with the agent untouched.
Model clients are not taken from the checkpoint: the agent and optimizers keep the clients they
were built with in this session (with their budget, cache, limits and keys), so a run stopped by
a spent budget resumes with the client whose budget was raised, and a tampered checkpoint can't
redirect a key or create files.

A batch's optimizer update and the batch counter are committed together: checkpoints written
when a run stops (an error, Ctrl-C, a spent budget) hold the state at the last finished batch,
so an interruption between an optimizer's write and the counter never makes a resume apply an
update twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from afnio.autodiff.grad_mode import no_grad
from afnio.models.errors import BudgetExceededError
from afnio.models.usage import Usage, track_usage
from afnio.optim.gated import GatedOptimizer
from afnio.optim.scoring import ModuleScorer
from afnio.trainer.callbacks import Callback
from afnio.trainer.checkpoint import (
    ResumePoint,
    check_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from afnio.trainer.history import RunHistory, json_safe, public_config
from afnio.trainer.loggers import STEP_STAGE, CSVLogger, JSONLLogger, Logger
from afnio.trainer.metrics import (
    MetricAccumulator,
    MetricsLog,
    StepOutput,
    batch_size_of,
    parse_step_output,
    score_per_sample,
)
from afnio.trainer.progress import ProgressReporter, format_metrics, format_usage
from afnio.trainer.recorder import StepRecorder
from afnio.trainer.report import write_report

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)

_ON_ERROR = ("raise", "skip")
_VERDICTS = ("accepted", "rejected", "rolled_back")
_REDUCTIONS = ("sum", "mean")
_MODES = ("max", "min")


def _check_count(name: str, value: Any, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive int (or ``None`` when optional)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "None or a positive int" if optional else "a positive int"
        raise ValueError(f"Trainer: {name} must be {expected}, got {value!r}")


def _difference(after: Usage, before: Usage) -> Usage:
    subtrahend = before.as_dict()
    return Usage(**{key: value - subtrahend[key] for key, value in after.as_dict().items()})


def _snapshot(usage: Usage) -> Usage:
    return Usage(**usage.as_dict())


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _loader_info(loader: Any, epoch: int) -> dict[str, Any]:
    """What identifies a loader's order: its epoch, seed and sampler (for the checkpoint)."""
    sampler = getattr(loader, "sampler", None)
    return {
        "epoch": epoch,
        "seed": getattr(loader, "seed", None),
        "sampler": None if sampler is None else type(sampler).__name__,
        "initial_seed": getattr(sampler, "initial_seed", None),
        "num_batches": _length(loader),
    }


def _version_text(data: Any) -> str:
    """A parameter value as the text of a prompt version."""
    return data if isinstance(data, str) else json.dumps(json_safe(data), ensure_ascii=False)


def _loggers(logger: Any) -> list[Logger]:
    """The loggers ``Trainer(logger=...)`` asked for (``True``: the JSONL and CSV files)."""
    if logger is True:
        return [JSONLLogger(), CSVLogger()]
    if logger is False or logger is None:
        return []
    loggers = [logger] if isinstance(logger, Logger) else logger
    if not isinstance(loggers, (list, tuple)) or not all(isinstance(x, Logger) for x in loggers):
        raise TypeError(
            "Trainer: logger must be True, False, an afnio.trainer.Logger or a list of them, "
            f"got {type(logger).__name__}"
        )
    return list(loggers)


def _saved_proposals(state: Any, path: Path) -> dict[str, int]:
    """The epoch's proposal counts a checkpoint holds (none in older checkpoints).

    Raises:
        ValueError: Naming the file, when they are not counts.
    """
    saved = state.get("proposals", {}) if isinstance(state, dict) else {}
    if not isinstance(saved, dict) or any(
        isinstance(saved.get(name, 0), bool) or not isinstance(saved.get(name, 0), int)
        or saved.get(name, 0) < 0 for name in _VERDICTS
    ):
        raise ValueError(
            f"Trainer: checkpoint {str(path)!r} can't be resumed: 'proposals' must map "
            f"{list(_VERDICTS)} to counts, got {saved!r:.200}; nothing was changed"
        )
    return {name: int(saved.get(name, 0)) for name in _VERDICTS}


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(note)


class Trainer:
    """Runs the training loop of an afnio agent, like ``lightning.Trainer``.

    Args:
        max_epochs: Number of passes over the training data.
        enable_checkpointing: Write checkpoints (after each epoch, on early stops, on request).
        enable_progress_bar: Show the rich progress bar and summary lines.
        default_root_dir: Run directory for checkpoints and metrics (the working directory if
            ``None``).
        on_error: What to do when a step fails (after the model client's own retries):
            ``"raise"`` saves a checkpoint and re-raises; ``"skip"`` logs the failure with its
            batch index, records it in :attr:`errors` and goes on with the next batch. A spent
            budget (:class:`~afnio.models.errors.BudgetExceededError`) always stops the run,
            cleanly, with a checkpoint.
        score_reduction: How the evaluator reduced a batch to a scalar score: ``"sum"`` (divide
            by the batch size to get the per-sample metric) or ``"mean"``.
        monitor: The metric that picks ``best.ckpt`` (needs a validation loader by default).
        mode: ``"max"`` or ``"min"``: which direction of ``monitor`` is better.
        checkpoint_every_n_batches: Also update ``last.ckpt`` every this many training batches.
        callbacks: :class:`~afnio.trainer.callbacks.Callback` instances.
        logger: Where metrics, hyperparameters and prompt versions go: ``True`` (the default)
            writes ``metrics.jsonl`` and ``metrics.csv`` in the run directory (a
            :class:`~afnio.trainer.loggers.JSONLLogger` and a
            :class:`~afnio.trainer.loggers.CSVLogger`); ``False`` none; or one
            :class:`~afnio.trainer.loggers.Logger` or a list of them (e.g.
            :class:`~afnio.trainer.mlflow_logger.MLflowLogger`).
        enable_report: Record the run history (``history.jsonl``), the first training step's
            graph (``graph.svg``, ``graph.dot``) and write ``report.html`` when a fit ends
            (see :mod:`afnio.trainer.report`).
        log_every_n_steps: Send a ``stage="train_step"`` metrics row to the loggers every this
            many training steps (``None``: epoch rows only). The default file loggers skip
            these rows unless built with ``include_steps=True``.
        console: The rich console to print to (stdout by default).
        gate_steps: Wrap every optimizer in a :class:`~afnio.optim.GatedOptimizer`, so a step
            that lowers the training batch's score is rolled back.

    Attributes:
        current_epoch: The epoch being run (after a fit: ``max_epochs`` unless stopped early).
        batches_done: Training batches finished in the current epoch.
        global_step: Training batches finished over the whole fit.
        should_stop: Set it (e.g. from a callback) to stop at the next batch boundary.
        stop_reason: Why the last fit ended: ``"max_epochs"``, ``"should_stop"``,
            ``"budget"``, ``"error"`` or ``"interrupted"``.
        errors: Failed steps that were skipped or stopped the run: dicts with ``stage``,
            ``epoch``, ``batch_idx`` and ``error``.
        callback_metrics: The last epoch's log row.
        usage: What the fit spent so far (across resumes).
        best_score: The best ``monitor`` value seen.
        best_model_path: Path of ``best.ckpt`` (``None`` until one is written).
        last_checkpoint_path: The checkpoint written last.

    Example:
        >>> import tempfile, afnio
        >>> from afnio.autodiff.evaluator import ExactMatchEvaluator
        >>> from afnio.cognitive import Module, Parameter
        >>> from afnio.optim import TGD
        >>> from afnio.testing import ScriptedModel
        >>> from afnio.utils.data import DataLoader
        >>> class Agent(Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.prefix = Parameter("?", role="answer prefix")
        ...     def training_step(self, batch, batch_idx):
        ...         questions, answers = batch
        ...         return ExactMatchEvaluator.apply(self.prefix + questions, answers)
        ...     def configure_optimizers(self):
        ...         fix = ScriptedModel(["<IMPROVED_VARIABLE>A:</IMPROVED_VARIABLE>"])
        ...         return TGD(self.parameters(), model_client=fix)
        >>> data = [(afnio.Variable(q, role="question"), "A:" + q) for q in ("x", "y")]
        >>> run_dir = tempfile.mkdtemp()
        >>> trainer = Trainer(max_epochs=2, enable_progress_bar=False, default_root_dir=run_dir)
        >>> trainer.fit(Agent(), DataLoader(data, batch_size=2))
        >>> [row["train_score"] for row in trainer.metrics_log.rows]
        [0.0, 1.0]
        >>> trainer.fit(Agent(), DataLoader(data, batch_size=2),
        ...             ckpt_path=trainer.checkpoint_dir / "epoch=0.ckpt")  # resume
        >>> [row["train_score"] for row in trainer.metrics_log.rows]
        [0.0, 1.0]
    """

    def __init__(
        self,
        max_epochs: int = 1,
        enable_checkpointing: bool = True,
        enable_progress_bar: bool = True,
        default_root_dir: str | os.PathLike | None = None,
        on_error: str = "raise",
        score_reduction: str = "sum",
        monitor: str = "val_score",
        mode: str = "max",
        checkpoint_every_n_batches: int | None = None,
        callbacks: Sequence[Callback] | None = None,
        logger: bool | Logger | Sequence[Logger] | None = True,
        console: Console | None = None,
        enable_report: bool = True,
        log_every_n_steps: int | None = 1,
        gate_steps: bool = False,
    ) -> None:
        _check_count("max_epochs", max_epochs)
        for name, value, allowed in (
            ("on_error", on_error, _ON_ERROR),
            ("score_reduction", score_reduction, _REDUCTIONS),
            ("mode", mode, _MODES),
        ):
            if value not in allowed:
                raise ValueError(f"Trainer: {name} must be one of {allowed}, got {value!r}")
        _check_count("checkpoint_every_n_batches", checkpoint_every_n_batches, optional=True)
        _check_count("log_every_n_steps", log_every_n_steps, optional=True)
        loggers = _loggers(logger)
        callbacks = list(callbacks or [])
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(
                    "Trainer: callbacks must be afnio.trainer.Callback instances, got "
                    f"{type(callback).__name__}"
                )
        self.max_epochs = max_epochs
        self.enable_checkpointing = bool(enable_checkpointing)
        self.default_root_dir = Path(default_root_dir) if default_root_dir else Path.cwd()
        self.on_error = on_error
        self.score_reduction = score_reduction
        self.monitor = monitor
        self.mode = mode
        self.checkpoint_every_n_batches = checkpoint_every_n_batches
        self.gate_steps = bool(gate_steps)
        self.callbacks = callbacks
        self.progress = ProgressReporter(enable_progress_bar, console)
        self.enable_report = bool(enable_report)
        self.log_every_n_steps = log_every_n_steps
        self.loggers = loggers
        for each in self.loggers:
            each.setup(self.default_root_dir)
        self.metrics_log = MetricsLog(None, loggers=self.loggers)
        self.history = RunHistory(self.default_root_dir if self.enable_report else None)
        self.report_path: Path | None = None

        self.current_epoch = 0
        self.batches_done = 0
        self.global_step = 0
        self.should_stop = False
        self.stop_reason: str | None = None
        self.errors: list[dict[str, Any]] = []
        self.callback_metrics: dict[str, Any] = {}
        self.usage = Usage()
        self.best_score: float | None = None
        self.best_model_path: Path | None = None
        self.last_checkpoint_path: Path | None = None

        self._agent: Any = None
        self._optimizers: list[Any] = []
        self._train_loader: Any = None
        self._train_metrics = MetricAccumulator()
        self._skipped_in_epoch = 0
        self._proposals = dict.fromkeys(_VERDICTS, 0)  # this epoch's, from last_step
        self._tracker: Usage | None = None
        self._usage_before = Usage()  # spent in earlier sessions of this fit (resume)
        self._epoch_usage_before = Usage()  # spent in the current epoch in earlier sessions
        self._epoch_tracker_start = Usage()
        self._failed_at: str | None = None
        self._recorder: StepRecorder | None = None
        self._graph_pending = False
        self._committed: dict[str, Any] = {}  # the state at the last finished batch

    # ------------------------------------------------------------------ paths
    @property
    def checkpoint_dir(self) -> Path:
        """``default_root_dir/checkpoints``."""
        return self.default_root_dir / "checkpoints"

    # ------------------------------------------------------------------ public API
    def fit(
        self,
        agent: Any,
        train_dataloader: Iterable[Any],
        val_dataloader: Iterable[Any] | None = None,
        ckpt_path: str | os.PathLike | None = None,
    ) -> None:
        """Train ``agent`` for ``max_epochs`` epochs, validating after each one.

        Args:
            agent: The Module to train (see the module docstring for the hooks it needs).
            train_dataloader: Batches to train on; a loader with ``set_epoch`` (such as
                :class:`afnio.utils.data.DataLoader`) makes resuming replay the same order.
            val_dataloader: Batches for ``validation_step`` after each epoch.
            ckpt_path: A checkpoint to resume from.

        Raises:
            Exception: A failed step with ``on_error="raise"`` (after a checkpoint is saved;
                the exception carries a note with the batch index and checkpoint path).
            KeyboardInterrupt: Re-raised after a checkpoint is saved.
        """
        self._agent = agent
        self._train_loader = train_dataloader
        self._optimizers = self._attach_optimizers(agent)
        self.should_stop = False
        self.stop_reason = None
        self._failed_at = None
        self._reset_progress()
        if ckpt_path is not None:
            self._restore(read_checkpoint(ckpt_path), Path(ckpt_path))
        self._commit()
        self._start_run(agent, resumed=ckpt_path is not None)
        for callback in self.callbacks:
            callback.on_fit_start(self, agent)
        agent.train()
        try:
            with track_usage() as tracker:
                self._tracker = tracker
                self._epoch_tracker_start = _snapshot(tracker)
                while self.current_epoch < self.max_epochs and not self.should_stop:
                    finished = self._train_epoch(agent, train_dataloader)
                    if not finished:
                        break
                    self._end_epoch(agent, val_dataloader)
                self._sync_usage()
        except BudgetExceededError as error:
            self._sync_usage()
            self.progress.stop()
            self.stop_reason = "budget"
            path = self._checkpoint_after_stop("budget")
            where = self._stop_location()
            saved = (
                f"progress is saved in {str(path)!r}; raise the budget and resume with "
                f"fit(..., ckpt_path={str(path)!r})"
                if path is not None
                else "checkpointing is disabled, so only the agent in memory keeps the progress"
            )
            message = f"Training stopped: model budget spent ({error}) at {where}; {saved}."
            self._report(message)
        except BaseException as error:
            self._sync_usage()
            self.progress.stop()
            self.stop_reason = "interrupted" if isinstance(error, KeyboardInterrupt) else "error"
            path = self._checkpoint_after_stop(self.stop_reason)
            where = self._stop_location()
            saved = (
                f"checkpoint saved to {str(path)!r}; resume with fit(..., ckpt_path={str(path)!r})"
                if path is not None
                else "checkpointing is disabled"
            )
            _add_note(error, f"afnio Trainer: {saved}")
            self.progress.print(
                f"Training stopped by {type(error).__name__} at {where}: {error}; {saved}."
            )
            self._end_run("interrupted" if self.stop_reason == "interrupted" else "failed")
            raise
        finally:
            self._detach_tracker()
            self.progress.stop()
        if self.stop_reason is None:
            if self.should_stop and self.current_epoch < self.max_epochs:
                self.stop_reason = "should_stop"
                self._checkpoint_after_stop("should_stop")
            else:
                self.stop_reason = "max_epochs"
        for callback in self.callbacks:
            callback.on_fit_end(self, agent)
        self._end_run("interrupted" if self.stop_reason == "budget" else "success")

    def validate(self, agent: Any, dataloader: Iterable[Any]) -> dict[str, float]:
        """Run ``validation_step`` over ``dataloader`` under ``eval()`` and ``no_grad()``.

        Returns:
            ``{"val_score": ..., "val_<extra>": ...}`` averaged weighted by batch size.
        """
        return self._evaluate_standalone(agent, dataloader, "validation_step", "val", "validate")

    def test(self, agent: Any, dataloader: Iterable[Any]) -> dict[str, float]:
        """Run ``test_step`` over ``dataloader`` under ``eval()`` and ``no_grad()``.

        Returns:
            ``{"test_score": ..., "test_<extra>": ...}`` averaged weighted by batch size.
        """
        return self._evaluate_standalone(agent, dataloader, "test_step", "test", "test")

    def predict(self, agent: Any, dataloader: Iterable[Any]) -> list[Any]:
        """Run ``agent.predict_step(batch, batch_idx)`` (or ``agent(batch)``) on every batch.

        Runs under ``eval()`` and ``no_grad()``; a failing batch follows ``on_error`` (a
        skipped batch gives ``None``).

        Returns:
            One output per batch, in order.
        """
        step = getattr(agent, "predict_step", None)
        outputs: list[Any] = []
        with self._inference(agent, "Predict", dataloader), track_usage() as used:
            for batch_idx, batch in enumerate(dataloader):
                try:
                    outputs.append(step(batch, batch_idx) if step else agent(batch))
                except Exception as error:
                    self._step_failed(error, "predict", None, batch_idx)
                    outputs.append(None)
                self.progress.update(batch_idx + 1, {}, used)
        return outputs

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Save the current state of the fit (agent, optimizers, position, metrics) to ``path``.

        Raises:
            RuntimeError: Before :meth:`fit` has attached an agent.
        """
        if self._agent is None:
            raise RuntimeError("Trainer.save_checkpoint: no agent yet; call fit() first")
        return self._save("manual", path)

    # ------------------------------------------------------------------ run record
    def config(self) -> dict[str, Any]:
        """The run's configuration as the report and loggers show it (never an API key).

        Returns:
            ``{"trainer": {...}, "agent": class name, "optimizers": [{"class", "param_groups"}]}``
            where each param group lists its options and its parameters by name.
        """
        trainer = {
            "max_epochs": self.max_epochs,
            "score_reduction": self.score_reduction,
            "monitor": self.monitor,
            "mode": self.mode,
            "on_error": self.on_error,
            "enable_checkpointing": self.enable_checkpointing,
            "checkpoint_every_n_batches": self.checkpoint_every_n_batches,
            "log_every_n_steps": self.log_every_n_steps,
            "default_root_dir": str(self.default_root_dir),
            "callbacks": [type(callback).__name__ for callback in self.callbacks],
            "loggers": [type(logger).__name__ for logger in self.loggers],
        }
        names = {
            (p.optimizer, p.index): p.name
            for p in (self._recorder.parameters if self._recorder else [])
        }
        optimizers = []
        for number, optimizer in enumerate(self._optimizers):
            groups, index = [], 0
            for group in optimizer.param_groups:
                options = public_config({k: v for k, v in group.items() if k != "params"})
                params = []
                for _ in group["params"]:
                    params.append(names.get((number, index), f"params[{index}]"))
                    index += 1
                groups.append({"params": params, **options})
            optimizers.append({"class": type(optimizer).__name__, "param_groups": groups})
        agent = None if self._agent is None else type(self._agent).__name__
        return {"trainer": trainer, "agent": agent, "optimizers": optimizers}

    def _start_run(self, agent: Any, resumed: bool) -> None:
        """Write the ``fit_start`` record and tell the loggers (after any checkpoint restore)."""
        self._recorder = StepRecorder(agent, self._optimizers)
        self._graph_pending = self.enable_report and not (
            resumed and (self.default_root_dir / "graph.svg").is_file()
        )
        config = self.config()
        parameters = self._recorder.describe_parameters()
        self.history.append(
            {
                "type": "fit_start",
                "resumed": resumed,
                "epoch": self.current_epoch,
                "batches_done": self.batches_done,
                "step": self.global_step,
                "config": config,
                "parameters": parameters,
            }
        )
        for logger in self.loggers:
            logger.log_hyperparams(config)
            if not resumed:
                for parameter in self._recorder.parameters:
                    text = _version_text(parameter.variable.data)
                    logger.log_text(text, parameter.name, self.global_step)

    def _end_run(self, status: str) -> None:
        """Write the ``fit_end`` record and the report; hand the report to the loggers."""
        self.history.append(
            {
                "type": "fit_end",
                "status": status,
                "stop_reason": self.stop_reason,
                "epoch": self.current_epoch,
                "step": self.global_step,
                "usage": self.usage.as_dict(),
            }
        )
        if self.enable_report and status != "failed":
            self.report_path = write_report(self.default_root_dir)
            for logger in self.loggers:
                logger.log_artifact(self.report_path)
        for logger in self.loggers:
            logger.finalize(status)

    def _capture_graph(self, explanation: Any) -> None:
        """Draw the first training step's loss graph into ``graph.svg`` / ``graph.dot``."""
        if not self._graph_pending or explanation is None:
            return
        self._graph_pending = False
        from afnio.utils.viz import to_dot, to_svg

        self.default_root_dir.mkdir(parents=True, exist_ok=True)
        (self.default_root_dir / "graph.svg").write_text(to_svg(explanation), encoding="utf-8")
        (self.default_root_dir / "graph.dot").write_text(to_dot(explanation), encoding="utf-8")

    def _record_step(
        self,
        batch_idx: int,
        metrics: dict[str, float],
        batch_size: int | None,
        params: list[dict[str, Any]],
        usage: dict[str, Any],
        error: BaseException | None,
    ) -> None:
        """Append the ``step`` record; send step metrics and new prompt versions to loggers."""
        step = self.global_step + 1  # the global_step once this batch counts as done
        self.history.append(
            {
                "type": "step",
                "epoch": self.current_epoch,
                "batch_idx": batch_idx,
                "step": step,
                "batch_size": batch_size,
                "metrics": metrics,
                "usage": usage,
                "params": params,
                "error": None if error is None else f"{type(error).__name__}: {error}",
            }
        )
        for logger in self.loggers:
            for entry in params:
                if entry["before"] != entry["after"]:
                    logger.log_text(_version_text(entry["after"]), entry["name"], step)
        every = self.log_every_n_steps
        if every and step % every == 0 and self.loggers:
            row: dict[str, Any] = {
                "stage": STEP_STAGE,
                "epoch": self.current_epoch,
                "batch_idx": batch_idx,
                "step": step,
            }
            row.update({f"train_{name}_step": value for name, value in metrics.items()})
            total = usage["total"]
            row.update(
                {
                    "requests_step": total["requests"],
                    "total_tokens_step": total["prompt_tokens"] + total["completion_tokens"],
                    "cost_usd_step": total["cost_usd"],
                }
            )
            for logger in self.loggers:
                logger.log_metrics(row, step)

    # ------------------------------------------------------------------ fit internals
    def _attach_optimizers(self, agent: Any) -> list[Any]:
        configured = agent.configure_optimizers()
        if configured is None:
            optimizers: list[Any] = []
        elif isinstance(configured, (list, tuple)):
            optimizers = list(configured)
        else:
            optimizers = [configured]
        if self.gate_steps:
            optimizers = [
                o if isinstance(o, GatedOptimizer) else GatedOptimizer(o) for o in optimizers
            ]
        for index, optimizer in enumerate(optimizers):
            for method in ("zero_grad", "step", "state_dict", "load_state_dict"):
                if not callable(getattr(optimizer, method, None)):
                    raise TypeError(
                        f"Trainer: configure_optimizers() returned {type(optimizer).__name__} at "
                        f"position {index}, which has no {method}(); return an afnio.optim "
                        "Optimizer or a list of them"
                    )
        if agent.automatic_optimization and not optimizers:
            raise ValueError(
                "Trainer: configure_optimizers() returned no optimizer; automatic optimization "
                "needs one (or set automatic_optimization = False on the agent)"
            )
        object.__setattr__(agent, "_optimizers", optimizers)
        return optimizers

    def _reset_progress(self) -> None:
        self.current_epoch = 0
        self.batches_done = 0
        self.global_step = 0
        self.errors = []
        self.callback_metrics = {}
        self.best_score = None
        self.best_model_path = None
        self.usage = Usage()
        self._usage_before = Usage()
        self._epoch_usage_before = Usage()
        self._train_metrics = MetricAccumulator()
        self._skipped_in_epoch = 0
        self._proposals = dict.fromkeys(_VERDICTS, 0)
        self.metrics_log.replace([])

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        """Check the whole checkpoint, then load it; a bad one leaves everything untouched."""
        point = check_checkpoint(
            state, path, max_epochs=self.max_epochs, optimizers=len(self._optimizers),
            num_batches=_length(self._train_loader),
        )
        metrics = MetricAccumulator()
        metrics.load_state_dict(point.train_metrics)
        usage_total, usage_epoch = Usage(**point.usage_total), Usage(**point.usage_epoch)
        updates = [self._prepared_load(self._agent, point.agent, "the agent", path)]
        updates += [
            self._prepared_load(optimizer, saved, f"optimizer {index}", path)
            for index, (optimizer, saved) in enumerate(zip(self._optimizers, point.optimizers))
        ]
        proposals = _saved_proposals(state, path)
        # Everything is checked: from here on nothing can fail half-way (afnio modules and
        # optimizers; another agent or optimizer class loads with its own load_state_dict).
        for update in updates:
            update()
        self._apply_resume_point(point, metrics, usage_total, usage_epoch)
        self._proposals = proposals
        self._check_loader(point.loader, path)

    @staticmethod
    def _prepared_load(
        target: Any, saved: Any, what: str, path: Path
    ) -> Callable[[], Any]:
        """``target``'s checked load of ``saved`` (keeping its live clients), not yet applied."""
        prepare = getattr(target, "_prepare_load_state_dict", None)
        if not callable(prepare):
            return lambda: target.load_state_dict(saved)
        try:
            prepared = prepare(saved)
        except (RuntimeError, TypeError, ValueError, KeyError) as error:
            raise ValueError(
                f"Trainer: checkpoint {str(path)!r} can't be resumed: its state of {what} doesn't "
                f"load ({type(error).__name__}: {error}); nothing was changed"
            ) from None
        if isinstance(prepared, tuple):  # Module: (IncompatibleKeys, updates)
            _keys, actions = prepared
            return lambda: [action() for action in actions]
        return prepared

    def _apply_resume_point(
        self, point: ResumePoint, metrics: MetricAccumulator, usage_total: Usage,
        usage_epoch: Usage,
    ) -> None:
        self.current_epoch = point.epoch
        self.batches_done = point.batches_done
        self.global_step = point.global_step
        self._train_metrics = metrics
        self._skipped_in_epoch = point.skipped_in_epoch
        self.errors = point.errors
        self.callback_metrics = point.metrics
        self._usage_before = usage_total
        self._epoch_usage_before = usage_epoch
        self.usage = _snapshot(self._usage_before)
        best = point.best
        if best.get("monitor") == self.monitor and best.get("mode") == self.mode:
            self.best_score = best.get("score")
            best_path = best.get("path")
            self.best_model_path = Path(best_path) if best_path else None
        self.metrics_log.replace(point.history)

    def _commit(self) -> None:
        """Record the state at a batch boundary: what a checkpoint written on a stop holds."""
        if self._agent is None:
            return
        self._committed = {
            "epoch": self.current_epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "agent": self._agent.state_dict(),
            "optimizers": [optimizer.state_dict() for optimizer in self._optimizers],
            "train_metrics": self._train_metrics.state_dict(),
            "skipped_in_epoch": self._skipped_in_epoch,
            "proposals": dict(self._proposals),
        }

    def _check_loader(self, saved: dict[str, Any], path: Path) -> None:
        current = _loader_info(self._train_loader, self.current_epoch)
        for key in ("initial_seed", "sampler", "num_batches"):
            if saved.get(key) != current[key]:
                message = (
                    f"Trainer: resuming from {str(path)!r} with a training loader whose {key} is "
                    f"{current[key]!r} but was {saved.get(key)!r} when the checkpoint was saved; "
                    "the batch order will differ from the interrupted run (give the DataLoader "
                    "the same seed to resume exactly)"
                )
                self._report(message)

    def _stop_location(self) -> str:
        """Where a run stopped: the failed step, else the position in the epoch."""
        return self._failed_at or (
            f"epoch {self.current_epoch}, after {self.batches_done} finished batches"
        )

    def _current_usage(self) -> Usage:
        if self._tracker is None:
            return _snapshot(self.usage)
        return self._usage_before + _snapshot(self._tracker)

    def _report(self, message: str) -> None:
        """Tell the user: on the console when the progress bar is on, else as a log warning."""
        if self.progress.enabled:
            logger.info(message)
            self.progress.print(message)
        else:
            logger.warning(message)

    def _detach_tracker(self) -> None:
        """Fold what the fit's usage tracker counted into the saved totals, then drop it."""
        if self._tracker is None:
            return
        self._sync_usage()
        self._epoch_usage_before = self._epoch_usage()
        self._usage_before = _snapshot(self.usage)
        self._tracker = None

    def _sync_usage(self) -> None:
        self.usage = self._current_usage()

    def _epoch_usage(self) -> Usage:
        if self._tracker is None:
            return _snapshot(self._epoch_usage_before)
        return self._epoch_usage_before + _difference(self._tracker, self._epoch_tracker_start)

    def _train_epoch(self, agent: Any, loader: Any) -> bool:
        """Run (the rest of) the current epoch; False if ``should_stop`` cut it short."""
        epoch = self.current_epoch
        if callable(getattr(loader, "set_epoch", None)):
            loader.set_epoch(epoch)
        for callback in self.callbacks:
            callback.on_train_epoch_start(self, agent)
        skip = self.batches_done
        self.progress.start(f"Epoch {epoch}/{self.max_epochs - 1}", _length(loader), skip)
        for batch_idx, batch in enumerate(loader):
            if batch_idx < skip:
                continue
            outputs = self._training_batch(agent, batch, batch_idx)
            self.batches_done = batch_idx + 1
            self.global_step += 1
            self._commit()  # the batch's update and the counter, together
            self._sync_usage()
            self.progress.update(
                self.batches_done, self._train_metrics.means("train_"), self.usage,
                self._proposal_counts() if any(self._proposals.values()) else None,
            )
            for callback in self.callbacks:
                callback.on_train_batch_end(self, agent, outputs, batch, batch_idx)
            every = self.checkpoint_every_n_batches
            if every and self.global_step % every == 0 and self.enable_checkpointing:
                self._save_last("batch")
            if self.should_stop:
                self.progress.stop()
                return False
        self.progress.stop()
        return True

    def _training_batch(self, agent: Any, batch: Any, batch_idx: int) -> Any:
        recorder = self._recorder or StepRecorder(agent, self._optimizers)
        recorder.begin_step(self._current_usage())
        manual = not agent.automatic_optimization
        try:
            if agent.automatic_optimization:
                for optimizer in self._optimizers:
                    optimizer.zero_grad()
                outputs = agent.training_step(batch, batch_idx)
                parsed = parse_step_output(outputs, "training_step")
                self._capture_graph(parsed.explanation)
                if any(getattr(o, "uses_gradients", True) for o in self._optimizers):
                    parsed.explanation.backward()
                recorder.before_update()
                closure = None
                for optimizer in self._optimizers:
                    if getattr(optimizer, "needs_closure", False):
                        if closure is None:
                            closure = self._step_closure(agent, batch, batch_idx, parsed)
                        optimizer.step(closure)
                    else:
                        optimizer.step()
                self._count_proposals()
            else:
                recorder.before_update()
                outputs = agent.training_step(batch, batch_idx)
                parsed = parse_step_output(outputs, "training_step", allow_none=True)
                self._capture_graph(parsed.explanation)
        except Exception as error:
            usage = recorder.stop_usage(self._current_usage())
            params = recorder.after_update(feedback_now=manual)
            self._record_step(batch_idx, {}, None, params, usage, error)
            self._step_failed(error, "train", self.current_epoch, batch_idx)
            self._skipped_in_epoch += 1
            return None
        params = recorder.after_update(feedback_now=manual)
        values, size = self._accumulate(self._train_metrics, parsed, batch, "training_step")
        usage = recorder.stop_usage(self._current_usage())
        self._record_step(batch_idx, values, size, params, usage, None)
        return outputs

    def _step_closure(
        self, agent: Any, batch: Any, batch_idx: int, parsed: StepOutput
    ) -> ModuleScorer:
        """The closure of a scoring optimizer: ``training_step`` again on this batch, starting
        from the score the training step just gave (so the score before costs nothing)."""
        size = batch_size_of(batch, parsed.explanation)
        baseline = (
            None if parsed.score is None
            else score_per_sample(parsed.score, size, self.score_reduction, "training_step")
        )
        return ModuleScorer(
            agent, batch, batch_idx=batch_idx, score_reduction=self.score_reduction,
            baseline=baseline,
        )

    def _count_proposals(self) -> None:
        """Add the verdicts of the step every optimizer just took to the epoch's counts."""
        for optimizer in self._optimizers:
            for record in getattr(optimizer, "last_step", None) or []:
                verdict = record.get("verdict") if isinstance(record, dict) else None
                if verdict in self._proposals:
                    self._proposals[verdict] += 1

    def _proposal_counts(self) -> dict[str, int]:
        counts = self._proposals
        return {
            "accepted": counts["accepted"],
            "rejected": counts["rejected"] + counts["rolled_back"],
            "rolled_back": counts["rolled_back"],
        }

    def _accumulate(
        self, accumulator: MetricAccumulator, parsed: StepOutput, batch: Any, hook: str
    ) -> tuple[dict[str, float], int]:
        """Add a step's score (per sample) and extra metrics, weighted by the batch size.

        Returns:
            The step's values and its batch size.
        """
        values = dict(parsed.extras)
        size = batch_size_of(batch, parsed.explanation)
        if parsed.score is not None:
            values["score"] = score_per_sample(parsed.score, size, self.score_reduction, hook)
        accumulator.add(values, size)
        return values, size

    def _step_failed(self, error: Exception, stage: str, epoch: int | None, batch_idx: int) -> None:
        """Record a failed step; re-raise it unless ``on_error="skip"`` (budget: always)."""
        where = f"batch {batch_idx}" if epoch is None else f"epoch {epoch}, batch {batch_idx}"
        error_text = f"{type(error).__name__}: {error}"
        self.errors.append(
            {"stage": stage, "epoch": epoch, "batch_idx": batch_idx, "error": error_text}
        )
        if isinstance(error, BudgetExceededError) or self.on_error == "raise":
            self._failed_at = f"{stage} step of {where}"
            _add_note(error, f"afnio Trainer: {stage} step failed at {where}")
            raise error
        self._report(f"{stage} step failed at {where}: {error_text} (skipped: on_error='skip')")

    def _end_epoch(self, agent: Any, val_dataloader: Any) -> None:
        epoch = self.current_epoch
        row: dict[str, Any] = {"stage": "fit", "epoch": epoch, "step": self.global_step}
        row.update(self._train_metrics.means("train_"))
        recorder = self._recorder or StepRecorder(agent, self._optimizers)
        recorder.start_usage(self._current_usage())
        if val_dataloader is not None:
            metrics = self._evaluate(
                agent, val_dataloader, "validation_step", "val", epoch, self._current_usage
            )
            row.update(metrics)
            for callback in self.callbacks:
                callback.on_validation_end(self, agent, metrics)
        self._sync_usage()
        row.update(self._epoch_usage().as_dict())
        row["cost_usd"] = round(row["cost_usd"], 10)  # drop float noise from summed prices
        row["total_tokens"] = self.usage.total_tokens
        row["total_cost_usd"] = round(self.usage.cost_usd, 10)
        row["skipped_batches"] = self._skipped_in_epoch
        row.update(self._proposal_counts())
        self.callback_metrics = row
        val_usage = recorder.stop_usage(self._current_usage())
        self.history.append(
            {
                "type": "epoch",
                "epoch": epoch,
                "step": self.global_step,
                "row": row,
                "val_usage_by_model": val_usage["by_model"],
            }
        )
        self.metrics_log.append(row, self.global_step)
        self.progress.print(
            f"Epoch {epoch}/{self.max_epochs - 1}: "
            f"{format_metrics({k: v for k, v in row.items() if _is_metric(k, v)})} · "
            f"proposals accepted {row['accepted']}, rejected {row['rejected']} · "
            f"epoch {format_usage(self._epoch_usage())} · total {format_usage(self.usage)}"
        )
        for callback in self.callbacks:
            callback.on_train_epoch_end(self, agent, row)

        improved = self._improved(row.get(self.monitor))
        if improved:
            self.best_score = float(row[self.monitor])
        self.current_epoch = epoch + 1
        self.batches_done = 0
        self._skipped_in_epoch = 0
        self._proposals = dict.fromkeys(_VERDICTS, 0)
        self._train_metrics = MetricAccumulator()
        self._epoch_usage_before = Usage()
        if self._tracker is not None:
            self._epoch_tracker_start = _snapshot(self._tracker)
        self._commit()
        if self.enable_checkpointing:
            copies = [self.checkpoint_dir / "last.ckpt"]
            if improved:
                self.best_model_path = self.checkpoint_dir / "best.ckpt"
                copies.append(self.best_model_path)
            state = self._checkpoint_state("epoch")
            write_checkpoint(state, self.checkpoint_dir / f"epoch={epoch}.ckpt", *copies)
            self.last_checkpoint_path = copies[0]

    def _improved(self, value: Any) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        if self.best_score is None:
            return True
        return value > self.best_score if self.mode == "max" else value < self.best_score

    def _save(self, reason: str, path: str | os.PathLike) -> Path:
        self._sync_usage()
        self.last_checkpoint_path = write_checkpoint(self._checkpoint_state(reason), path)
        return self.last_checkpoint_path

    def _save_last(self, reason: str) -> Path:
        return self._save(reason, self.checkpoint_dir / "last.ckpt")

    def _checkpoint_after_stop(self, reason: str) -> Path | None:
        if not self.enable_checkpointing or self._agent is None:
            return None
        return self._save_last(reason)

    def _checkpoint_state(self, reason: str) -> dict[str, Any]:
        # The loop position, agent, optimizers and running metrics as committed at the last
        # finished batch: a stop mid-batch (even between an optimizer's write and the batch
        # counter) resumes by redoing that batch from the state before it.
        committed = self._committed or {}
        if not committed:
            self._commit()
            committed = self._committed
        return {
            "reason": reason,
            **committed,
            "max_epochs": self.max_epochs,
            "metrics": dict(self.callback_metrics),
            "history": [dict(row) for row in self.metrics_log.rows],
            "errors": [dict(error) for error in self.errors],
            "usage": {"total": self.usage.as_dict(), "epoch": self._epoch_usage().as_dict()},
            "best": {
                "monitor": self.monitor,
                "mode": self.mode,
                "score": self.best_score,
                "path": None if self.best_model_path is None else str(self.best_model_path),
            },
            "loader": _loader_info(self._train_loader, committed["epoch"]),
        }

    # ------------------------------------------------------------------ evaluation
    def _evaluate(
        self,
        agent: Any,
        loader: Any,
        hook: str,
        prefix: str,
        epoch: int | None,
        usage: Callable[[], Usage],
    ) -> dict[str, float]:
        step = getattr(agent, hook)
        if epoch is not None and callable(getattr(loader, "set_epoch", None)):
            loader.set_epoch(epoch)
        accumulator = MetricAccumulator()
        title = {"val": "Validation", "test": "Test"}[prefix]
        with self._inference(agent, title, loader):
            for batch_idx, batch in enumerate(loader):
                try:
                    parsed = parse_step_output(step(batch, batch_idx), hook)
                except Exception as error:
                    self._step_failed(error, prefix, epoch, batch_idx)
                    continue
                self._accumulate(accumulator, parsed, batch, hook)
                self.progress.update(batch_idx + 1, accumulator.means(prefix + "_"), usage())
        return accumulator.means(prefix + "_")

    @contextmanager
    def _inference(self, agent: Any, title: str, loader: Any) -> Iterator[None]:
        """Run the block under ``eval()`` and ``no_grad()`` with a progress bar titled ``title``.

        Afterwards the bar is closed and the agent is back in the mode it was in.
        """
        was_training = bool(getattr(agent, "training", True))
        agent.eval()
        self.progress.start(title, _length(loader))
        try:
            with no_grad():
                yield
        finally:
            self.progress.stop()
            agent.train() if was_training else agent.eval()

    def _evaluate_standalone(
        self, agent: Any, loader: Any, hook: str, prefix: str, stage: str
    ) -> dict[str, float]:
        recorder = StepRecorder(agent, [])
        with track_usage() as used:
            recorder.start_usage(_snapshot(used))
            metrics = self._evaluate(agent, loader, hook, prefix, None, lambda: _snapshot(used))
            usage = recorder.stop_usage(_snapshot(used))
        row: dict[str, Any] = {"stage": stage, **metrics, **used.as_dict()}
        row["cost_usd"] = round(row["cost_usd"], 10)
        self.history.append(
            {
                "type": "eval",
                "stage": stage,
                "step": self.global_step,
                "metrics": metrics,
                "usage": usage,
            }
        )
        self.metrics_log.append(row, self.global_step)
        self.progress.print(
            f"{stage.capitalize()}: {format_metrics(metrics)} · {format_usage(used)}"
        )
        return metrics


def _is_metric(key: str, value: Any) -> bool:
    return key.startswith(("train_", "val_")) and isinstance(value, float)

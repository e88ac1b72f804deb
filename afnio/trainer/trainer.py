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
Model clients are not taken from the checkpoint: the agent and optimizers keep the clients they
were built with in this session (with their budget, cache, limits and keys), so a run stopped by
a spent budget resumes with the client whose budget was raised.
"""

from __future__ import annotations

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
from afnio.models.model import ChatCompletionModel
from afnio.models.usage import Usage, track_usage
from afnio.optim.gated import GatedOptimizer
from afnio.optim.scoring import ModuleScorer
from afnio.trainer.callbacks import Callback
from afnio.trainer.checkpoint import read_checkpoint, write_checkpoint
from afnio.trainer.metrics import (
    MetricAccumulator,
    MetricsLog,
    StepOutput,
    batch_size_of,
    parse_step_output,
    score_per_sample,
)
from afnio.trainer.progress import ProgressReporter, format_metrics, format_usage

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


def _agent_clients(agent: Any) -> list[tuple[Any, str, ChatCompletionModel]]:
    """``(owning module, attribute, client)`` for every model client the agent holds."""
    named_models = getattr(agent, "named_models", None)
    if not callable(named_models):
        return []
    modules = dict(agent.named_modules(remove_duplicate=False))
    clients = []
    for name, client in named_models(remove_duplicate=False):
        owner, _, attribute = name.rpartition(".")
        clients.append((modules[owner], attribute, client))
    return clients


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
        logger: Write ``metrics.jsonl`` and ``metrics.csv``.
        gate_steps: Wrap every optimizer in a :class:`~afnio.optim.GatedOptimizer`, so a step
            that lowers the training batch's score is rolled back.
        console: The rich console to print to (stdout by default).

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
        logger: bool = True,
        gate_steps: bool = False,
        console: Console | None = None,
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
        self.metrics_log = MetricsLog(self.default_root_dir if logger else None)

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
        saved_optimizers = state["optimizers"]
        if len(saved_optimizers) != len(self._optimizers):
            raise ValueError(
                f"Trainer: checkpoint {str(path)!r} holds {len(saved_optimizers)} optimizer "
                f"states but configure_optimizers() returned {len(self._optimizers)}"
            )
        live_clients = _agent_clients(self._agent)
        self._agent.load_state_dict(state["agent"])
        for owner, attribute, client in live_clients:
            if getattr(owner, attribute) is not client:
                setattr(owner, attribute, client)
        for optimizer, saved in zip(self._optimizers, saved_optimizers):
            live_options = [
                (index, key, value)
                for index, group in enumerate(optimizer.param_groups)
                for key, value in group.items()
                if isinstance(value, ChatCompletionModel)
            ]
            optimizer.load_state_dict(saved)
            for index, key, value in live_options:
                optimizer.param_groups[index][key] = value
        self.current_epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self.global_step = int(state["global_step"])
        self._train_metrics.load_state_dict(state["train_metrics"])
        self._skipped_in_epoch = int(state.get("skipped_in_epoch", 0))
        saved_counts = state.get("proposals", {})
        self._proposals = {name: int(saved_counts.get(name, 0)) for name in _VERDICTS}
        self.errors = [dict(error) for error in state.get("errors", [])]
        self.callback_metrics = dict(state.get("metrics", {}))
        usage = state.get("usage", {})
        self._usage_before = Usage(**usage.get("total", {}))
        self._epoch_usage_before = Usage(**usage.get("epoch", {}))
        self.usage = _snapshot(self._usage_before)
        best = state.get("best") or {}
        if best.get("monitor") == self.monitor and best.get("mode") == self.mode:
            self.best_score = best.get("score")
            best_path = best.get("path")
            self.best_model_path = Path(best_path) if best_path else None
        self.metrics_log.replace(state.get("history", []))
        self._check_loader(state.get("loader") or {}, path)

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
        try:
            if agent.automatic_optimization:
                for optimizer in self._optimizers:
                    optimizer.zero_grad()
                outputs = agent.training_step(batch, batch_idx)
                parsed = parse_step_output(outputs, "training_step")
                if any(getattr(o, "uses_gradients", True) for o in self._optimizers):
                    parsed.explanation.backward()
                closure = None
                for optimizer in self._optimizers:
                    if getattr(optimizer, "needs_closure", False):
                        if closure is None:
                            closure = self._step_closure(agent, batch, batch_idx, parsed)
                        optimizer.step(closure)
                    else:
                        optimizer.step()
                    self._count_proposals(optimizer)
            else:
                outputs = agent.training_step(batch, batch_idx)
                parsed = parse_step_output(outputs, "training_step", allow_none=True)
        except Exception as error:
            self._step_failed(error, "train", self.current_epoch, batch_idx)
            self._skipped_in_epoch += 1
            return None
        self._accumulate(self._train_metrics, parsed, batch, "training_step")
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

    def _count_proposals(self, optimizer: Any) -> None:
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
    ) -> None:
        """Add a step's score (per sample) and extra metrics, weighted by the batch size."""
        values = dict(parsed.extras)
        size = batch_size_of(batch, parsed.explanation)
        if parsed.score is not None:
            values["score"] = score_per_sample(parsed.score, size, self.score_reduction, hook)
        accumulator.add(values, size)

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
        self.metrics_log.append(row)
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
        return {
            "reason": reason,
            "epoch": self.current_epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "max_epochs": self.max_epochs,
            "agent": self._agent.state_dict(),
            "optimizers": [optimizer.state_dict() for optimizer in self._optimizers],
            "train_metrics": self._train_metrics.state_dict(),
            "skipped_in_epoch": self._skipped_in_epoch,
            "proposals": dict(self._proposals),
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
            "loader": _loader_info(self._train_loader, self.current_epoch),
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
        with track_usage() as used:
            metrics = self._evaluate(agent, loader, hook, prefix, None, lambda: _snapshot(used))
        row: dict[str, Any] = {"stage": stage, **metrics, **used.as_dict()}
        row["cost_usd"] = round(row["cost_usd"], 10)
        self.metrics_log.append(row)
        self.progress.print(
            f"{stage.capitalize()}: {format_metrics(metrics)} · {format_usage(used)}"
        )
        return metrics


def _is_metric(key: str, value: Any) -> bool:
    return key.startswith(("train_", "val_")) and isinstance(value, float)

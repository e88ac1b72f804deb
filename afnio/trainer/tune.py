"""Run afnio Trainer jobs under Ray Tune: sweep optimizers, momentum, seeds and batch sizes.

Write a *build* function that turns a Tune config into a :class:`TuneJob` (the agent, its
loaders and the Trainer's options), wrap it with :func:`trainable` and give that to
``ray.tune.Tuner``. Each trial runs ``Trainer.fit`` in its own trial directory; after every
epoch it reports the epoch's row (``val_score``, ``train_score``, usage and cost, every number
the Trainer logs) to Tune together with that epoch's Trainer checkpoint, so schedulers can stop
weak trials early, and a trial Tune restarts (``FailureConfig(max_failures=...)``,
``Tuner.restore``) resumes exactly from its last reported epoch. :func:`best_trial` then finds
the best epoch of the best trial and gives back its config, metrics and agent state — the
optimized prompts — to load into a fresh agent.

Ray is imported only when a trial runs (``pip install "afnio[ray]"``). ``examples/tune_sweep.py``
runs a whole sweep offline with scripted models.

Example (needs Ray, so not run here)::

    from ray import tune
    from afnio.trainer.tune import TuneJob, best_trial, trainable

    def build(config):
        agent = Router(optimizer=config["optimizer"], momentum=config["momentum"])
        train = DataLoader(train_set, batch_size=config["batch_size"], shuffle=True,
                           seed=config["seed"])
        return TuneJob(agent, train, DataLoader(val_set, batch_size=8),
                       trainer_args={"max_epochs": 3})

    results = tune.Tuner(trainable(build), param_space={
        "optimizer": tune.grid_search(["tgd", "tgd-examples"]),
        "momentum": tune.grid_search([0, 2]),
        "seed": 0, "batch_size": 4,
    }).fit()
    best = best_trial(results, metric="val_score", mode="max")
    agent = build(best.config).agent
    agent.load_state_dict(best.agent_state)
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afnio.trainer.callbacks import Callback
from afnio.trainer.checkpoint import read_checkpoint
from afnio.trainer.trainer import Trainer
from afnio.utils.ray import require_ray

__all__ = [
    "CHECKPOINT_FILE",
    "BestTrial",
    "TuneJob",
    "best_trial",
    "run_trial",
    "trainable",
]

CHECKPOINT_FILE = "afnio.ckpt"
"""The Trainer checkpoint's name inside every checkpoint directory reported to Tune."""

_RESUME_FILE = "tune_resume.ckpt"
_TRIAL_OWNED = ("default_root_dir",)

Report = Callable[[dict[str, Any], str], None]
"""``report(metrics, checkpoint_dir)``: hands one epoch's metrics and checkpoint to Tune."""


@dataclass
class TuneJob:
    """What one trial trains: built from the trial's config by your build function.

    Attributes:
        agent: The agent (its ``configure_optimizers`` picks the optimizer the config asks for).
        train_dataloader: The training batches (seeded, so a resumed trial replays them).
        val_dataloader: The validation batches (their ``val_score`` is what sweeps compare).
        trainer_args: Keyword arguments of :class:`~afnio.trainer.Trainer` (``max_epochs``,
            ``score_reduction``, ``callbacks``, ...). The trial sets ``default_root_dir`` (its
            trial directory) and keeps checkpointing on; the progress bar is off unless asked.

    Example:
        >>> TuneJob(agent=None, train_dataloader=[], trainer_args={"max_epochs": 2}).trainer_args
        {'max_epochs': 2}
    """

    agent: Any
    train_dataloader: Iterable[Any]
    val_dataloader: Iterable[Any] | None = None
    trainer_args: Mapping[str, Any] = field(default_factory=dict)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _EpochReporter(Callback):
    """Reports each finished epoch's row and checkpoint once, after the checkpoint is written.

    The Trainer writes an epoch's checkpoint after ``on_train_epoch_end``, so an epoch is
    reported when the next one starts, or when the fit ends. Epochs finished before a resume
    were reported by the earlier attempt and are not reported again.
    """

    def __init__(self, report: Report) -> None:
        self._report = report
        self._first_epoch = 0
        self._reported: set[int] = set()

    def on_fit_start(self, trainer: Any, agent: Any) -> None:
        self._first_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: Any, agent: Any) -> None:
        self._report_finished(trainer)

    def on_fit_end(self, trainer: Any, agent: Any) -> None:
        self._report_finished(trainer)

    def _report_finished(self, trainer: Any) -> None:
        row = trainer.callback_metrics
        epoch = row.get("epoch")
        if row.get("stage") != "fit" or not isinstance(epoch, int):
            return
        if epoch < self._first_epoch or epoch in self._reported:
            return
        self._reported.add(epoch)
        metrics = {key: value for key, value in row.items() if _number(value)}
        saved = trainer.checkpoint_dir / f"epoch={epoch}.ckpt"
        with tempfile.TemporaryDirectory(prefix="afnio-tune-") as directory:
            shutil.copyfile(saved, os.path.join(directory, CHECKPOINT_FILE))
            self._report(metrics, directory)


def run_trial(
    build: Callable[[dict[str, Any]], TuneJob],
    config: Mapping[str, Any],
    *,
    run_dir: str | os.PathLike,
    report: Report,
    resume_from: str | os.PathLike | None = None,
) -> Trainer:
    """Run one trial: build its job, fit it, report every finished epoch.

    This is what :func:`trainable` runs inside Tune, with Tune's ``report``; call it yourself
    to try a build function without Ray.

    Args:
        build: ``build(config) -> TuneJob``.
        config: The trial's hyperparameters.
        run_dir: The Trainer's ``default_root_dir``.
        report: ``report(metrics, checkpoint_dir)``, called once per finished epoch with the
            epoch's numeric metrics and a directory holding its checkpoint as
            :data:`CHECKPOINT_FILE` (the directory is deleted once ``report`` returns).
        resume_from: A Trainer checkpoint to resume from.

    Returns:
        The Trainer, after its fit.

    Raises:
        TypeError: If ``build`` returns something other than a :class:`TuneJob`.
        ValueError: If ``trainer_args`` sets ``default_root_dir`` or turns checkpointing off.

    Example:
        >>> import tempfile, afnio
        >>> from afnio.autodiff.evaluator import ExactMatchEvaluator
        >>> from afnio.cognitive import Module, Parameter
        >>> from afnio.optim import TGD
        >>> from afnio.testing import ScriptedModel
        >>> class Agent(Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.prefix = Parameter("?", role="answer prefix")
        ...     def training_step(self, batch, batch_idx):
        ...         return ExactMatchEvaluator.apply(self.prefix + batch[0], batch[1])
        ...     validation_step = training_step
        ...     def configure_optimizers(self):
        ...         fix = ScriptedModel(["<IMPROVED_VARIABLE>A:</IMPROVED_VARIABLE>"])
        ...         return TGD(self.parameters(), model_client=fix)
        >>> data = [(afnio.Variable("x", role="question"), "A:x")]
        >>> def build(config):
        ...     return TuneJob(Agent(), data, data, {"max_epochs": config["epochs"],
        ...                                          "logger": False, "enable_report": False})
        >>> reports = []
        >>> trainer = run_trial(build, {"epochs": 2}, run_dir=tempfile.mkdtemp(),
        ...                     report=lambda metrics, directory: reports.append(metrics))
        >>> [(m["epoch"], m["val_score"]) for m in reports]
        [(0, 1.0), (1, 1.0)]
    """
    job = build(dict(config))
    if not isinstance(job, TuneJob):
        raise TypeError(
            f"afnio.trainer.tune: the build function must return a TuneJob, got "
            f"{type(job).__name__}"
        )
    args = dict(job.trainer_args)
    owned = sorted(set(args) & set(_TRIAL_OWNED))
    if owned:
        raise ValueError(
            f"afnio.trainer.tune: trainer_args may not set {', '.join(owned)}; each trial runs "
            "in its own trial directory"
        )
    if args.get("enable_checkpointing") is False:
        raise ValueError(
            "afnio.trainer.tune: trainer_args turns checkpointing off, but every epoch reports "
            "its checkpoint to Tune (that is what best_trial and resuming read)"
        )
    callbacks = list(args.pop("callbacks", None) or [])
    args.setdefault("enable_progress_bar", False)
    trainer = Trainer(default_root_dir=run_dir, callbacks=[*callbacks, _EpochReporter(report)],
                      **args)
    trainer.fit(job.agent, job.train_dataloader, job.val_dataloader, ckpt_path=resume_from)
    return trainer


def _tune_trial(build: Callable[[dict[str, Any]], TuneJob], config: dict[str, Any]) -> None:
    tune = require_ray("ray.tune", feature="afnio.trainer.tune")
    run_dir = Path(tune.get_context().get_trial_dir()) / "afnio"
    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            run_dir.mkdir(parents=True, exist_ok=True)
            resume_from = run_dir / _RESUME_FILE
            shutil.copyfile(Path(directory) / CHECKPOINT_FILE, resume_from)

    def report(metrics: dict[str, Any], directory: str) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    run_trial(build, config, run_dir=run_dir, report=report, resume_from=resume_from)


def trainable(build: Callable[[dict[str, Any]], TuneJob]) -> Callable[[dict[str, Any]], None]:
    """A Ray Tune function trainable that runs ``build(config)``'s job with the Trainer.

    Args:
        build: ``build(config) -> TuneJob``; it runs in the trial's worker, so it builds the
            agent's model clients there (keys from the worker's environment).

    Returns:
        ``trainable(config)``, for ``ray.tune.Tuner(trainable(build), param_space=...)``.

    Raises:
        TypeError: If ``build`` is not callable.

    Example:
        >>> run = trainable(lambda config: None)
        >>> run.__name__
        'afnio_trainable'
    """
    if not callable(build):
        raise TypeError(f"afnio.trainer.tune.trainable: build must be callable, got {build!r}")

    def afnio_trainable(config: dict[str, Any]) -> None:
        _tune_trial(build, config)

    return afnio_trainable


@dataclass
class BestTrial:
    """The best epoch of a sweep: which trial, how it scored, and its saved state.

    Attributes:
        config: The trial's config (give it to your build function to rebuild the agent).
        metrics: The metrics reported for that epoch.
        checkpoint: The Trainer checkpoint of that epoch (a dict; see
            :mod:`afnio.trainer.checkpoint`).
        path: The trial's result directory.

    Example:
        >>> BestTrial({"momentum": 2}, {"val_score": 1.0}, {"agent": {}}, "/tmp/t").agent_state
        {}
    """

    config: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint: dict[str, Any]
    path: str

    @property
    def agent_state(self) -> dict[str, Any]:
        """The agent's state dict at that epoch (``agent.load_state_dict(...)`` it)."""
        return self.checkpoint["agent"]


def best_trial(results: Any, metric: str = "val_score", mode: str = "max") -> BestTrial:
    """The best epoch over every trial of a sweep, with its checkpoint loaded.

    Every reported epoch of every trial that has checkpoints is compared (a trial's best epoch,
    not only its last). Of equal scores the earliest epoch wins (it took the fewest steps), then
    the earlier trial in Tune's order.

    Args:
        results: The ``ResultGrid`` that ``Tuner.fit()`` returned (or a list of its results).
        metric: The reported metric to compare, e.g. ``"val_score"``.
        mode: ``"max"`` or ``"min"``.

    Returns:
        The :class:`BestTrial`.

    Raises:
        ValueError: If ``mode`` is invalid, or no reported epoch has ``metric`` and a
            checkpoint (every trial failed, or the metric is misspelled).

    Example:
        >>> best_trial([], "val_score", "best")
        Traceback (most recent call last):
        ...
        ValueError: best_trial: mode must be 'max' or 'min', got 'best'
    """
    if mode not in ("max", "min"):
        raise ValueError(f"best_trial: mode must be 'max' or 'min', got {mode!r}")
    best: tuple[float, float, Any, Any, dict[str, Any]] | None = None
    seen: set[str] = set()
    for result in results:
        for checkpoint, metrics in getattr(result, "best_checkpoints", None) or []:
            seen.update(metrics)
            value = metrics.get(metric)
            if not _number(value):
                continue
            epoch = metrics.get("epoch") if _number(metrics.get("epoch")) else math.inf
            if best is None or value == best[0] and epoch < best[1] or (
                value > best[0] if mode == "max" else value < best[0]
            ):
                best = (value, epoch, result, checkpoint, metrics)
    if best is None:
        known = ", ".join(sorted(key for key in seen if key != "config")) or "none"
        raise ValueError(
            f"best_trial: no reported epoch has a checkpoint and a numeric {metric!r} (metrics "
            f"reported: {known})"
        )
    _, _, result, checkpoint, metrics = best
    with checkpoint.as_directory() as directory:
        state = read_checkpoint(Path(directory) / CHECKPOINT_FILE)
    config = dict(metrics.get("config") or result.config or {})
    shown = {key: value for key, value in metrics.items() if key != "config"}
    return BestTrial(config, shown, state, str(result.path))

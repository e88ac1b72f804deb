"""Callbacks: code the Trainer runs at fixed points of a fit.

Subclass :class:`Callback`, override the hooks you need and pass instances to
``Trainer(callbacks=[...])``. A hook may set ``trainer.should_stop = True`` to end the fit at the
next batch boundary (a checkpoint is saved there, so the run can be resumed).

Example:
    >>> class StopAfter(Callback):
    ...     def __init__(self, steps):
    ...         self.steps = steps
    ...     def on_train_batch_end(self, trainer, agent, outputs, batch, batch_idx):
    ...         if trainer.global_step >= self.steps:
    ...             trainer.should_stop = True
"""

from __future__ import annotations

from typing import Any

__all__ = ["Callback"]


class Callback:
    """Base class of Trainer callbacks; every hook does nothing unless overridden."""

    def on_fit_start(self, trainer: Any, agent: Any) -> None:
        """Called once optimizers are attached and any checkpoint is restored."""

    def on_train_epoch_start(self, trainer: Any, agent: Any) -> None:
        """Called before the first batch of an epoch (``trainer.current_epoch``)."""

    def on_train_batch_end(
        self, trainer: Any, agent: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Called after a training batch finished (``outputs`` is ``None`` if it was skipped).

        ``trainer.batches_done`` already counts this batch, so a checkpoint taken from here (or
        after an exception raised here) resumes with the next batch.
        """

    def on_validation_end(self, trainer: Any, agent: Any, metrics: dict[str, float]) -> None:
        """Called after a validation pass with its metrics (``val_score``, ...)."""

    def on_train_epoch_end(self, trainer: Any, agent: Any, metrics: dict[str, Any]) -> None:
        """Called with the epoch's log row (training and validation metrics, usage)."""

    def on_fit_end(self, trainer: Any, agent: Any) -> None:
        """Called when a fit ends normally (all epochs done, ``should_stop`` or budget)."""

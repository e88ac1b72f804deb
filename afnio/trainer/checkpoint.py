"""Trainer checkpoints on disk: encoded by :func:`afnio.save`, written atomically, checked on load.

A checkpoint is a dict of plain data (no pickle) saved with :func:`afnio.serialization.save`:
``format``/``version`` markers, the agent's and optimizers' state dicts, the loop position
(epoch, batches done in it, global step), the running metrics of the unfinished epoch, the
metrics history, usage totals, the best score so far and the sampler's epoch/seed.

Reading is data only (model clients stay descriptions, see :func:`afnio.load`);
:func:`check_checkpoint` checks every field before a resume uses any of them.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from afnio.models.usage import Usage
from afnio.serialization import load, save, write_atomically

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "ResumePoint",
    "check_checkpoint",
    "read_checkpoint",
    "write_checkpoint",
]

CHECKPOINT_FORMAT = "afnio.trainer.checkpoint"
CHECKPOINT_VERSION = 1

_REQUIRED_KEYS = ("epoch", "batches_done", "global_step", "agent", "optimizers")
_REQUIRED = object()
_USAGE_FIELDS = frozenset(f.name for f in fields(Usage))


def write_checkpoint(
    state: Mapping[str, Any], path: str | os.PathLike, *copies: str | os.PathLike
) -> Path:
    """Save ``state`` to ``path`` and to each of ``copies``, encoding it only once.

    Every file is written atomically: a run killed while writing keeps the old file.

    Args:
        state: The checkpoint dict (see :mod:`afnio.trainer.checkpoint`).
        path: Where to write it; parent directories are created.
        copies: More files to receive the same bytes (e.g. ``last.ckpt`` beside
            ``epoch=E.ckpt``), written after ``path`` in the order given.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    buffer = io.BytesIO()
    save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **dict(state)}, buffer)
    payload = buffer.getvalue()
    targets = [Path(target) for target in (path, *copies)]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(payload, target)
    return targets[0]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`write_checkpoint`.

    Args:
        path: The checkpoint file.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file is not a Trainer checkpoint of a version this code reads.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"Trainer: checkpoint {str(source)!r} does not exist")
    state = load(str(source))
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"Trainer: {str(source)!r} is not a Trainer checkpoint (no "
            f"format={CHECKPOINT_FORMAT!r} marker)"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"Trainer: checkpoint {str(source)!r} has version {state.get('version')!r}; this "
            f"afnio reads version {CHECKPOINT_VERSION}"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"Trainer: checkpoint {str(source)!r} lacks {missing}")
    return state


@dataclass
class ResumePoint:
    """A checkpoint's fields, checked and normalised (see :func:`check_checkpoint`)."""

    epoch: int
    batches_done: int
    global_step: int
    agent: Mapping[str, Any]
    optimizers: list[dict[str, Any]]
    train_metrics: dict[str, Any]
    skipped_in_epoch: int
    errors: list[dict[str, Any]]
    metrics: dict[str, Any]
    usage_total: dict[str, float]
    usage_epoch: dict[str, float]
    best: dict[str, Any]
    history: list[dict[str, Any]]
    loader: dict[str, Any]


def check_checkpoint(
    state: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    max_epochs: int,
    optimizers: int,
    num_batches: int | None,
) -> ResumePoint:
    """Check every field of a checkpoint before any of it is used.

    Args:
        state: What :func:`read_checkpoint` returned.
        path: The checkpoint file, for error messages.
        max_epochs: The resuming Trainer's ``max_epochs`` (the epoch must not pass it).
        optimizers: How many optimizers the agent configured (the checkpoint must hold as many).
        num_batches: Batches per epoch of the training loader, when it has a length.

    Returns:
        The checked fields.

    Raises:
        ValueError: Naming the checkpoint and the field, for any missing, mistyped or
            out-of-range field.

    Example:
        >>> point = check_checkpoint(
        ...     {"epoch": 1, "batches_done": 2, "global_step": 6, "agent": {}, "optimizers": [],
        ...      "train_metrics": {"sums": {}, "weights": {}}}, "last.ckpt", max_epochs=3,
        ...     optimizers=0, num_batches=4)
        >>> point.epoch, point.batches_done
        (1, 2)
    """
    where = f"Trainer: checkpoint {os.fspath(path)!r}"

    def fail(field: str, problem: str) -> ValueError:
        return ValueError(f"{where} can't be resumed: {field} {problem}; nothing was changed")

    def count(field: str, value: Any, upper: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise fail(field, f"must be an int >= 0, got {value!r:.60}")
        if upper is not None and value > upper:
            raise fail(field, f"is {value}, more than {upper}")
        return value

    def typed(field: str, kind: type, default: Any = _REQUIRED) -> Any:
        value = state.get(field, default)
        if value is _REQUIRED:
            raise fail(field, "is missing")
        if not isinstance(value, kind):
            raise fail(field, f"must be a {kind.__name__}, got {type(value).__name__}")
        return value

    epoch = count("epoch", state.get("epoch"), max_epochs)
    batches_done = count("batches_done", state.get("batches_done"), num_batches)
    if epoch == max_epochs and batches_done:
        raise fail("batches_done", f"is {batches_done} in epoch {epoch}, after the last epoch")
    global_step = count("global_step", state.get("global_step"))
    agent = typed("agent", Mapping)
    saved_optimizers = typed("optimizers", list)
    if len(saved_optimizers) != optimizers:
        raise fail("optimizers", f"holds {len(saved_optimizers)} optimizer states but "
                                 f"configure_optimizers() returned {optimizers}")
    for index, saved in enumerate(saved_optimizers):
        if not isinstance(saved, dict):
            raise fail(f"optimizers[{index}]", f"must be a dict, got {type(saved).__name__}")
    train_metrics = typed("train_metrics", dict)
    for part in ("sums", "weights"):
        numbers = train_metrics.get(part)
        if not isinstance(numbers, dict) or not all(
            isinstance(k, str) and _is_number(v) for k, v in numbers.items()
        ):
            raise fail(f"train_metrics[{part!r}]", "must map metric names to numbers")
    usage = typed("usage", dict, {})
    usage_parts = {}
    for part in ("total", "epoch"):
        counters = usage.get(part, {})
        if not isinstance(counters, dict) or not all(
            k in _USAGE_FIELDS and _is_number(v) for k, v in counters.items()
        ):
            raise fail(f"usage[{part!r}]", f"must map some of {sorted(_USAGE_FIELDS)} to numbers")
        usage_parts[part] = dict(counters)
    best = state.get("best") or {}
    if not isinstance(best, dict) or not (
        (best.get("score") is None or _is_number(best["score"]))
        and isinstance(best.get("path"), (str, type(None)))
    ):
        raise fail("best", "must be a dict with a numeric score and a str path (or None)")
    lists = {}
    for field in ("errors", "history"):
        rows = typed(field, list, [])
        if not all(isinstance(row, dict) for row in rows):
            raise fail(field, "must be a list of dicts")
        lists[field] = rows
    return ResumePoint(
        epoch=epoch,
        batches_done=batches_done,
        global_step=global_step,
        agent=agent,
        optimizers=saved_optimizers,
        train_metrics=train_metrics,
        skipped_in_epoch=count("skipped_in_epoch", state.get("skipped_in_epoch", 0)),
        errors=[dict(row) for row in lists["errors"]],
        metrics=dict(typed("metrics", dict, {})),
        usage_total=usage_parts["total"],
        usage_epoch=usage_parts["epoch"],
        best=dict(best),
        history=[dict(row) for row in lists["history"]],
        loader=dict(typed("loader", dict, {}) or {}),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""Trainer checkpoints on disk: encoded by :func:`afnio.save`, written atomically, checked on load.

A checkpoint is a dict of plain data (no pickle) saved with :func:`afnio.serialization.save`:
``format``/``version`` markers, the agent's and optimizers' state dicts, the loop position
(epoch, batches done in it, global step), the running metrics of the unfinished epoch, the
metrics history, usage totals, the best score so far and the sampler's epoch/seed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from afnio.serialization import load, save, write_atomically

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "read_checkpoint", "write_checkpoint"]

CHECKPOINT_FORMAT = "afnio.trainer.checkpoint"
CHECKPOINT_VERSION = 1

_REQUIRED_KEYS = ("epoch", "batches_done", "global_step", "agent", "optimizers")


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

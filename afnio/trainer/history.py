"""The run history: ``history.jsonl``, what the run report is built from.

The Trainer appends one JSON object per line to ``RUN_DIR/history.jsonl`` and never rewrites it,
so a crash loses at most the line being written. Each record has a ``"type"``:

- ``fit_start``: a fit began (``resumed`` false) or resumed from a checkpoint (``resumed`` true,
  with the ``epoch``, ``batches_done`` and ``step`` it resumed at); holds the run's ``config``
  and every optimized ``parameters`` entry (``name``, ``role``, ``optimizer``, ``index``,
  ``value``).
- ``step``: one training batch: ``epoch``, ``batch_idx``, ``step`` (the ``global_step`` after
  it), ``metrics`` (the batch's per-sample ``score`` and extra metrics), ``usage`` (``total`` and
  ``by_model``: what the batch spent, per ``provider/model`` label; ``other`` for clients the
  Trainer cannot see), ``params`` (one entry per parameter that got feedback or changed:
  ``before``, ``after``, ``feedback``, ``verdict``, ``reason`` and, when the optimizer proposed a
  value it did not keep, ``proposal``) and ``error`` (text, or ``None``).
- ``epoch``: a finished epoch: ``row`` (the metrics row of ``metrics.jsonl``) and
  ``val_usage_by_model`` (what its validation pass spent per model).
- ``eval``: a ``Trainer.validate`` / ``test`` call: ``stage``, ``step``, ``metrics``, ``usage``.
- ``fit_end``: ``status`` (``success``, ``failed``, ``interrupted``) and ``stop_reason``.

:func:`read_history` turns the lines into the view of the **last fit**: a fresh ``fit_start``
drops what came before it (except ``eval`` records made outside a fit since the previous one),
and a resumed one drops the ``step`` records after the step it resumed at and the ``epoch``
records of epochs the checkpoint had not finished, because the resumed run replays them.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> run_dir = Path(tempfile.mkdtemp())
    >>> history = RunHistory(run_dir)
    >>> history.append({"type": "fit_start", "resumed": False, "config": {}, "parameters": []})
    >>> history.append({"type": "step", "epoch": 0, "batch_idx": 0, "step": 1})
    >>> [step["step"] for step in read_history(run_dir).steps]
    [1]
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afnio._variable import Variable
from afnio.models.model import ChatCompletionModel

__all__ = [
    "HISTORY_FILE",
    "HISTORY_VERSION",
    "RunHistory",
    "RunView",
    "is_secret_name",
    "json_safe",
    "public_config",
    "read_history",
]

HISTORY_FILE = "history.jsonl"
HISTORY_VERSION = 1

_SECRET_NAME = re.compile(
    r"api[_-]?key|secret|passw(or)?d|authorization|auth[_-]?token|access[_-]?token|credential|"
    r"bearer",
    re.IGNORECASE,
)


def is_secret_name(name: str) -> bool:
    """Whether an option called ``name`` may hold a secret (API key, password, token).

    Example:
        >>> is_secret_name("api_key"), is_secret_name("max_tokens")
        (True, False)
    """
    return bool(_SECRET_NAME.search(str(name)))


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data: Variables become their data, non-finite floats strings.

    Containers are walked; tuples become lists; dict keys become strings. Anything else becomes
    its type name in angle brackets (never its ``repr``, which might hold a secret).

    Example:
        >>> json_safe({"x": (1, float("nan")), 2: None})
        {'x': [1, 'nan'], '2': None}
    """
    if isinstance(value, Variable):
        return json_safe(value.data)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return f"<{type(value).__name__}>"


def public_config(value: Any) -> Any:
    """A configuration value fit to show and log: no secrets, no live objects.

    Model clients become ``{"client", "provider", "model"}``; options whose name looks like a
    secret (:func:`is_secret_name`) are dropped; functions become their qualified name; other
    objects their type name.

    Example:
        >>> public_config({"temperature": 0.2, "api_key": "sk-123", "stop": ("\\n",)})
        {'temperature': 0.2, 'stop': ['\\n']}
    """
    if isinstance(value, ChatCompletionModel):
        return {"client": type(value).__name__, "provider": value.provider, "model": value.model}
    if isinstance(value, Mapping):
        return {
            str(key): public_config(item)
            for key, item in value.items()
            if not is_secret_name(str(key))
        }
    if isinstance(value, (list, tuple)):
        return [public_config(item) for item in value]
    if callable(value) and hasattr(value, "__qualname__") and not isinstance(value, type):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    if isinstance(value, type):
        return value.__qualname__
    return json_safe(value)


class RunHistory:
    """Appends records to ``RUN_DIR/history.jsonl`` (see the module docstring).

    Args:
        run_dir: The run directory; ``None`` records nothing.
    """

    def __init__(self, run_dir: str | os.PathLike | None) -> None:
        self.path = None if run_dir is None else Path(run_dir) / HISTORY_FILE

    def append(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` (made JSON-safe) as one line and flush it."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(json_safe(record), ensure_ascii=False)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")


@dataclass
class RunView:
    """The last fit of a run directory, as :func:`read_history` reads it.

    Attributes:
        config: The configuration of the latest ``fit_start``.
        parameters: The optimized parameters and their values when the fit first started.
        steps: ``step`` records in step order.
        epochs: ``epoch`` records in epoch order.
        evals: ``eval`` records (stand-alone ``validate`` / ``test`` calls).
        end: The last ``fit_end`` record, or ``None`` (still running, or killed).
        resumes: How many times the fit was resumed.
    """

    config: dict[str, Any] = field(default_factory=dict)
    parameters: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    resumes: int = 0


def _records(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"run history {str(path)!r}: line {number} is not JSON ({error.msg})"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            raise ValueError(f"run history {str(path)!r}: line {number} has no record type")
        records.append(record)
    return records


def read_history(run_dir: str | os.PathLike) -> RunView:
    """Read ``RUN_DIR/history.jsonl`` into the view of the run's last fit.

    Args:
        run_dir: The Trainer's run directory.

    Returns:
        A :class:`RunView` (empty when the directory has no history).

    Raises:
        ValueError: If a line is not a JSON record (naming the file and line).
    """
    path = Path(run_dir) / HISTORY_FILE
    view = RunView()
    if not path.is_file():
        return view
    outside: list[dict[str, Any]] = []  # eval records made while no fit was running
    running = False
    for record in _records(path):
        kind = record["type"]
        if kind == "fit_start" and not record.get("resumed"):
            view = RunView(evals=outside)
            outside = []
            view.config = dict(record.get("config") or {})
            view.parameters = list(record.get("parameters") or [])
            running = True
        elif kind == "fit_start":
            view.resumes += 1
            view.end = None
            view.config = dict(record.get("config") or view.config)
            if not view.parameters:
                view.parameters = list(record.get("parameters") or [])
            step, epoch = int(record.get("step", 0)), int(record.get("epoch", 0))
            view.steps = [s for s in view.steps if int(s.get("step", 0)) <= step]
            view.epochs = [e for e in view.epochs if int(e.get("epoch", 0)) < epoch]
            running = True
        elif kind == "step":
            view.steps.append(record)
        elif kind == "epoch":
            view.epochs.append(record)
        elif kind == "eval":
            view.evals.append(record)
            if not running:
                outside.append(record)
        elif kind == "fit_end":
            view.end = record
            running = False
    view.steps.sort(key=lambda s: int(s.get("step", 0)))
    view.epochs.sort(key=lambda e: int(e.get("epoch", 0)))
    return view

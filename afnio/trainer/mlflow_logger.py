"""A Trainer logger that records runs in MLflow (``pip install afnio[mlflow]``).

What goes where in the MLflow run:

- **params**: the run's configuration (Trainer arguments, optimizer options — never an API
  key), flattened to dotted names (``trainer.max_epochs``, ``optimizers.0.momentum``); the
  whole configuration is also stored as the ``config.json`` artifact;
- **metrics**: every epoch row (``train_score``, ``val_score``, ``requests``, ``cost_usd``, …)
  at the Trainer's ``global_step``, and the per-step rows (``train_score_step``,
  ``cost_usd_step``, …) that ``Trainer(log_every_n_steps=)`` sends;
- **artifacts**: each parameter version as ``prompts/<name>/step_000042.txt`` (step 0 is the
  value the fit started from) and the HTML report as ``report/report.html``.

The logger talks to MLflow through :class:`mlflow.tracking.MlflowClient` only, so it never
touches MLflow's global "active run". ``mlflow`` is imported when the logger is built, so afnio
itself imports without it.

Example:
    >>> import tempfile
    >>> from afnio.trainer import Trainer
    >>> store = tempfile.mkdtemp()
    >>> logger = MLflowLogger(tracking_uri=f"sqlite:///{store}/mlflow.db")  # doctest: +SKIP
    >>> trainer = Trainer(logger=[logger], default_root_dir=store)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from afnio.trainer.history import json_safe, public_config
from afnio.trainer.loggers import Logger

__all__ = ["MLflowLogger"]

_STATUS = {"success": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_NOT_METRICS = frozenset({"step", "batch_idx"})
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_\-. /:]")
_UNSAFE_PATH = re.compile(r"[^A-Za-z0-9_\-.]+")
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


def _import_mlflow() -> tuple[Any, Any, Any]:
    """``(MlflowClient, Metric, Param)``, or an ImportError that says how to install mlflow."""
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError as error:
        raise ImportError(
            "MLflowLogger needs the mlflow package: pip install 'afnio[mlflow]'"
        ) from error
    return MlflowClient, Metric, Param


def _flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Dotted names to text values: dicts and lists are walked, leaves become JSON text."""
    if isinstance(config, Mapping) and config:
        flat: dict[str, str] = {}
        for key, value in config.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(config, list) and config and any(isinstance(x, (Mapping, list)) for x in config):
        flat = {}
        for index, value in enumerate(config):
            flat.update(_flatten(value, f"{prefix}{index}."))
        return flat
    text = config if isinstance(config, str) else json.dumps(config, ensure_ascii=False)
    return {prefix.rstrip("."): text}


def _key(name: str) -> str:
    return _UNSAFE_KEY.sub("_", str(name))


def _shorten(text: str) -> str:
    if len(text) <= _MAX_PARAM_LENGTH:
        return text
    marker = " … (cut; see config.json)"
    return text[: _MAX_PARAM_LENGTH - len(marker)] + marker


class MLflowLogger(Logger):
    """Logs a Trainer run to MLflow (see the module docstring for the layout).

    Args:
        experiment_name: The experiment to log into (created when missing).
        run_name: The MLflow run's name (MLflow picks one when ``None``).
        tracking_uri: Where MLflow stores runs, e.g. ``"sqlite:///mlflow.db"`` or a server
            URL; ``None`` uses MLflow's default (``MLFLOW_TRACKING_URI``).
        tags: Tags for the run.
        run_id: Continue this existing run instead of creating one (e.g. when resuming).
        artifact_location: Artifact root for a newly created experiment.

    Attributes:
        client: The :class:`mlflow.tracking.MlflowClient` used.

    Raises:
        ImportError: If mlflow is not installed.
    """

    def __init__(
        self,
        experiment_name: str = "afnio",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        artifact_location: str | None = None,
    ) -> None:
        client_class, self._metric, self._param = _import_mlflow()
        self.client = client_class(tracking_uri=tracking_uri)
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.artifact_location = artifact_location
        self._run_id = run_id
        self._created_here = run_id is None
        self._logged_anything = False
        self._params: dict[str, str] = {}

    @property
    def run_id(self) -> str:
        """The MLflow run's id (the run is created on first use)."""
        if self._run_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=self.artifact_location
                )
            else:
                experiment_id = experiment.experiment_id
            run = self.client.create_run(experiment_id, tags=self.tags, run_name=self.run_name)
            self._run_id = run.info.run_id
        return self._run_id

    def setup(self, run_dir: Path) -> None:
        """Tag the run with the Trainer's run directory (``afnio.run_dir``)."""
        self.tags.setdefault("afnio.run_dir", str(Path(run_dir).resolve()))

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Log the configuration as params (new names only: MLflow params can't change) and as
        the ``config.json`` artifact."""
        config = public_config(params)
        flat = {_key(name): _shorten(value) for name, value in _flatten(config).items() if name}
        new = [(name, value) for name, value in flat.items() if name not in self._params]
        for start in range(0, len(new), _PARAMS_PER_BATCH):
            chunk = new[start : start + _PARAMS_PER_BATCH]
            self.client.log_batch(
                self.run_id, params=[self._param(name, value) for name, value in chunk]
            )
        self._params.update(new)
        self.client.log_dict(self.run_id, json_safe(config), "config.json")
        self._logged_anything = True

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the row's finite numbers (``stage``, ``step`` and ``batch_idx`` are not metrics)
        at ``step``."""
        stamp = int(time.time() * 1000)
        values = [
            self._metric(_key(name), float(value), stamp, int(step or 0))
            for name, value in metrics.items()
            if name not in _NOT_METRICS
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
        ]
        for start in range(0, len(values), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=values[start : start + _METRICS_PER_BATCH])
        self._logged_anything = True

    def log_history(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """A resumed fit's earlier rows, logged once into a run this logger created and has not
        written to yet (so resuming into a new MLflow run gives it the whole history)."""
        if not rows or not self._created_here or self._logged_anything:
            return
        for row in rows:
            step = row.get("step")
            self.log_metrics(row, step if isinstance(step, int) else None)

    def log_text(self, text: str, name: str, step: int) -> None:
        """Store a parameter version as ``prompts/<name>/step_<step>.txt``."""
        folder = _UNSAFE_PATH.sub("_", name).strip("_") or "parameter"
        self.client.log_text(self.run_id, text, f"prompts/{folder}/step_{step:06d}.txt")
        self._logged_anything = True

    def log_artifact(self, path: str | os.PathLike, name: str | None = None) -> None:
        """Upload a file (the Trainer's ``report.html`` goes under ``report/``)."""
        folder = name if name is not None else "report"
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def finalize(self, status: str) -> None:
        """End the run: ``success`` → FINISHED, ``failed`` → FAILED, ``interrupted`` → KILLED."""
        self.client.set_terminated(self.run_id, status=_STATUS.get(status, "FINISHED"))

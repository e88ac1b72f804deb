"""The Trainer: fit, validate, test and predict afnio agents, with checkpoints, logs and cost.

:func:`evaluate` runs an agent's evaluation hook over a dataset, here or sharded over Ray
workers (:class:`RayEvaluation`); :mod:`afnio.trainer.tune` runs Trainer jobs under Ray Tune.
"""

from afnio.trainer.callbacks import Callback
from afnio.trainer.distributed import (
    BatchResult,
    EvaluationResult,
    RayEvaluation,
    RemoteStepError,
    evaluate,
)
from afnio.trainer.loggers import CSVLogger, JSONLLogger, Logger
from afnio.trainer.mlflow_logger import MLflowLogger
from afnio.trainer.report import write_report
from afnio.trainer.trainer import Trainer

__all__ = [
    "BatchResult",
    "CSVLogger",
    "Callback",
    "EvaluationResult",
    "JSONLLogger",
    "Logger",
    "MLflowLogger",
    "RayEvaluation",
    "RemoteStepError",
    "Trainer",
    "evaluate",
    "write_report",
]

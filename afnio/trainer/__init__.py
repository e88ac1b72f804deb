"""The Trainer: fit, validate, test and predict afnio agents, with checkpoints, logs and cost."""

from afnio.trainer.callbacks import Callback
from afnio.trainer.loggers import CSVLogger, JSONLLogger, Logger
from afnio.trainer.mlflow_logger import MLflowLogger
from afnio.trainer.report import write_report
from afnio.trainer.trainer import Trainer

__all__ = [
    "CSVLogger",
    "Callback",
    "JSONLLogger",
    "Logger",
    "MLflowLogger",
    "Trainer",
    "write_report",
]

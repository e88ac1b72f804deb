"""The Trainer: fit, validate, test and predict afnio agents, with checkpoints, logs and cost."""

from afnio.trainer.callbacks import Callback
from afnio.trainer.trainer import Trainer

__all__ = ["Callback", "Trainer"]

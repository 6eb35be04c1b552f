"""The shared trainer: config schemas, distributed setup, checkpoints, the training loop."""

from .loop import NonFiniteLoss, run

__all__ = ["NonFiniteLoss", "run"]

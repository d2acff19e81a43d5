"""Trainers (end-to-end; GLEAM and layer-wise build on the same pieces), losses, evaluation."""

from recon.train.losses import LOSSES, get_loss
from recon.train.trainer import (
    TrainConfig,
    TrainHooks,
    TrainResult,
    evaluate,
    iterate_batches,
    train,
    zero_filled,
)

__all__ = [
    "LOSSES",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "evaluate",
    "get_loss",
    "iterate_batches",
    "train",
    "zero_filled",
]

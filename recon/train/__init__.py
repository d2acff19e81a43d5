"""Trainers (end-to-end; GLEAM and layer-wise build on the same pieces), losses, evaluation."""

from recon.train.checkpointing import train_checkpointed
from recon.train.gleam import GleamResult, train_gleam
from recon.train.layerwise import train_layerwise
from recon.train.losses import LOSSES, get_loss
from recon.train.methods import METHODS, local_train
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
    "GleamResult",
    "LOSSES",
    "METHODS",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "evaluate",
    "get_loss",
    "iterate_batches",
    "local_train",
    "train_checkpointed",
    "train_gleam",
    "train_layerwise",
    "train",
    "zero_filled",
]

"""Trainers (end-to-end; GLEAM, layer-wise and the MiLeNAS search build on the same pieces), losses,
evaluation."""

from recon.train.checkpointing import train_checkpointed
from recon.train.gleam import GleamResult, train_gleam
from recon.train.layerwise import train_layerwise
from recon.train.losses import LOSSES, get_loss
from recon.train.methods import METHODS, local_train
from recon.train.milenas import (
    SearchResult,
    empirical_risk,
    milenas_grads,
    milenas_train,
    split_train_val,
)
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
    "SearchResult",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "empirical_risk",
    "evaluate",
    "get_loss",
    "iterate_batches",
    "local_train",
    "milenas_grads",
    "milenas_train",
    "split_train_val",
    "train_checkpointed",
    "train_gleam",
    "train_layerwise",
    "train",
    "zero_filled",
]

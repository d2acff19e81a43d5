"""Gradient checkpointing of the end-to-end network, one checkpoint per unroll (GLEAM Sec. V-B3,
``N_cp = N``): the baseline GLEAM is compared against.

Only each unroll's input is kept during the forward pass; the unroll's activations are recomputed
in the backward pass. Gradients equal those of plain end-to-end training (same graph, recomputed),
at the cost of one extra forward per step.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from recon.data.sample import Slices
from recon.models.unrolled import Unrolled
from recon.physics.sense import SenseOp
from recon.train.trainer import TrainConfig, TrainHooks, TrainResult, train


class CheckpointedUnrolled(Unrolled):
    """Wrap an unrolled model so that every :meth:`step` is a checkpoint (``use_reentrant=False``).

    The wrapper owns no weights of its own: ``inner`` is trained in place.
    """

    def __init__(self, inner: Unrolled):
        super().__init__()
        self.inner = inner
        self.num_unrolls = inner.num_unrolls

    def init(self, y: torch.Tensor, physics: SenseOp) -> torch.Tensor:
        return self.inner.init(y, physics)

    def step(self, i: int, x: torch.Tensor, y: torch.Tensor, physics: SenseOp) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.inner.step(i, x, y, physics)
        out = checkpoint(self.inner.step, i, x, y, physics, use_reentrant=False)
        assert isinstance(out, torch.Tensor)
        return out


def train_checkpointed(
    model: Unrolled,
    dataset: Slices,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    hooks: TrainHooks | None = None,
    progress: bool | None = None,
    desc: str = "checkpoint",
) -> TrainResult:
    """End-to-end training (Eq. 9) of ``model`` with one checkpoint per unroll.

    Hooks receive ``model`` itself (not the wrapper), so FedProx / Scaffold see the usual
    parameter names and order.
    """
    hooks = hooks or TrainHooks()
    reg, after = hooks.regularizer, hooks.after_backward
    inner_hooks = TrainHooks(
        regularizer=None if reg is None else (lambda _: reg(model)),
        after_backward=None if after is None else (lambda _: after(model)),
        after_step=hooks.after_step,  # early stopping sees the step count, not the model
    )
    return train(CheckpointedUnrolled(model), dataset, cfg, device, inner_hooks, progress, desc)

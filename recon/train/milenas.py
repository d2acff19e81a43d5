"""MiLeNAS mixed-level search at one site (He et al., CVPR 2020; FedAutoMRI Eq. 6, GAutoMRI Eq. 7 /
Algorithm 1).

Each local step, at the current ``(θ, α)``::

    θ <- θ - η_θ ∇θ L_tr(θ, α)
    α <- α - η_α (∇α L_tr(θ, α) + λ ∇α L_val(θ, α))

(first order: no unrolled second-order term, unlike DARTS). The site splits its slices into a
train and a val part (:func:`split_train_val`). Losses are the trainer's
(:func:`recon.train.losses.get_loss`), batches come from
:func:`recon.train.trainer.iterate_batches`. GAutoMRI Sec. IV.A.3: Adam 1e-3 for θ; Adam for α
(1e-4 in GAutoMRI, 3e-3 in FedAutoMRI) with weight decay 1e-3.

The model is any unrolled network (``model(y, physics)``) whose denoiser contains one
:class:`~recon.nas.cell.SearchDenoiser` (built by :mod:`recon.nas.search`); θ is every registered
parameter (the denoiser weights and MoDL's ``lam``), α is the search net's architecture weights.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from recon.data.sample import Sample, Slices, collate
from recon.nas.search import arch_parameters, weight_parameters
from recon.train.losses import LossFn, get_loss
from recon.train.trainer import iterate_batches


def split_train_val(
    dataset: Slices, val_fraction: float = 0.5, seed: int = 0
) -> tuple[Subset[Sample], Subset[Sample]]:
    """Seeded split of a site's slices into the MiLeNAS train and val parts (both non-empty).

    MiLeNAS / DARTS use half of the training data as the architecture-validation set.
    """
    n = len(dataset)
    if n < 2:
        raise ValueError(f"need at least 2 slices to split into train and val, got {n}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    source = cast("Dataset[Sample]", dataset)  # torch types a Subset's source as a Dataset
    return Subset(source, sorted(order[n_val:])), Subset(source, sorted(order[:n_val]))


@dataclass
class SearchResult:
    """Per-step losses of a local search; ``final_loss`` averages the last 10% of steps."""

    steps: int
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        tail = self.train_losses[-max(1, len(self.train_losses) // 10) :]
        return float(sum(tail) / max(len(tail), 1))


def _loss(model: nn.Module, sample: Sample, loss_fn: LossFn) -> torch.Tensor:
    physics = sample.physics()
    return loss_fn(model(sample.kspace, physics), sample, physics)


def milenas_grads(
    model: nn.Module,
    loss_fn: LossFn,
    train_batch: Sample,
    val_batch: Sample,
    lam: float,
) -> tuple[float, float]:
    """Set ``.grad``: θ gets ``∇θ L_tr``, α gets ``∇α L_tr + lam ∇α L_val`` (Eq. 6 / Eq. 7).

    Both gradients are taken at the same ``(θ, α)``. Existing gradients are overwritten.
    Returns the two loss values ``(L_tr, L_val)``.
    """
    alphas = arch_parameters(model)
    weights = weight_parameters(model)
    for p in [*alphas, *weights]:
        p.grad = None
    with torch.set_grad_enabled(lam != 0):
        loss_val = _loss(model, val_batch, loss_fn)
    if not torch.isfinite(loss_val):
        raise FloatingPointError(f"non-finite validation loss (slice {val_batch.meta})")
    if lam != 0:
        # α only: the val loss must not reach θ (mixed-level, not joint training)
        val_grads = torch.autograd.grad(loss_val, alphas)
    loss_tr = _loss(model, train_batch, loss_fn)
    if not torch.isfinite(loss_tr):
        raise FloatingPointError(
            f"non-finite training loss (slice {train_batch.meta}); lower the learning rates"
        )
    loss_tr.backward()
    if lam != 0:
        for a, g in zip(alphas, val_grads):
            a.grad = lam * g if a.grad is None else a.grad + lam * g
    return float(loss_tr.detach()), float(loss_val.detach())


def milenas_train(
    model: nn.Module,
    train_set: Slices,
    val_set: Slices,
    steps: int,
    lr_w: float = 1e-3,
    lr_alpha: float = 3e-3,
    lam: float = 1.0,
    *,
    alpha_weight_decay: float = 1e-3,
    batch_size: int = 1,
    loss: str = "ssim",
    seed: int = 0,
    grad_clip: float | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> SearchResult:
    """Local MiLeNAS search: ``steps`` simultaneous updates of θ (Adam) and α (Adam).

    Parameters
    ----------
    model : nn.Module
        Unrolled model called as ``model(y, physics)`` with one search denoiser.
    train_set, val_set : sequence of Sample
        The site's two slice sets (:func:`split_train_val`).
    steps : int
        Local steps (one train batch and one val batch each).
    lr_w, lr_alpha : float
        Learning rates ``η_θ`` and ``η_α``.
    lam : float
        ``λ`` (GAutoMRI) / ``β`` (FedAutoMRI): weight of the validation loss in α's update.
    alpha_weight_decay : float
        Adam weight decay on α (papers: 1e-3).
    grad_clip : float, optional
        Clip θ's gradient norm (α is not clipped).

    Returns
    -------
    SearchResult
        Train and val losses per step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    torch.manual_seed(seed)
    loss_fn = get_loss(loss)
    model.to(device).train()
    alphas = arch_parameters(model)
    weights = weight_parameters(model)
    opt_w = torch.optim.Adam(weights, lr=lr_w)
    opt_a = torch.optim.Adam(alphas, lr=lr_alpha, weight_decay=alpha_weight_decay)
    train_batches = iterate_batches(train_set, batch_size, seed)
    val_batches = iterate_batches(val_set, batch_size, seed + 1)
    result = SearchResult(steps=steps)
    t0 = time.perf_counter()
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=steps, desc="search", disable=not show, leave=False) as bar:
        for _ in range(steps):
            tr = next(train_batches).to(device)
            va = next(val_batches).to(device)
            loss_tr, loss_val = milenas_grads(model, loss_fn, tr, va, lam)
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(weights, grad_clip)
            opt_w.step()
            opt_a.step()
            result.train_losses.append(loss_tr)
            result.val_losses.append(loss_val)
            bar.update(1)
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def empirical_risk(
    model: nn.Module,
    dataset: Slices,
    loss: str = "ssim",
    device: torch.device | str = "cpu",
) -> float:
    """Mean per-slice loss of ``model`` on ``dataset``: ``ℓ_{D_c}`` of GAutoMRI Eq. 9.

    A client reports ``G_c = risk(global) - risk(its previous local model)``
    (:func:`strategies.nas_maths.risk_gap`); training mode is restored afterwards.
    """
    if len(dataset) == 0:
        raise ValueError("cannot compute a risk on an empty dataset")
    loss_fn = get_loss(loss)
    was_training = model.training
    model.to(device).eval()
    total = 0.0
    for i in range(len(dataset)):
        total += float(_loss(model, collate([dataset[i]]).to(device), loss_fn))
    model.train(was_training)
    return total / len(dataset)

"""Training losses. The default is Levac et al. 2023 Eq. 9: ``-SSIM(RSS(x_Nu), RSS(x))``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from recon.data.sample import Sample
from recon.metrics import ssim
from recon.physics.sense import SenseOp

LossFn = Callable[[torch.Tensor, Sample, SenseOp], torch.Tensor]


def ssim_loss(x: torch.Tensor, sample: Sample, physics: SenseOp) -> torch.Tensor:
    """Eq. 9: ``1 - SSIM(RSS(S x), target)`` (the constant 1 only makes the value positive)."""
    return 1.0 - ssim(physics.rss(x), sample.target).mean()


def _complex_reference(sample: Sample) -> torch.Tensor:
    if sample.image is None:
        raise ValueError("complex losses need Sample.image (the coil-combined reference)")
    return sample.image


def l1_loss(x: torch.Tensor, sample: Sample, physics: SenseOp) -> torch.Tensor:
    """Complex L1: mean ``|x - x_ref|`` against the coil-combined fully sampled image."""
    return (x - _complex_reference(sample)).abs().mean()


def l2_loss(x: torch.Tensor, sample: Sample, physics: SenseOp) -> torch.Tensor:
    """Complex L2 (MSE) against the coil-combined fully sampled image."""
    return ((x - _complex_reference(sample)).abs() ** 2).mean()


def rss_l1_loss(x: torch.Tensor, sample: Sample, physics: SenseOp) -> torch.Tensor:
    """L1 between RSS magnitudes."""
    return (physics.rss(x) - sample.target).abs().mean()


LOSSES: dict[str, LossFn] = {
    "ssim": ssim_loss,
    "l1": l1_loss,
    "l2": l2_loss,
    "rss-l1": rss_l1_loss,
}


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None

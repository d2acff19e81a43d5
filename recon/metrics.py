"""Image quality on RSS magnitude: SSIM (Levac et al. 2023 Eq. 9), NRMSE (Eq. 12), PSNR.

Torch implementations (differentiable, batched) that match scikit-image's
``structural_similarity`` (7x7 uniform window, K1=0.01, K2=0.03, sample covariance),
``normalized_root_mse`` (Euclidean) and ``peak_signal_noise_ratio``, with the data range taken
as the reference's maximum per image (as fastMRI does per volume). The tests check the match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

METRIC_KEYS = ("ssim", "nrmse", "psnr")


@dataclass(frozen=True)
class Metrics:
    """Mean SSIM / NRMSE / PSNR on the RSS magnitude over ``n`` slices (``recon.train.evaluate``).

    ``per_slice`` holds each slice's three values; ``psnr_per_unroll`` the mean PSNR after every
    unroll (GLEAM Fig. 9), only when asked for. ``m["psnr"]`` reads a field by name.
    """

    ssim: float
    nrmse: float
    psnr: float
    n: int
    per_slice: list[dict[str, float]] = field(default_factory=list)
    psnr_per_unroll: list[float] | None = None

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{prefix + "ssim": ..., prefix + "nrmse": ..., prefix + "psnr": ...}``."""
        return {f"{prefix}{k}": float(getattr(self, k)) for k in METRIC_KEYS}

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__ or getattr(self, key) is None:
            raise KeyError(key)
        return getattr(self, key)


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x  # [B, H, W]


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: torch.Tensor | float | None = None,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean SSIM per image, ``[B]`` (``[]`` for unbatched ``[H, W]`` inputs)."""
    squeeze = pred.dim() == 2
    p, t = _as_batch(pred).unsqueeze(1), _as_batch(target).unsqueeze(1)  # [B, 1, H, W]
    if data_range is None:
        dr = t.flatten(1).amax(dim=1)
    else:
        dr = torch.as_tensor(data_range, dtype=p.dtype, device=p.device).expand(p.shape[0])
    dr = dr.view(-1, 1, 1)
    n = win_size**2
    cov_norm = n / (n - 1)
    # Local means over the uniform window: avg_pool2d (stride 1, no padding = skimage's cropped
    # 'valid' region) is several times faster than conv2d with a ones/n kernel, forward and
    # backward (15 -> 4 ms at 128 px), which matters for GLEAM's one loss per module. The
    # prediction's three maps and the target's two are pooled apart, so the backward only runs
    # through the former.
    ux, uxx, uxy = F.avg_pool2d(torch.cat([p, p * p, p * t], dim=1), win_size, 1).unbind(dim=1)
    uy, uyy = F.avg_pool2d(torch.cat([t, t * t], dim=1), win_size, 1).unbind(dim=1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = (k1 * dr) ** 2, (k2 * dr) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    out = s.flatten(1).mean(dim=1)
    return out[0] if squeeze else out


def nrmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Levac et al. 2023 Eq. 12: ``||x - x_hat||_2 / ||x||_2`` per image."""
    p, t = _as_batch(pred), _as_batch(target)
    out = (p - t).flatten(1).norm(dim=1) / t.flatten(1).norm(dim=1)
    return out[0] if pred.dim() == 2 else out


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB with the reference's maximum as the peak, per image."""
    p, t = _as_batch(pred), _as_batch(target)
    mse = ((p - t) ** 2).flatten(1).mean(dim=1)
    peak = t.flatten(1).amax(dim=1)
    out = 10 * torch.log10(peak**2 / mse)
    return out[0] if pred.dim() == 2 else out


def all_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Batch means of SSIM, NRMSE and PSNR as plain floats (for logs and results.json)."""
    with torch.no_grad():
        p, t = pred.detach().float(), target.detach().float()
        return {
            "ssim": float(ssim(p, t).mean()),
            "nrmse": float(nrmse(p, t).mean()),
            "psnr": float(psnr(p, t).mean()),
        }

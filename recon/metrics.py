"""Image quality on RSS magnitude: SSIM (Levac et al. 2023 Eq. 9), NRMSE (Eq. 12), PSNR.

Torch implementations (differentiable, batched) that match scikit-image's
``structural_similarity`` (7x7 uniform window, K1=0.01, K2=0.03, sample covariance),
``normalized_root_mse`` (Euclidean) and ``peak_signal_noise_ratio``, with the data range taken
as the reference's maximum per image (as fastMRI does per volume). The tests check the match.

Two more views, because whole-image numbers mislead on real scans (README "Metrics"):

- **inside the object's support** (:func:`support_mask`, :func:`support_metrics`): SENSE and CS
  zero the background where the maps vanish, while the reference RSS has noise there, so their
  whole-image SSIM can fall below zero-filled while the object itself is far better
  reconstructed. The support is the reference RSS smoothed with a Gaussian (``sigma`` = 2 px),
  thresholded at ``frac`` = 10% of its maximum, holes filled. SSIM inside is the mean of the
  SSIM map over the support (valid window positions only); NRMSE and PSNR use the support's
  pixels (PSNR's peak stays the reference's maximum).
- **per volume, fastMRI style** (:func:`volume_ssim`): SSIM of every slice with one
  ``data_range`` = the volume's reference maximum, averaged over the slices (fastMRI
  ``evaluate.ssim``); the per-slice mean uses each slice's own maximum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
    out = ssim_map(pred, target, data_range, win_size, k1, k2).flatten(1).mean(dim=1)
    return out[0] if pred.dim() == 2 else out


def ssim_map(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: torch.Tensor | float | None = None,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """SSIM at every valid window position, ``[B, H - win + 1, W - win + 1]`` (scikit-image's
    ``full=True`` map without its ``(win - 1) / 2`` border)."""
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
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


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


SUPPORT_FRAC = 0.1
SUPPORT_SIGMA = 2.0


def support_mask(
    reference: torch.Tensor, frac: float = SUPPORT_FRAC, sigma: float = SUPPORT_SIGMA
) -> torch.Tensor:
    """The object's support from the reference RSS, bool ``[B, H, W]`` (or ``[H, W]``).

    Per image: Gaussian-smooth the reference (``sigma`` px, so background noise does not
    speckle the mask), keep pixels above ``frac`` of the smoothed maximum, fill holes (dark
    tissue such as ventricles stays inside).
    """
    from scipy import ndimage

    ref = _as_batch(reference).detach().float().cpu().numpy()
    masks = []
    for img in ref:
        smooth = ndimage.gaussian_filter(img, sigma)
        masks.append(ndimage.binary_fill_holes(smooth > frac * smooth.max()))
    out = torch.from_numpy(np.stack(masks)).to(reference.device)
    return out[0] if reference.dim() == 2 else out


def support_metrics(
    pred: torch.Tensor, target: torch.Tensor, support: torch.Tensor, win_size: int = 7
) -> dict[str, torch.Tensor]:
    """SSIM / NRMSE / PSNR inside ``support`` per image, each ``[B]`` (``[]`` unbatched).

    SSIM: mean of :func:`ssim_map` (data range = the reference's maximum) over the support's
    valid window positions; NRMSE: ``||(x - x_hat) m|| / ||x m||``; PSNR: the reference's
    maximum over the mean squared error inside the support.
    """
    dtype = torch.promote_types(pred.dtype, torch.float32)
    p, t = _as_batch(pred).to(dtype), _as_batch(target).to(dtype)
    m = _as_batch(support).to(p.device).bool()
    r = (win_size - 1) // 2
    smap = ssim_map(p, t, win_size=win_size)
    inner = m[:, r : r + smap.shape[-2], r : r + smap.shape[-1]].float()
    s = (smap * inner).flatten(1).sum(1) / inner.flatten(1).sum(1).clamp_min(1)
    mf = m.float()
    err = ((p - t) * mf).flatten(1)
    n = mf.flatten(1).sum(1).clamp_min(1)
    out = {
        "ssim": s,
        "nrmse": err.norm(dim=1) / (t * mf).flatten(1).norm(dim=1),
        "psnr": 10 * torch.log10(t.flatten(1).amax(dim=1) ** 2 / (err.pow(2).sum(1) / n)),
    }
    return {k: v[0] for k, v in out.items()} if pred.dim() == 2 else out


def volume_ssim(pred: torch.Tensor, target: torch.Tensor, win_size: int = 7) -> float:
    """fastMRI's per-volume SSIM of ``[S, H, W]`` slices: one data range, the volume's reference
    maximum, for every slice; the mean over slices."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    p, t = _as_batch(pred).to(dtype), _as_batch(target).to(dtype)
    return float(ssim(p, t, data_range=float(t.max()), win_size=win_size).mean())

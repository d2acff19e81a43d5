"""Metrics agree with scikit-image (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from recon.metrics import (
    all_metrics,
    nrmse,
    psnr,
    ssim,
    support_mask,
    support_metrics,
    volume_ssim,
)


def _pair(seed: int, h: int = 40, w: int = 36) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    target = np.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (2 * (h / 4) ** 2)) + 0.1
    target += 0.2 * (xx > w / 2)
    pred = target + 0.05 * rng.standard_normal(target.shape)
    return pred.astype(np.float64), target.astype(np.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_skimage(seed: int) -> None:
    pred, target = _pair(seed)
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    dr = target.max()
    ref_ssim = structural_similarity(target, pred, data_range=dr, win_size=7)
    assert float(ssim(p, t)) == pytest.approx(ref_ssim, abs=1e-6)
    assert float(nrmse(p, t)) == pytest.approx(normalized_root_mse(target, pred), rel=1e-9)
    assert float(psnr(p, t)) == pytest.approx(
        peak_signal_noise_ratio(target, pred, data_range=dr), rel=1e-9
    )


def test_metrics_are_batched_and_ordered() -> None:
    pred0, target = _pair(0)
    t = torch.from_numpy(target)
    good, bad = t + 0.01 * torch.from_numpy(pred0 - target), t + torch.from_numpy(pred0 - target)
    s = ssim(torch.stack([good, bad]), torch.stack([t, t]))
    assert s.shape == (2,) and s[0] > s[1]
    assert float(ssim(t, t)) == pytest.approx(1.0, abs=1e-9)
    m = all_metrics(torch.stack([good, bad]), torch.stack([t, t]))
    assert set(m) == {"ssim", "nrmse", "psnr"} and m["nrmse"] > 0


def test_ssim_is_differentiable() -> None:
    pred, target = _pair(3)
    p = torch.from_numpy(pred).requires_grad_()
    ssim(p, torch.from_numpy(target)).backward()
    assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def _object_on_noise(seed: int, h: int = 48, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A disc with a dark hole on a noisy background (the reference) and a reconstruction that
    is close inside the disc but zero outside (what SENSE with ESPIRiT maps returns)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    r2 = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
    disc = r2 < (0.35 * min(h, w)) ** 2
    hole = r2 < (0.08 * min(h, w)) ** 2
    target = np.where(disc, 1.0 + 0.1 * np.sin(xx / 3), 0.0) * ~hole
    target = np.abs(target + 0.05 * rng.standard_normal((h, w)))
    pred = np.where(disc, target + 0.02 * rng.standard_normal((h, w)), 0.0)
    return pred, target


def test_support_mask_is_the_object_with_holes_filled() -> None:
    _, target = _object_on_noise(0)
    m = support_mask(torch.from_numpy(target)).numpy()
    h, w = target.shape
    assert m[h // 2, w // 2]  # the dark hole is inside
    assert not m[0, 0] and not m[-1, -1]  # noise background is outside
    yy, xx = np.mgrid[:h, :w]
    r = np.sqrt((yy - h / 2) ** 2 + (xx - w / 2) ** 2)
    edge = 0.35 * min(h, w)
    assert m[r < edge - 1].all()  # the whole object ...
    assert not m[r > edge + 4].any()  # ... and a rim of at most the smoothing's width


@pytest.mark.parametrize("seed", [0, 1])
def test_support_metrics_match_skimage_on_the_support(seed: int) -> None:
    pred, target = _object_on_noise(seed)
    m = support_mask(torch.from_numpy(target)).numpy()
    dr = target.max()
    _, smap = structural_similarity(target, pred, data_range=dr, win_size=7, full=True)
    r = 3
    inner = np.zeros_like(m)
    inner[r:-r, r:-r] = m[r:-r, r:-r]  # skimage's mean drops the border too
    ref_ssim = smap[inner].mean()
    ref_nrmse = normalized_root_mse(target[m], pred[m])
    ref_psnr = 10 * np.log10(dr**2 / np.mean((target[m] - pred[m]) ** 2))
    got = support_metrics(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(m))
    assert float(got["ssim"]) == pytest.approx(ref_ssim, abs=1e-6)
    assert float(got["nrmse"]) == pytest.approx(ref_nrmse, rel=1e-9)
    assert float(got["psnr"]) == pytest.approx(ref_psnr, rel=1e-9)
    # the case that misleads: zero background costs whole-image SSIM, not SSIM inside
    whole = float(ssim(torch.from_numpy(pred), torch.from_numpy(target)))
    assert float(got["ssim"]) > whole + 0.1


def test_volume_ssim_is_fastmri_style() -> None:
    """One data range (the volume's maximum) for every slice, then the mean over slices."""
    slices = [_object_on_noise(s) for s in range(3)]
    pred = np.stack([p * (1 + 0.5 * i) for i, (p, _) in enumerate(slices)])
    target = np.stack([t * (1 + 0.5 * i) for i, (_, t) in enumerate(slices)])
    dr = target.max()
    ref = np.mean(
        [structural_similarity(t, p, data_range=dr, win_size=7) for p, t in zip(pred, target)]
    )
    got = volume_ssim(torch.from_numpy(pred), torch.from_numpy(target))
    assert got == pytest.approx(ref, abs=1e-6)
    per_slice = float(ssim(torch.from_numpy(pred), torch.from_numpy(target)).mean())
    assert got != pytest.approx(per_slice, abs=1e-4)  # a different number, reported apart

"""Metrics agree with scikit-image (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from recon.metrics import all_metrics, nrmse, psnr, ssim


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

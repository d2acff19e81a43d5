"""Coil maps from the calibration region: ESPIRiT / JSENSE recover known smooth maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.physics.coils import (
    espirit_maps,
    estimate_maps,
    jsense_maps,
    noise_std,
    np_fft2c,
    np_ifft2c,
    np_rss,
    single_thread_blas,
)
from recon.physics.fft import fft2c


def phantom(n: int = 48, coils: int = 4, noise: float = 0.0, seed: int = 0):
    """Soft-edged ellipse phantom with smooth phase, known smooth maps, ``sum_c |S_c|^2 = 1``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    px = 2 / n

    def soft(r: np.ndarray, size: float) -> np.ndarray:  # band-limited edge, ~1 pixel wide
        return 0.5 * (1 + np.tanh((1 - r) * size / (0.7 * px)))

    obj = soft(np.sqrt((x / 0.7) ** 2 + (y / 0.85) ** 2), 0.7)
    spot = soft(np.sqrt((x / 0.3) ** 2 + ((y - 0.2) / 0.2) ** 2), 0.2)
    img = obj * (1 + 0.6 * spot) * np.exp(0.7j * x)
    ang = 2 * np.pi * np.arange(coils) / coils
    maps = np.stack(
        [
            np.exp(-((x - 1.4 * np.cos(a)) ** 2 + (y - 1.4 * np.sin(a)) ** 2) / 2.0)
            * np.exp(1j * (a + 0.4 * y))
            for a in ang
        ]
    )
    maps /= np_rss(maps)
    k = np_fft2c(maps * img)
    k += noise * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)) / np.sqrt(2)
    inside = (x / 0.62) ** 2 + (y / 0.77) ** 2 < 1
    return k.astype(np.complex64), img, maps, inside


def sense_combine(kspace: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """``sum_c conj(S_c) * coil_image_c``."""
    return np.sum(np.conj(maps) * np_ifft2c(kspace), axis=0)


def test_numpy_fft_twins_match_torch_fft() -> None:
    x = np.random.default_rng(0).standard_normal((3, 10, 12)) + 1j
    np.testing.assert_allclose(
        np_fft2c(x), fft2c(torch.from_numpy(x)).numpy(), rtol=1e-10, atol=1e-10
    )
    np.testing.assert_allclose(np_ifft2c(np_fft2c(x)), x, atol=1e-12)


@pytest.mark.parametrize("n,coils", [(32, 2), (48, 4)])
def test_espirit_sense_combination_recovers_the_image(n: int, coils: int) -> None:
    k, img, _, inside = phantom(n, coils)
    maps = espirit_maps(k)
    assert maps.shape == k.shape and maps.dtype == np.complex64
    combined = np.abs(sense_combine(k, maps))
    err = np.linalg.norm((combined - np.abs(img))[inside]) / np.linalg.norm(np.abs(img)[inside])
    assert err < 0.02
    np.testing.assert_allclose(np_rss(maps)[inside], 1.0, atol=1e-3)  # unit norm in the object


def test_espirit_maps_span_the_true_maps_with_noise() -> None:
    k, _, true, inside = phantom(48, 4, noise=0.05, seed=1)
    maps = espirit_maps(k)
    align = np.abs(np.sum(np.conj(maps) * true, axis=0))  # both unit norm -> 1 if parallel
    assert np.median(align[inside]) > 0.995
    assert np.percentile(align[inside], 2) > 0.97


def test_espirit_uses_only_the_calibration_region() -> None:
    k, *_ = phantom(48, 3)
    centre_only = np.zeros_like(k)
    c = slice(24 - 8, 24 + 8)
    centre_only[:, c, c] = k[:, c, c]
    np.testing.assert_allclose(
        espirit_maps(k, calib_width=16, noise_adaptive=False),
        espirit_maps(centre_only, calib_width=16, noise_adaptive=False),
        atol=1e-5,
    )


def test_noise_std_estimate() -> None:
    k, *_ = phantom(64, 4, noise=0.03, seed=2)
    assert noise_std(k) == pytest.approx(0.03, rel=0.15)
    assert noise_std(np.zeros_like(k)) == 0.0


def test_jsense_maps_give_the_image_up_to_scale() -> None:
    k, img, _, inside = phantom(32, 3)
    maps = jsense_maps(k)
    assert maps.shape == k.shape and maps.dtype == np.complex64
    assert np.all(np.isfinite(maps))
    # SENSE with these maps: x = sum conj(S) y_c / sum |S|^2
    x = np.abs(sense_combine(k, maps)) / np.maximum(np.sum(np.abs(maps) ** 2, 0), 1e-8)
    a, b = x[inside], np.abs(img)[inside]
    assert np.corrcoef(a, b)[0, 1] > 0.97


def test_estimate_maps_dispatch() -> None:
    k, *_ = phantom(32, 2)
    np.testing.assert_array_equal(estimate_maps(k, "espirit"), espirit_maps(k))
    with pytest.raises(ValueError, match="unknown coil-map method 'bart'"):
        estimate_maps(k, "bart")
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        espirit_maps(k[0])


def test_single_thread_blas_restores_state() -> None:
    with single_thread_blas():
        np.linalg.svd(np.ones((20, 20)))
    np.linalg.svd(np.ones((20, 20)))  # still works afterwards

"""The site's scanner: loop-coil sensitivities, object phase, B1 bias, coil-correlated noise and
the simulated multi-coil k-space of one subject.

Coil images are ``S_c * x`` with Biot-Savart-like loop sensitivities around the FOV and a smooth
complex image phase; k-space is ``F S x`` plus complex Gaussian noise that is correlated across
coils.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from recon.data.synth.phantoms import (
    brain_slice,
    brain_subject,
    grid,
    knee_slice,
    knee_subject,
    smooth_noise,
)
from recon.data.synth.presets import SitePreset, jitter_tissues
from recon.physics.coils import np_fft2c, np_ifft2c, np_rss


def coil_maps(p: SitePreset, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Loop-coil sensitivities ``[C, H, W]`` around the FOV.

    Magnitude follows the on-axis Biot-Savart law of a loop of radius ``a`` at distance ``d``,
    ``(a^2 / (a^2 + d^2))^{3/2}``; phase = random offset + a smooth linear/quadratic term. The
    maps are scaled so that ``RSS(S)`` averages 1 over the central disc of radius 0.5, so the
    preset's ``noise`` is relative to the signal in the middle of the object.
    """
    X, Y, _ = grid(shape)
    n = p.num_coils
    start = rng.uniform(0, 2 * math.pi)
    if p.coil_arc >= 2 * math.pi - 1e-6:
        angles = start + 2 * math.pi * np.arange(n) / n
    else:
        angles = start + p.coil_arc * (np.arange(n) / max(n - 1, 1) - 0.5)
    angles = angles + rng.normal(0, 0.1, n)
    maps = np.empty((n,) + tuple(shape), dtype=np.complex128)
    for c, ang in enumerate(angles):
        r = p.coil_radius * (1 + rng.normal(0, 0.05))
        a = p.coil_size * (1 + rng.normal(0, 0.1))
        cx, cy = r * math.cos(ang), r * math.sin(ang)
        d2 = (X - cx) ** 2 + (Y - cy) ** 2
        mag = (a**2 / (a**2 + d2)) ** 1.5
        tx, ty = -math.sin(ang), math.cos(ang)  # tangent of the ring
        t = (X - cx) * tx + (Y - cy) * ty
        phase = rng.uniform(0, 2 * math.pi) + p.coil_phase * (0.5 * t + 0.15 * rng.normal() * d2)
        maps[c] = mag * np.exp(1j * phase)
    centre = X**2 + Y**2 < 0.25
    return (maps / np_rss(maps)[centre].mean()).astype(np.complex64)


def _object_phase(p: SitePreset, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    X, Y, _ = grid(shape)
    ramp = 0.6 * (rng.normal() * X + rng.normal() * Y)  # small: keeps the DC inside the ACS
    field = smooth_noise(rng, shape, corr_px=max(shape) / 5)
    return rng.uniform(-math.pi, math.pi) + p.image_phase * (ramp + 0.6 * field)


def _noise_factor(p: SitePreset, rng: np.random.Generator) -> np.ndarray:
    """Cholesky factor ``L`` of the coil noise covariance (``sigma`` included), ``[C, C]``."""
    n = p.num_coils
    gains = np.clip(1 + 0.2 * rng.standard_normal(n), 0.6, 1.4)
    i = np.arange(n)
    dist = np.minimum(np.abs(i[:, None] - i[None, :]), n - np.abs(i[:, None] - i[None, :]))
    corr = p.noise_corr ** dist.astype(float)
    cov = (gains[:, None] * gains[None, :]) * corr * p.noise**2
    return np.linalg.cholesky(cov + 1e-12 * np.eye(n))


def synth_volume(
    p: SitePreset,
    n_slices: int,
    rng: np.random.Generator,
    tissues: Mapping[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One subject: ``n_slices`` contiguous slices of ``p.anatomy`` seen by the site's scanner.

    Returns
    -------
    kspace : complex64 ``[S, C, H, W]`` (noisy, times ``p.gain``; transposed if horizontal readout)
    rss : float32 ``[S, H, W]`` RSS of the noisy fully sampled coil images
    info : dict
        Subject parameters (slice positions, lesions, ...), for reports.
    """
    shape = tuple(p.matrix)
    h, w = int(shape[0]), int(shape[1])
    t = dict(tissues) if tissues is not None else jitter_tissues(p, rng)
    X, Y, px = grid((h, w))
    if p.anatomy == "brain":
        subj, draw = brain_subject(rng), brain_slice
        z0, dz = rng.uniform(-0.45, 0.45 - 0.08 * n_slices), rng.uniform(0.05, 0.1)
    elif p.anatomy == "knee":
        subj, draw = knee_subject(rng), knee_slice
        z0, dz = rng.uniform(-0.6, 0.6 - 0.1 * n_slices), rng.uniform(0.06, 0.12)
    else:
        raise ValueError(f"unknown anatomy {p.anatomy!r}; choose 'brain' or 'knee'")
    zs = np.clip(z0 + dz * np.arange(n_slices), -0.9, 0.9)
    maps = coil_maps(p, (h, w), rng)  # [C, H, W], one patient positioning per volume
    bias = np.clip(1 + p.bias * smooth_noise(rng, (h, w), max(h, w) / 3), 0.5, 1.5)
    L = _noise_factor(p, rng)
    c = p.num_coils
    kspace = np.empty((n_slices, c, h, w), dtype=np.complex64)
    for s, z in enumerate(zs):
        mag = draw(X, Y, px, float(z), subj, t, rng, p.texture) * bias
        x = mag * np.exp(1j * _object_phase(p, (h, w), rng))  # [H, W]
        k = np_fft2c(maps * x)  # [C, H, W]
        white = rng.standard_normal((2, c, h * w))
        noise = (L @ (white[0] + 1j * white[1])) / math.sqrt(2)  # [C, H*W]
        kspace[s] = (k + noise.reshape(c, h, w)) * p.gain
    rss = np_rss(np_ifft2c(kspace)).astype(np.float32)  # [S, H, W]
    if p.readout == "horizontal":
        kspace, rss = np.swapaxes(kspace, -1, -2).copy(), np.swapaxes(rss, -1, -2).copy()
    info = {"z": [round(float(z), 4) for z in zs], "lesions": len(subj.get("lesions", []))}
    return kspace, rss, info

"""The site's scanner: receive coils, B1 shading, background phase, correlated coil noise and the
simulated multi-coil k-space of one subject.

Coil sensitivities come from a coil model: circular loops on a cylinder around the body part
(the bore's axis, along ``B0``), their field computed by the Biot-Savart law in 3D at the
slice's pixels, and the receive sensitivity taken as ``B_x - i B_y``, the field's component
rotating against the precession (reciprocity). For an axial brain slice the ring lies in the
image plane; for a coronal knee slice the ring encircles the leg and the sensitivity falls off
along the leg (the image's rows), as with a real knee coil. The noise covariance follows the
coils' overlap. k-space is ``F S x`` plus that noise, optionally with readout oversampling.
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

LOOP_SEGMENTS = 24


def _loop_field(points: np.ndarray, centre: np.ndarray, normal: np.ndarray, a: float) -> np.ndarray:
    """Magnetic field ``[3, N]`` at ``points`` ``[3, N]`` of a unit-current circular loop of
    radius ``a`` (Biot-Savart, :data:`LOOP_SEGMENTS` straight segments; constants dropped)."""
    e1 = np.cross(normal, [0.0, 0.0, 1.0])
    if np.linalg.norm(e1) < 1e-6:
        e1 = np.array([1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    phi = 2 * math.pi * (np.arange(LOOP_SEGMENTS) + 0.5) / LOOP_SEGMENTS
    field = np.zeros_like(points)
    dphi = 2 * math.pi / LOOP_SEGMENTS
    floor = (0.05 * a) ** 2  # no singularity where a pixel touches the wire
    for f in phi:
        seg = centre + a * (math.cos(f) * e1 + math.sin(f) * e2)  # [3]
        dl = a * dphi * (-math.sin(f) * e1 + math.cos(f) * e2)
        r = points - seg[:, None]  # [3, N]
        r3 = (np.sum(r * r, axis=0) + floor) ** 1.5
        field += np.cross(dl[:, None], r, axis=0) / r3
    return field


def coil_maps(
    p: SitePreset,
    shape: tuple[int, int],
    rng: np.random.Generator,
    depth: float = 0.0,
    fov: tuple[int, int] | None = None,
) -> np.ndarray:
    """Receive sensitivities ``[C, H, W]`` of the site's coil array.

    ``p.num_coils`` loops of radius ``coil_size`` on a cylinder of radius ``coil_radius`` around
    the bore's axis, evenly spread over ``coil_arc`` (with small random placement errors: one
    patient positioning). ``depth`` is the slice's offset along the third axis (through-plane:
    along the bore for axial brain slices, front-back for coronal knee slices). Each coil has
    a constant phase offset (spread ``coil_phase``). The maps are scaled so that ``RSS(S)``
    averages 1 over the central disc of radius 0.5 (of ``fov``), so the preset's ``noise`` is
    relative to the signal in the middle of the object.
    """
    X, Y, _ = grid(shape, fov)
    n = p.num_coils
    start = rng.uniform(0, 2 * math.pi)
    if p.coil_arc >= 2 * math.pi - 1e-6:
        angles = start + 2 * math.pi * np.arange(n) / n
    else:
        angles = start + p.coil_arc * (np.arange(n) / max(n - 1, 1) - 0.5)
    angles = angles + rng.normal(0, 0.1, n)
    through = np.full(X.size, float(depth))
    if p.anatomy == "knee":  # coronal: rows run along the leg, i.e. along the bore (z)
        points = np.stack([X.ravel(), through, Y.ravel()])
    else:  # axial: the image plane is across the bore
        points = np.stack([X.ravel(), Y.ravel(), through])
    maps = np.empty((n,) + tuple(shape), dtype=np.complex128)
    for c, ang in enumerate(angles):
        r = p.coil_radius * (1 + rng.normal(0, 0.05))
        a = p.coil_size * (1 + rng.normal(0, 0.1))
        radial = np.array([math.cos(ang), math.sin(ang), 0.0])
        centre = r * radial + np.array([0.0, 0.0, rng.normal(0, 0.05)])
        b = _loop_field(points, centre, radial, a)
        offset = rng.uniform(-math.pi, math.pi) * p.coil_phase / math.pi
        maps[c] = ((b[0] - 1j * b[1]) * np.exp(1j * offset)).reshape(shape)
    centre_disc = X**2 + Y**2 < 0.25
    return (maps / np_rss(maps)[centre_disc].mean()).astype(np.complex64)


def b1_shading(
    p: SitePreset, shape: tuple[int, int], rng: np.random.Generator, fov: tuple[int, int] | None
) -> np.ndarray:
    """Smooth transmit (B1) shading ``[H, W]`` around 1: central brightening (the dielectric
    effect, stronger at 3T through ``p.bias``) plus a slow random variation."""
    X, Y, _ = grid(shape, fov)
    bump = np.exp(-(X**2 + Y**2) / (2 * 0.45**2))
    slow = smooth_noise(rng, shape, max(shape) / 3)
    return np.clip(1 + p.bias * (1.5 * (bump - bump.mean()) + 0.6 * slow), 0.5, 1.5)


def background_phase(
    p: SitePreset, shape: tuple[int, int], rng: np.random.Generator, fov: tuple[int, int] | None
) -> np.ndarray:
    """Smooth object phase ``[H, W]`` (radians): a random constant, a small linear ramp (kept
    small so the DC stays inside the ACS) and a smooth field (B0 inhomogeneity, eddy currents)."""
    X, Y, _ = grid(shape, fov)
    ramp = 0.6 * (rng.normal() * X + rng.normal() * Y)
    field = smooth_noise(rng, shape, corr_px=max(shape) / 5)
    return rng.uniform(-math.pi, math.pi) + p.image_phase * (ramp + 0.6 * field)


def noise_factor(p: SitePreset, maps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cholesky factor ``L`` of the coil noise covariance ``Psi`` (``sigma`` included), ``[C, C]``.

    ``Psi = sigma^2 G ((1 - c) I + c O) G``: per-coil gains ``G`` (preamplifiers), and the
    coils' normalised sensitivity overlap ``O_ij = <S_i, S_j> / (|S_i| |S_j|)`` (sample noise seen
    by both coils; neighbouring loops share most) weighted by ``c = p.noise_corr``. Both terms are
    positive semi-definite, so ``Psi`` is a valid covariance.
    """
    n = p.num_coils
    gains = np.clip(1 + 0.2 * rng.standard_normal(n), 0.6, 1.4)
    s = maps.reshape(n, -1).astype(np.complex128)
    gram = s @ s.conj().T
    d = np.sqrt(np.real(np.diag(gram)))
    overlap = gram / np.outer(d, d)
    c = float(np.clip(p.noise_corr, 0.0, 1.0))
    cov = ((1 - c) * np.eye(n) + c * overlap) * np.outer(gains, gains) * p.noise**2
    return np.linalg.cholesky(cov + 1e-12 * p.noise**2 * np.eye(n))


def synth_volume(
    p: SitePreset,
    n_slices: int,
    rng: np.random.Generator,
    tissues: Mapping[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One subject: ``n_slices`` contiguous slices of ``p.anatomy`` seen by the site's scanner.

    With ``p.readout_os > 1`` the phantom, coils and noise cover the oversampled field of view
    along ``H`` (``p.encoded_height`` rows); ``rss`` is then cropped to ``p.matrix`` (fastMRI's
    ``reconstruction_rss``).

    Returns
    -------
    kspace : complex64 ``[S, C, H_enc, W]`` (noisy, times ``p.gain``; transposed if horizontal)
    rss : float32 ``[S, H, W]`` RSS of the noisy fully sampled coil images
    info : dict
        Subject parameters (slice positions, lesions, ...), for reports.
    """
    h, w = int(p.matrix[0]), int(p.matrix[1])
    fov = (h, w)
    shape = (p.encoded_height, w)
    t = dict(tissues) if tissues is not None else jitter_tissues(p, rng)
    X, Y, px = grid(shape, fov)
    if p.anatomy == "brain":
        subj, draw = brain_subject(rng), brain_slice
        z0, dz = rng.uniform(-0.45, 0.45 - 0.08 * n_slices), rng.uniform(0.05, 0.1)
        depth_scale = 0.6  # axial slices move along the head coil
    elif p.anatomy == "knee":
        subj, draw = knee_subject(rng), knee_slice
        z0, dz = rng.uniform(-0.6, 0.6 - 0.1 * n_slices), rng.uniform(0.06, 0.12)
        depth_scale = 0.35  # coronal slices move front to back inside the knee coil
    else:
        raise ValueError(f"unknown anatomy {p.anatomy!r}; choose 'brain' or 'knee'")
    zs = np.clip(z0 + dz * np.arange(n_slices), -0.9, 0.9)
    coil_seed = int(rng.integers(2**62))  # one array placement per volume, slices move in it
    maps0 = coil_maps(p, shape, np.random.default_rng(coil_seed), depth_scale * float(zs[0]), fov)
    bias = b1_shading(p, shape, rng, fov)
    L = noise_factor(p, maps0, rng)
    c = p.num_coils
    kspace = np.empty((n_slices, c) + shape, dtype=np.complex64)
    for s, z in enumerate(zs):
        maps = coil_maps(p, shape, np.random.default_rng(coil_seed), depth_scale * float(z), fov)
        mag = draw(X, Y, px, float(z), subj, t, rng, p.texture) * bias
        x = mag * np.exp(1j * background_phase(p, shape, rng, fov))  # [H, W]
        k = np_fft2c(maps * x)  # [C, H, W]
        white = rng.standard_normal((2, c, shape[0] * shape[1]))
        noise = (L @ (white[0] + 1j * white[1])) / math.sqrt(2)  # [C, H*W]
        kspace[s] = (k + noise.reshape((c,) + shape)) * p.gain
    images = np_ifft2c(kspace)
    if shape[0] != h:
        top = (shape[0] - h) // 2
        images = images[..., top : top + h, :]
    rss = np_rss(images).astype(np.float32)  # [S, H, W]
    if p.readout == "horizontal":
        kspace, rss = np.swapaxes(kspace, -1, -2).copy(), np.swapaxes(rss, -1, -2).copy()
    info = {"z": [round(float(z), 4) for z in zs], "lesions": len(subj.get("lesions", []))}
    return kspace, rss, info

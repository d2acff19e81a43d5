"""Synthetic multi-site, multi-coil MRI data in the fastMRI layout (the project's default data).

Each site mimics one row of the client table of Levac et al. 2023 (Table 1: anatomy x contrast x field
strength) with its own scanner: coil count and geometry, noise level, matrix size, intensity
jitter, B1 bias and raw-data gain. Slices come from anatomical phantoms with smooth random
deformations and textures:

* brain (axial): scalp, skull, CSF, cortex with gyri and sulci, white matter, interhemispheric
  fissure, deep grey nuclei, lateral ventricles, random 3D lesions (T1 / T1POST / T2 / FLAIR);
* knee (coronal): subcutaneous fat, striated muscle, femur (condyles, notch) and tibia (plateau)
  with cortex and trabecular marrow, articular cartilage, joint fluid, menisci, cruciate and
  collateral ligaments, fibula, random bone bruises (PD / PDFS).

Coil images are ``S_c * x`` with Biot-Savart-like loop sensitivities around the FOV and a smooth
complex image phase; k-space is ``F S x`` plus complex Gaussian noise that is correlated across
coils. Everything is deterministic given ``seed`` (a site's data do not depend on how many other
sites are generated).

Layout written by :func:`generate_sites`::

    out_dir/site{k}/site.json
    out_dir/site{k}/{train,val,test}/site{k}_vol{v:03d}.h5   kspace [S, C, H, W] complex64,
                                                             reconstruction_rss [S, H, W]
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from recon.data.h5io import SPLITS, write_volume
from recon.fileio import atomic_write_json
from recon.physics.coils import np_fft2c, np_ifft2c, np_rss

GENERATOR = "fedunroll.synth/1"

# Tissue intensities (arbitrary units, ~1 = brightest tissue) per contrast.
TISSUES: dict[str, dict[str, float]] = {
    # brain: T1 bright WM, dark CSF; T2 bright CSF; FLAIR dark CSF, bright lesions
    "T1": dict(fat=0.95, bone=0.03, csf=0.12, gm=0.50, wm=0.76, deep=0.57, lesion=0.30, rim=0.45),
    "T1POST": dict(fat=0.9, bone=0.03, csf=0.14, gm=0.52, wm=0.74, deep=0.58, lesion=0.35, rim=1.0),
    "T2": dict(fat=0.60, bone=0.03, csf=1.00, gm=0.60, wm=0.42, deep=0.50, lesion=0.85, rim=0.85),
    "FLAIR": dict(fat=0.55, bone=0.03, csf=0.06, gm=0.62, wm=0.45, deep=0.55, lesion=1.0, rim=1.0),
    # knee: PD bright fat and marrow; PDFS fat suppressed, bright fluid and edema
    "PD": dict(
        fat=0.95,
        marrow=0.85,
        muscle=0.32,
        cartilage=0.55,
        fluid=0.65,
        cortex=0.03,
        meniscus=0.05,
        ligament=0.07,
        edema=0.60,
    ),  # fmt: skip
    "PDFS": dict(
        fat=0.10,
        marrow=0.12,
        muscle=0.30,
        cartilage=0.50,
        fluid=0.95,
        cortex=0.03,
        meniscus=0.04,
        ligament=0.06,
        edema=0.70,
    ),  # fmt: skip
}

ACQUISITION = {
    "T1": "AXT1PRE",
    "T1POST": "AXT1POST",
    "T2": "AXT2",
    "FLAIR": "AXFLAIR",
    "PD": "CORPD_FBK",
    "PDFS": "CORPDFS_FBK",
}


@dataclass(frozen=True)
class SitePreset:
    """Acquisition and scanner parameters of one synthetic site.

    Attributes
    ----------
    name : str
        Preset id, e.g. ``'brain_t1_3t'``.
    anatomy : {'brain', 'knee'}
    contrast : {'T1', 'T1POST', 'T2', 'FLAIR', 'PD', 'PDFS'}
    field_strength : float
        Tesla (1.5 or 3.0); drives noise and B1 bias.
    num_coils : int
    matrix : (int, int)
        ``(H, W)``; ``H`` readout, ``W`` phase encode.
    noise : float
        k-space noise std per coil, in units of the brightest tissue (image domain, ortho FFT).
    noise_corr : float
        Correlation of the noise between neighbouring coils.
    coil_radius, coil_size : float
        Ring radius of the array and loop radius (FOV half-width = 1).
    coil_arc : float
        Angular coverage of the array in radians (``2 pi`` = full ring).
    coil_phase : float
        Spatial phase variation of the coil maps (radians across the FOV).
    image_phase : float
        Amplitude of the smooth object phase (radians).
    bias : float
        Amplitude of the smooth transmit (B1) intensity bias.
    texture : float
        Amplitude of the tissue texture.
    intensity_jitter : float
        Relative site-specific perturbation of the tissue intensities (scanner/protocol).
    gain : float
        Raw-data scale of the written k-space (normalisation removes it).
    readout : {'vertical', 'horizontal'}
        ``'horizontal'`` stores k-space transposed (readout along ``W``), like the Stanford
        abdomen data of Levac et al. 2023; read it with ``SiteDataset(rotate=True)``.
    """

    name: str
    anatomy: str
    contrast: str
    field_strength: float
    num_coils: int
    matrix: tuple[int, int]
    noise: float
    noise_corr: float = 0.15
    coil_radius: float = 1.25
    coil_size: float = 0.6
    coil_arc: float = 2 * math.pi
    coil_phase: float = 1.0
    image_phase: float = 0.8
    bias: float = 0.05
    texture: float = 0.05
    intensity_jitter: float = 0.04
    gain: float = 1e-4
    readout: str = "vertical"

    @property
    def acquisition(self) -> str:
        return ACQUISITION[self.contrast]


def site_presets() -> list[SitePreset]:
    """The 12 site distributions of Levac et al. 2023, Table 1 (knee PD/PDFS, brain T1/T1POST/T2/FLAIR at
    1.5T and 3T), ordered so that any first ``n`` sites are as different as possible.

    ``generate_sites(n_sites=4)`` uses the first four: brain T1 3T 8 coils, knee PD 1.5T 4 coils,
    brain FLAIR 1.5T 6 coils, knee PDFS 3T 3 coils.
    """
    tau = 2 * math.pi
    return [
        SitePreset("brain_t1_3t", "brain", "T1", 3.0, 8, (64, 64), noise=0.012, bias=0.12,
                   coil_radius=1.2, coil_size=0.55, gain=3e-5),
        SitePreset("knee_pd_15t", "knee", "PD", 1.5, 4, (64, 48), noise=0.03, bias=0.04,
                   coil_radius=1.05, coil_size=0.7, coil_phase=0.6, gain=2e-4),
        SitePreset("brain_flair_15t", "brain", "FLAIR", 1.5, 6, (48, 48), noise=0.026,
                   bias=0.05, coil_radius=1.3, coil_size=0.65, coil_arc=0.8 * tau, gain=8e-5),
        SitePreset("knee_pdfs_3t", "knee", "PDFS", 3.0, 3, (80, 64), noise=0.02, bias=0.1,
                   coil_radius=1.0, coil_size=0.8, coil_phase=1.5, noise_corr=0.3, gain=5e-4),
        SitePreset("brain_t2_3t", "brain", "T2", 3.0, 8, (80, 80), noise=0.014, bias=0.12,
                   coil_radius=1.15, coil_size=0.5, gain=4e-5),
        SitePreset("knee_pdfs_15t", "knee", "PDFS", 1.5, 4, (64, 48), noise=0.035, bias=0.04,
                   coil_radius=1.05, coil_size=0.7, gain=1e-4),
        SitePreset("brain_t1post_15t", "brain", "T1POST", 1.5, 4, (64, 64), noise=0.025,
                   bias=0.05, coil_radius=1.3, coil_size=0.8, gain=6e-5),
        SitePreset("knee_pd_3t", "knee", "PD", 3.0, 8, (80, 64), noise=0.015, bias=0.1,
                   coil_radius=1.0, coil_size=0.5, coil_phase=1.4, gain=3e-4),
        SitePreset("brain_t2_15t", "brain", "T2", 1.5, 5, (64, 64), noise=0.028, bias=0.05,
                   coil_radius=1.25, coil_size=0.7, coil_arc=0.75 * tau, gain=9e-5),
        SitePreset("brain_flair_3t", "brain", "FLAIR", 3.0, 7, (64, 64), noise=0.015,
                   bias=0.12, coil_radius=1.2, coil_size=0.55, gain=2e-5),
        SitePreset("brain_t1post_3t", "brain", "T1POST", 3.0, 6, (80, 80), noise=0.014,
                   bias=0.12, coil_radius=1.2, coil_size=0.6, gain=5e-5),
        SitePreset("brain_t1_15t", "brain", "T1", 1.5, 2, (48, 48), noise=0.028, bias=0.04,
                   coil_radius=1.3, coil_size=0.9, coil_arc=0.5 * tau, gain=1e-4),
    ]  # fmt: skip


def get_preset(name: str) -> SitePreset:
    """A preset of :func:`site_presets` by name."""
    for p in site_presets():
        if p.name == name:
            return p
    names = ", ".join(p.name for p in site_presets())
    raise ValueError(f"unknown site preset {name!r}; choose one of {names}")


# ----------------------------------------------------------------------------------------------
# Building blocks


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """Pixel-centre coordinates with isotropic pixels; the longer side spans [-1, 1)."""
    h, w = shape
    m = max(h, w)
    px = 2.0 / m
    y = (np.arange(h) - h / 2 + 0.5) * px
    x = (np.arange(w) - w / 2 + 0.5) * px
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return xx, yy, px


def smooth_noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    corr_px: float,
    aniso: tuple[float, float] = (1, 1),
) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``corr_px`` pixels.

    ``aniso = (ay, ax)`` stretches the correlation along y / x (e.g. muscle striation).
    """
    h, w = shape
    white = rng.standard_normal(shape)
    ky = np.fft.fftfreq(h)[:, None] * aniso[0]
    kx = np.fft.fftfreq(w)[None, :] * aniso[1]
    filt = np.exp(-2 * (math.pi * corr_px) ** 2 * (ky**2 + kx**2))
    f = np.fft.ifft2(np.fft.fft2(white) * filt).real
    sd = f.std()
    return (f - f.mean()) / sd if sd > 0 else f


def _harmonics(
    rng: np.random.Generator, ks: Sequence[int], amp: float
) -> list[tuple[int, float, float]]:
    return [
        (int(k), float(rng.uniform(0.3, 1.0) * amp), float(rng.uniform(0, 2 * math.pi))) for k in ks
    ]


def blob(
    X: np.ndarray,
    Y: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b: float,
    edge: float,
    theta: float = 0.0,
    power: float = 2.0,
    harm: Sequence[tuple[int, float, float]] = (),
    grow: float = 0.0,
) -> np.ndarray:
    """Soft membership in [0, 1] of a (super-)ellipse with a star-shaped Fourier boundary.

    ``power`` > 2 gives rounded rectangles; ``harm`` = ``[(k, amp, phase)]`` modulates the radius
    by ``1 + sum amp cos(k phi + phase)``; ``grow`` dilates (>0) or erodes (<0) by about that
    distance. The edge is a tanh ramp of width ``edge`` (anti-aliased at the pixel scale).
    """
    c, s = math.cos(theta), math.sin(theta)
    u = ((X - cx) * c + (Y - cy) * s) / a
    v = (-(X - cx) * s + (Y - cy) * c) / b
    rho = (np.abs(u) ** power + np.abs(v) ** power) ** (1.0 / power)
    if harm:
        phi = np.arctan2(v, u)
        mod = np.ones_like(rho)
        for k, amp, ph in harm:
            mod += amp * np.cos(k * phi + ph)
        rho = rho / mod
    d = (1.0 - rho) * min(a, b) + grow
    return 0.5 * (1.0 + np.tanh(d / edge))


def _paint(img: np.ndarray, m: np.ndarray, value: float | np.ndarray) -> np.ndarray:
    """Painter's algorithm: ``img <- (1 - m) img + m value``."""
    return img * (1.0 - m) + m * value


def coil_maps(p: SitePreset, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Loop-coil sensitivities ``[C, H, W]`` around the FOV.

    Magnitude follows the on-axis Biot-Savart law of a loop of radius ``a`` at distance ``d``,
    ``(a^2 / (a^2 + d^2))^{3/2}``; phase = random offset + a smooth linear/quadratic term. The
    maps are scaled so that ``RSS(S)`` averages 1 over the central disc of radius 0.5, so the
    preset's ``noise`` is relative to the signal in the middle of the object.
    """
    X, Y, _ = _grid(shape)
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
    X, Y, _ = _grid(shape)
    ramp = 0.6 * (rng.normal() * X + rng.normal() * Y)  # small: keeps the DC inside the ACS
    field = smooth_noise(rng, shape, corr_px=max(shape) / 5)
    return rng.uniform(-math.pi, math.pi) + p.image_phase * (ramp + 0.6 * field)


def _jitter(p: SitePreset, rng: np.random.Generator) -> dict[str, float]:
    base = TISSUES[p.contrast]
    return {k: float(v * (1 + rng.normal(0, p.intensity_jitter))) for k, v in base.items()}


# ----------------------------------------------------------------------------------------------
# Phantoms


def _brain_subject(rng: np.random.Generator) -> dict[str, Any]:
    n_les = int(rng.integers(0, 5))
    lesions = [
        (
            float(rng.uniform(-0.35, 0.35)),
            float(rng.uniform(-0.45, 0.45)),
            float(rng.uniform(-0.4, 0.6)),
            float(rng.uniform(0.04, 0.11)),
            bool(rng.random() < 0.5),  # enhancing in T1POST
        )
        for _ in range(n_les)
    ]
    return {
        "scale": float(rng.uniform(0.88, 1.02)),
        "ax": float(rng.uniform(0.72, 0.8)),
        "ay": float(rng.uniform(0.86, 0.94)),
        "tilt": float(rng.normal(0, 0.08)),
        "shift": (float(rng.normal(0, 0.03)), float(rng.normal(0, 0.03))),
        "harm": _harmonics(rng, (2, 3), 0.04) + _harmonics(rng, (4, 5, 6), 0.008),
        "gyri": int(rng.integers(20, 30)),
        "vent": float(rng.uniform(0.7, 1.5)),
        "cortex": float(rng.uniform(0.07, 0.1)),
        "lesions": lesions,
    }


def _brain(
    X: np.ndarray, Y: np.ndarray, px: float, z: float, subj: dict[str, Any], t: dict[str, float],
    rng: np.random.Generator, texture: float,
) -> np.ndarray:  # fmt: skip
    """Axial brain slice at height ``z`` in [-1, 1] (magnitude, [H, W])."""
    e = 0.6 * px
    shape = X.shape
    s = subj["scale"] * math.sqrt(max(0.15, 1 - ((z - 0.05) / 1.15) ** 2))
    A, B = subj["ax"] * s, subj["ay"] * s
    h = subj["harm"]
    th = subj["tilt"]
    u = X * math.cos(th) + Y * math.sin(th) - subj["shift"][0]  # head frame
    v = -X * math.sin(th) + Y * math.cos(th) - subj["shift"][1]
    tex = smooth_noise(rng, shape, 1.2)
    img = np.zeros(shape)
    img = _paint(img, blob(u, v, 0, 0, A, B, e, harm=h), t["fat"] * (1 + 2 * texture * tex))
    img = _paint(img, blob(u, v, 0, 0, A, B, e, harm=h, grow=-0.045), t["bone"])
    img = _paint(img, blob(u, v, 0, 0, A, B, e, harm=h, grow=-0.075), t["csf"])
    brain = blob(u, v, 0, 0, A, B, e, harm=h, grow=-0.095)
    img = _paint(img, brain, t["gm"])
    # gyri: white-matter fingers where cos(n phi + psi) > 0; sulci (CSF) in the troughs between
    n = subj["gyri"]
    phi = np.arctan2(v / B, u / A)
    wave = n * phi + 2.5 * smooth_noise(rng, shape, max(shape) / 7)
    gyr = np.cos(wave)
    depth = subj["cortex"] * s
    wm = blob(u, v, 0, 0, A, B, e, harm=h, grow=-0.095 - depth + 0.6 * depth * gyr)
    img = _paint(img, wm, t["wm"])
    width = 0.9 * px * n / (0.8 * (A + B) / 2)  # about one pixel wide at the cortex
    sulci = np.exp(-((np.sin(wave) / width) ** 2)) * (gyr < 0) * np.clip(brain - wm, 0, 1)
    sulci *= np.clip(0.75 + 0.35 * smooth_noise(rng, shape, max(shape) / 10), 0.2, 1.0)
    img = _paint(img, 0.85 * sulci, t["csf"])
    # interhemispheric fissure (front and back)
    fissure = np.exp(-((u / (0.9 * px)) ** 2)) * (np.abs(v) > 0.35 * B) * brain
    img = _paint(img, 0.9 * fissure, t["csf"])
    if -0.45 < z < 0.35:  # basal ganglia and thalami
        for sx in (-1, 1):
            img = _paint(
                img, blob(u, v, sx * 0.2 * s, -0.05, 0.06 * s, 0.12 * s, e, sx * 0.3), t["deep"]
            )
            img = _paint(img, blob(u, v, sx * 0.085 * s, 0.12, 0.065 * s, 0.08 * s, e), t["deep"])
    if -0.35 < z < 0.5:  # lateral ventricles (butterfly), bigger in the middle
        vs = subj["vent"] * math.sqrt(max(0.0, 1 - ((z - 0.1) / 0.45) ** 2))
        if vs > 0.1:
            for sx in (-1, 1):
                m = blob(u, v, sx * 0.085 * s, -0.05, 0.04 * vs * s + px, 0.2 * s, e, -sx * 0.18)
                img = _paint(img, m, t["csf"])
                if -0.1 < z < 0.3:  # occipital horns
                    m = blob(u, v, sx * 0.13 * s, 0.22, 0.03 * vs * s + px, 0.08 * s, e, sx * 0.5)
                    img = _paint(img, m, t["csf"])
    for lx, ly, lz, lr, enh in subj["lesions"]:
        r2 = lr**2 - (z - lz) ** 2
        if r2 <= (1.2 * px) ** 2:
            continue
        r = math.sqrt(r2)
        les = blob(u, v, lx * A, ly * B, r, 0.8 * r, e, harm=_harmonics(rng, (3, 4), 0.15))
        les = les * brain
        if t["rim"] != t["lesion"] and enh:  # ring enhancement (T1POST)
            img = _paint(img, les, t["rim"])
            inner = blob(
                u, v, lx * A, ly * B, max(r - 1.5 * px, px), 0.8 * max(r - 1.5 * px, px), e
            )
            img = _paint(img, inner * brain, t["lesion"])
        else:
            img = _paint(img, les, t["lesion"])
    return img * (1 + texture * tex * (img > 0.05))


def _knee_subject(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "scale": float(rng.uniform(0.85, 1.05)),
        "tilt": float(rng.normal(0, 0.07)),
        "shift": (float(rng.normal(0, 0.03)), float(rng.normal(0, 0.04))),
        "harm": _harmonics(rng, (2, 3, 5), 0.03),
        "condyle": float(rng.uniform(0.17, 0.22)),
        "notch": float(rng.uniform(0.05, 0.08)),
        "gap": float(rng.uniform(0.05, 0.08)),
        "effusion": float(rng.uniform(0.0, 1.0)),
        "bruise": (
            (
                float(rng.uniform(-0.3, 0.3)),
                float(rng.choice([-0.25, 0.3])),
                float(rng.uniform(0.05, 0.12)),
            )
            if rng.random() < 0.4
            else None
        ),
        "fibula": bool(rng.random() < 0.6),
    }


def _bone(
    img: np.ndarray, parts: list[np.ndarray], parts_inner: list[np.ndarray], t: dict[str, float],
    trab: np.ndarray, texture: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Paint a bone as cortex (outer union) then marrow (inner union); returns (img, bone mask)."""
    outer = np.max(np.stack(parts), axis=0)
    inner = np.max(np.stack(parts_inner), axis=0)
    img = _paint(img, outer, t["cortex"])
    img = _paint(img, inner, t["marrow"] * (1 + 1.5 * texture * trab))
    return img, outer


def _knee(
    X: np.ndarray, Y: np.ndarray, px: float, z: float, subj: dict[str, Any], t: dict[str, float],
    rng: np.random.Generator, texture: float,
) -> np.ndarray:  # fmt: skip
    """Coronal knee slice at depth ``z`` in [-1, 1] (anterior -> posterior), magnitude [H, W]."""
    e = 0.6 * px
    shape = X.shape
    sc = subj["scale"]
    th = subj["tilt"]
    u = X * math.cos(th) + Y * math.sin(th) - subj["shift"][0]
    v = -X * math.sin(th) + Y * math.cos(th) - subj["shift"][1]
    wz = math.sqrt(max(0.2, 1 - 0.6 * z**2))  # bones narrower at the front and back
    tex = smooth_noise(rng, shape, 1.2)
    stri = smooth_noise(rng, shape, 1.0, aniso=(1.6, 0.25))  # fibres along the leg
    trab = smooth_noise(rng, shape, 0.8)
    img = np.zeros(shape)
    h = subj["harm"]
    img = _paint(img, blob(u, v, 0, 0, 0.68 * sc, 1.8, e, harm=h), t["fat"] * (1 + texture * tex))
    img = _paint(
        img, blob(u, v, 0, 0, 0.6 * sc, 1.75, e, harm=h), t["muscle"] * (1 + 3 * texture * stri)
    )
    # joint fluid band (effusion), painted before the bones so that only the gaps keep it
    gap = subj["gap"]
    fl = blob(u, v, 0, 0.02, 0.45 * sc * wz, 0.05 + 0.07 * subj["effusion"], e)
    img = _paint(img, fl, t["fluid"])
    c = subj["condyle"] * sc
    cx = 0.2 * sc * wz
    fy = -0.01 - gap / 2  # bottom of the femoral condyles
    femur = [
        blob(u, v, 0, -1.0, 0.23 * sc, 0.7, e, power=3),
        blob(u, v, 0, fy - 0.42, 0.41 * sc * wz, 0.42, e, power=2.2),
    ] + [blob(u, v, sx * cx, fy - c, c * wz, c, e) for sx in (-1, 1)]
    ty = 0.01 + gap / 2  # top of the tibial plateau
    tibia = [
        blob(u, v, 0, ty + 0.24, 0.44 * sc * wz, 0.24, e, power=3.5),
        blob(u, v, 0, 1.0, 0.24 * sc, 0.7, e, power=3),
        blob(u, v, 0, ty + 0.01, 0.05 * sc, 0.04, e),  # tibial spines
    ]
    # articular cartilage: shells of the bones near the joint line
    win = np.exp(-(((v - 0.01) / 0.17) ** 2))
    thick = 0.03 + 0.01 * wz
    img = _cartilage(img, u, v, e, sc, wz, fy, ty, c, cx, thick, win, t)
    notch = blob(u, v, 0, fy - 0.06, subj["notch"] * sc, 0.13, e)
    # femur: cortex then marrow (eroded by the cortical thickness), minus the notch
    femur_in = [
        blob(u, v, 0, -1.0, 0.23 * sc, 0.7, e, power=3, grow=-0.035),
        blob(u, v, 0, fy - 0.42, 0.41 * sc * wz, 0.42, e, power=2.2, grow=-0.02),
    ] + [blob(u, v, sx * cx, fy - c, c * wz, c, e, grow=-0.02) for sx in (-1, 1)]
    femur = [p * (1 - notch) for p in femur]
    femur_in = [p * (1 - notch) for p in femur_in]
    img, _ = _bone(img, femur, femur_in, t, trab, texture)
    tibia_in = [
        blob(u, v, 0, ty + 0.24, 0.44 * sc * wz, 0.24, e, power=3.5, grow=-0.02),
        blob(u, v, 0, 1.0, 0.24 * sc, 0.7, e, power=3, grow=-0.035),
        blob(u, v, 0, ty + 0.01, 0.05 * sc, 0.04, e, grow=-0.015),
    ]
    img, _ = _bone(img, tibia, tibia_in, t, trab, texture)
    if subj["fibula"] and z > -0.2:
        fx = 0.46 * sc
        img, _ = _bone(
            img,
            [blob(u, v, fx, ty + 0.45, 0.08 * sc, 0.3, e)],
            [blob(u, v, fx, ty + 0.45, 0.08 * sc, 0.3, e, grow=-0.025)],
            t,
            trab,
            texture,
        )
    if subj["bruise"] is not None:
        bx, by, br = subj["bruise"]
        bone_in = np.max(np.stack(femur_in + tibia_in), axis=0)
        m = blob(u, v, bx, by, br, 0.7 * br, e, harm=_harmonics(rng, (3, 5), 0.2)) * bone_in
        img = _paint(img, m, t["edema"])
    for sx in (-1, 1):  # menisci (dark wedges) and collateral ligaments
        img = _paint(
            img, blob(u, v, sx * 0.41 * sc * wz, 0.0, 0.08 * sc, 0.035, e, sx * 0.1), t["meniscus"]
        )
        img = _paint(
            img, blob(u, v, sx * 0.5 * sc * wz, 0.02, 0.018, 0.22, e, -sx * 0.05), t["ligament"]
        )
    if abs(z) < 0.5:  # cruciate ligament crossing the notch
        img = _paint(
            img,
            blob(u, v, 0.01, fy + 0.02, 0.022, 0.13, e, 0.45 * np.sign(z + 1e-3)),
            t["ligament"],
        )
    return img * (1 + 0.5 * texture * tex * (img > 0.05))


def _cartilage(
    img: np.ndarray, u: np.ndarray, v: np.ndarray, e: float, sc: float, wz: float, fy: float,
    ty: float, c: float, cx: float, thick: float, win: np.ndarray, t: dict[str, float],
) -> np.ndarray:  # fmt: skip
    """Articular cartilage: the bones grown by ``thick``, kept near the joint line."""
    grown = [blob(u, v, sx * cx, fy - c, c * wz, c, e, grow=thick) for sx in (-1, 1)]
    grown.append(blob(u, v, 0, ty + 0.24, 0.44 * sc * wz, 0.24, e, power=3.5, grow=thick))
    m = np.max(np.stack(grown), axis=0) * win
    return _paint(img, m, t["cartilage"])


# ----------------------------------------------------------------------------------------------
# Volumes and sites

_HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <acquisitionSystemInformation>
    <systemFieldStrength_T>{field}</systemFieldStrength_T>
    <receiverChannels>{coils}</receiverChannels>
    <institutionName>{site}</institutionName>
  </acquisitionSystemInformation>
  <encoding>
    <encodedSpace><matrixSize><x>{h}</x><y>{w}</y><z>1</z></matrixSize></encodedSpace>
    <reconSpace><matrixSize><x>{h}</x><y>{w}</y><z>1</z></matrixSize></reconSpace>
  </encoding>
  <measurementInformation><protocolName>{acq} (synthetic)</protocolName></measurementInformation>
</ismrmrdHeader>
"""


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
    t = dict(tissues) if tissues is not None else _jitter(p, rng)
    X, Y, px = _grid((h, w))
    if p.anatomy == "brain":
        subj, draw = _brain_subject(rng), _brain
        z0, dz = rng.uniform(-0.45, 0.45 - 0.08 * n_slices), rng.uniform(0.05, 0.1)
    elif p.anatomy == "knee":
        subj, draw = _knee_subject(rng), _knee
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


def _volume_sizes(n_slices: int, slices_per_volume: int) -> list[int]:
    n_vol = max(1, math.ceil(n_slices / max(1, slices_per_volume)))
    if n_vol < 3 <= n_slices:
        n_vol = 3
    return [len(a) for a in np.array_split(np.arange(n_slices), n_vol)]


def _split_volumes(n_vol: int) -> list[str]:
    """Volume -> split (70/15/15 by volume, so no subject is in two splits)."""
    n_eval = max(1, int(0.15 * n_vol)) if n_vol >= 3 else 0
    n_train = n_vol - 2 * n_eval
    return ["train"] * n_train + ["val"] * n_eval + ["test"] * n_eval


def _prepare_dir(site_dir: Path) -> None:
    if site_dir.exists():
        meta = site_dir / "site.json"
        ours = False
        if meta.is_file():
            try:
                ours = (
                    json.loads(meta.read_text()).get("generator", "").startswith("fedunroll.synth")
                )
            except (OSError, ValueError):
                ours = False
        if ours:
            shutil.rmtree(site_dir)
        elif any(site_dir.iterdir()):
            raise FileExistsError(f"{site_dir} exists, is not empty and was not made by synth")
    site_dir.mkdir(parents=True, exist_ok=True)


def generate_site(
    site_dir: str | os.PathLike[str],
    preset: SitePreset,
    n_slices: int = 50,
    seed: int = 0,
    site_index: int = 0,
    slices_per_volume: int = 5,
    iid: bool = False,
) -> dict[str, Any]:
    """Write one site (see the module docstring) and return its ``site.json`` content."""
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    root = Path(site_dir)
    _prepare_dir(root)
    scanner = np.random.default_rng([seed, 7919, *preset.name.encode()])  # same for IID sites
    tissues = _jitter(preset, scanner)
    sizes = _volume_sizes(n_slices, slices_per_volume)
    splits = _split_volumes(len(sizes))
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    for v, (n, split) in enumerate(zip(sizes, splits)):
        rng = np.random.default_rng([seed, site_index, v])
        kspace, rss, _ = synth_volume(preset, n, rng, tissues)
        name = f"{root.name}_vol{v:03d}.h5"
        h, w = preset.matrix
        write_volume(
            root / split / name,
            kspace,
            rss=rss,
            attrs={
                "acquisition": preset.acquisition,
                "site": root.name,
                "field_strength": preset.field_strength,
                "anatomy": preset.anatomy,
                "contrast": preset.contrast,
                "patient_id": f"{root.name}-{v:03d}",
                "readout": preset.readout,
                "synthetic": True,
                "generator": GENERATOR,
            },
            header=_HEADER.format(
                field=preset.field_strength,
                coils=preset.num_coils,
                site=root.name,
                h=h,
                w=w,
                acq=preset.acquisition,
            ),
        )
        files[split].append(f"{split}/{name}")
        counts[split] += n
    info: dict[str, Any] = {
        "name": root.name,
        "generator": GENERATOR,
        "seed": seed,
        "site_index": site_index,
        "iid": iid,
        "preset": asdict(preset),
        "acquisition": preset.acquisition,
        "rotate": preset.readout == "horizontal",
        "tissues": {k: round(v, 4) for k, v in tissues.items()},
        "slices": counts,
        "files": files,
    }
    atomic_write_json(root / "site.json", info)
    return info


def generate_sites(
    out_dir: str | os.PathLike[str],
    n_sites: int = 4,
    n_slices: int = 50,
    seed: int = 0,
    matrix: int | tuple[int, int] | None = None,
    iid: bool = False,
    iid_preset: str = "knee_pdfs_15t",
    slices_per_volume: int = 5,
    presets: Sequence[SitePreset] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Write ``n_sites`` synthetic hospitals to ``out_dir/site{k}``.

    Parameters
    ----------
    n_sites : int
        Number of sites; non-IID sites cycle through :func:`site_presets` (Table 1 of Levac et al. 2023).
    n_slices : int
        Slices per site over all splits (volumes of ``slices_per_volume`` slices, split 70/15/15
        by volume).
    seed : int
        Everything is a deterministic function of ``seed`` (and the site index).
    matrix : int or (int, int), optional
        Override every site's matrix ``(H, W)`` (e.g. 32 for tests); default: the presets' 48-80.
    iid : bool
        One distribution (``iid_preset``; the paper's site 2, knee PDFS 1.5T) split over all sites
        with different subjects, instead of one distribution per site.
    presets : sequence of SitePreset, optional
        Use these instead of :func:`site_presets` (cycled).
    overrides : mapping, optional
        Field overrides applied to every preset (e.g. ``{"num_coils": 2}``).

    Returns
    -------
    list of dict
        The ``site.json`` content of each site.
    """
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    pool = list(presets) if presets is not None else site_presets()
    if iid:
        pool = [get_preset(iid_preset)]
    known = set(SitePreset.__dataclass_fields__)
    for key in overrides or {}:
        if key not in known:
            raise ValueError(f"unknown preset field {key!r} in overrides; known: {sorted(known)}")
    out = Path(out_dir)
    infos = []
    for k in range(n_sites):
        p = pool[k % len(pool)]
        if matrix is not None:
            hw = (matrix, matrix) if isinstance(matrix, int) else (int(matrix[0]), int(matrix[1]))
            p = replace(p, matrix=hw)
        if overrides:
            p = replace(p, **dict(overrides))
        infos.append(generate_site(out / f"site{k}", p, n_slices, seed, k, slices_per_volume, iid))
    return infos

"""Anatomical phantoms: drawing primitives (soft super-ellipses, smooth random fields) and the
axial brain and coronal knee slices drawn with them.

* brain (axial): scalp, skull, CSF, cortex with gyri and sulci, white matter, interhemispheric
  fissure, deep grey nuclei, lateral ventricles, random 3D lesions (T1 / T1POST / T2 / FLAIR);
* knee (coronal): subcutaneous fat, striated muscle, femur (condyles, notch) and tibia (plateau)
  with cortex and trabecular marrow, articular cartilage, joint fluid, menisci, cruciate and
  collateral ligaments, fibula, random bone bruises (PD / PDFS).

A subject (``brain_subject`` / ``knee_subject``) holds the random anatomy of one volume; a slice
function draws it at one position ``z`` in [-1, 1] as a magnitude image ``[H, W]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def grid(
    shape: tuple[int, int], fov: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Pixel-centre coordinates with isotropic pixels; the longer side of ``fov`` (default
    ``shape``) spans [-1, 1). A ``shape`` larger than ``fov`` extends the field of view with the
    same pixels (readout oversampling)."""
    h, w = shape
    m = max(fov or shape)
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


def tissue_textures(
    rng: np.random.Generator, shape: tuple[int, int], amount: float
) -> dict[str, np.ndarray]:
    """Multiplicative texture fields ``1 + amount * field`` per kind of tissue, ``[H, W]`` each.

    Three zero-mean random fields at three scales (about 1, 3 and ``max(shape) / 12`` pixels)
    mixed per kind: ``fine`` (grainy: grey matter, cartilage), ``cells`` (lobular fat, deep
    nuclei), ``fibres`` (white matter: streaky, anisotropic), ``smooth`` (slow variation only:
    fluid and CSF are homogeneous) and ``trabecular`` (marrow: strong fine structure).
    """
    fine = smooth_noise(rng, shape, 1.0)
    mid = smooth_noise(rng, shape, 3.0)
    coarse = smooth_noise(rng, shape, max(shape) / 12)
    streak = smooth_noise(rng, shape, 2.0, aniso=(1.8, 0.5))
    mixes = {
        "fine": 0.6 * fine + 0.5 * mid + 0.4 * coarse,
        "cells": 0.3 * fine + 1.0 * mid + 0.4 * coarse,
        "fibres": 0.3 * fine + 0.8 * streak + 0.5 * coarse,
        "smooth": 0.3 * coarse,
        "trabecular": 1.4 * fine + 0.6 * mid + 0.3 * coarse,
    }
    return {k: np.clip(1 + amount * v, 0.3, 2.0) for k, v in mixes.items()}


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


def brain_subject(rng: np.random.Generator) -> dict[str, Any]:
    """One head: size, tilt, shift, outline harmonics, gyri, ventricles, cortex, 3D lesions."""
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


def brain_slice(
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
    tx = tissue_textures(rng, shape, texture)
    csf = t["csf"] * tx["smooth"]
    img = np.zeros(shape)
    img = _paint(img, blob(u, v, 0, 0, A, B, e, harm=h), t["fat"] * tx["cells"])
    img = _paint(img, blob(u, v, 0, 0, A, B, e, harm=h, grow=-0.045), t["bone"])
    img = _paint(img, blob(u, v, 0, 0, A, B, e, harm=h, grow=-0.075), csf)
    brain = blob(u, v, 0, 0, A, B, e, harm=h, grow=-0.095)
    img = _paint(img, brain, t["gm"] * tx["fine"])
    # gyri: white-matter fingers where cos(n phi + psi) > 0; sulci (CSF) in the troughs between
    n = subj["gyri"]
    phi = np.arctan2(v / B, u / A)
    wave = n * phi + 2.5 * smooth_noise(rng, shape, max(shape) / 7)
    gyr = np.cos(wave)
    depth = subj["cortex"] * s
    wm = blob(u, v, 0, 0, A, B, e, harm=h, grow=-0.095 - depth + 0.6 * depth * gyr)
    img = _paint(img, wm, t["wm"] * tx["fibres"])
    width = 0.9 * px * n / (0.8 * (A + B) / 2)  # about one pixel wide at the cortex
    sulci = np.exp(-((np.sin(wave) / width) ** 2)) * (gyr < 0) * np.clip(brain - wm, 0, 1)
    sulci *= np.clip(0.75 + 0.35 * smooth_noise(rng, shape, max(shape) / 10), 0.2, 1.0)
    img = _paint(img, 0.85 * sulci, csf)
    # interhemispheric fissure (front and back)
    fissure = np.exp(-((u / (0.9 * px)) ** 2)) * (np.abs(v) > 0.35 * B) * brain
    img = _paint(img, 0.9 * fissure, csf)
    if -0.45 < z < 0.35:  # basal ganglia and thalami
        deep = t["deep"] * tx["cells"]
        for sx in (-1, 1):
            img = _paint(
                img, blob(u, v, sx * 0.2 * s, -0.05, 0.06 * s, 0.12 * s, e, sx * 0.3), deep
            )
            img = _paint(img, blob(u, v, sx * 0.085 * s, 0.12, 0.065 * s, 0.08 * s, e), deep)
    if -0.35 < z < 0.5:  # lateral ventricles (butterfly), bigger in the middle
        vs = subj["vent"] * math.sqrt(max(0.0, 1 - ((z - 0.1) / 0.45) ** 2))
        if vs > 0.1:
            for sx in (-1, 1):
                m = blob(u, v, sx * 0.085 * s, -0.05, 0.04 * vs * s + px, 0.2 * s, e, -sx * 0.18)
                img = _paint(img, m, csf)
                if -0.1 < z < 0.3:  # occipital horns
                    m = blob(u, v, sx * 0.13 * s, 0.22, 0.03 * vs * s + px, 0.08 * s, e, sx * 0.5)
                    img = _paint(img, m, csf)
    for lx, ly, lz, lr, enh in subj["lesions"]:
        r2 = lr**2 - (z - lz) ** 2
        if r2 <= (1.2 * px) ** 2:
            continue
        r = math.sqrt(r2)
        les = blob(u, v, lx * A, ly * B, r, 0.8 * r, e, harm=_harmonics(rng, (3, 4), 0.15))
        les = les * brain
        if t["rim"] != t["lesion"] and enh:  # ring enhancement (T1POST)
            img = _paint(img, les, t["rim"] * tx["fine"])
            inner = blob(
                u, v, lx * A, ly * B, max(r - 1.5 * px, px), 0.8 * max(r - 1.5 * px, px), e
            )
            img = _paint(img, inner * brain, t["lesion"] * tx["fine"])
        else:
            img = _paint(img, les, t["lesion"] * tx["fine"])
    return img


def knee_subject(rng: np.random.Generator) -> dict[str, Any]:
    """One knee: size, tilt, shift, condyles, notch, joint gap, effusion, bruise, fibula."""
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
    marrow: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Paint a bone as cortex (outer union) then marrow (inner union); returns (img, bone mask)."""
    outer = np.max(np.stack(parts), axis=0)
    inner = np.max(np.stack(parts_inner), axis=0)
    img = _paint(img, outer, t["cortex"])
    img = _paint(img, inner, marrow)
    return img, outer


def knee_slice(
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
    tx = tissue_textures(rng, shape, texture)
    stri = smooth_noise(rng, shape, 1.0, aniso=(1.6, 0.25))  # fibres along the leg
    marrow = t["marrow"] * tx["trabecular"]
    img = np.zeros(shape)
    h = subj["harm"]
    img = _paint(img, blob(u, v, 0, 0, 0.68 * sc, 1.8, e, harm=h), t["fat"] * tx["cells"])
    img = _paint(
        img, blob(u, v, 0, 0, 0.6 * sc, 1.75, e, harm=h), t["muscle"] * (1 + 3 * texture * stri)
    )
    # joint fluid band (effusion), painted before the bones so that only the gaps keep it
    gap = subj["gap"]
    fl = blob(u, v, 0, 0.02, 0.45 * sc * wz, 0.05 + 0.07 * subj["effusion"], e)
    img = _paint(img, fl, t["fluid"] * tx["smooth"])
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
    img = _cartilage(img, u, v, e, sc, wz, fy, ty, c, cx, thick, win, t["cartilage"] * tx["fine"])
    notch = blob(u, v, 0, fy - 0.06, subj["notch"] * sc, 0.13, e)
    # femur: cortex then marrow (eroded by the cortical thickness), minus the notch
    femur_in = [
        blob(u, v, 0, -1.0, 0.23 * sc, 0.7, e, power=3, grow=-0.035),
        blob(u, v, 0, fy - 0.42, 0.41 * sc * wz, 0.42, e, power=2.2, grow=-0.02),
    ] + [blob(u, v, sx * cx, fy - c, c * wz, c, e, grow=-0.02) for sx in (-1, 1)]
    femur = [p * (1 - notch) for p in femur]
    femur_in = [p * (1 - notch) for p in femur_in]
    img, _ = _bone(img, femur, femur_in, t, marrow)
    tibia_in = [
        blob(u, v, 0, ty + 0.24, 0.44 * sc * wz, 0.24, e, power=3.5, grow=-0.02),
        blob(u, v, 0, 1.0, 0.24 * sc, 0.7, e, power=3, grow=-0.035),
        blob(u, v, 0, ty + 0.01, 0.05 * sc, 0.04, e, grow=-0.015),
    ]
    img, _ = _bone(img, tibia, tibia_in, t, marrow)
    if subj["fibula"] and z > -0.2:
        fx = 0.46 * sc
        img, _ = _bone(
            img,
            [blob(u, v, fx, ty + 0.45, 0.08 * sc, 0.3, e)],
            [blob(u, v, fx, ty + 0.45, 0.08 * sc, 0.3, e, grow=-0.025)],
            t,
            marrow,
        )
    if subj["bruise"] is not None:
        bx, by, br = subj["bruise"]
        bone_in = np.max(np.stack(femur_in + tibia_in), axis=0)
        m = blob(u, v, bx, by, br, 0.7 * br, e, harm=_harmonics(rng, (3, 5), 0.2)) * bone_in
        img = _paint(img, m, t["edema"] * tx["cells"])
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
    return img


def _cartilage(
    img: np.ndarray, u: np.ndarray, v: np.ndarray, e: float, sc: float, wz: float, fy: float,
    ty: float, c: float, cx: float, thick: float, win: np.ndarray, value: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """Articular cartilage: the bones grown by ``thick``, kept near the joint line."""
    grown = [blob(u, v, sx * cx, fy - c, c * wz, c, e, grow=thick) for sx in (-1, 1)]
    grown.append(blob(u, v, 0, ty + 0.24, 0.44 * sc * wz, 0.24, e, power=3.5, grow=thick))
    m = np.max(np.stack(grown), axis=0) * win
    return _paint(img, m, value)

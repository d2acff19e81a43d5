"""Site presets: tissue intensities per contrast and each synthetic hospital's scanner parameters
(the 12 site distributions of Levac et al. 2023, Table 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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
    """The 12 site distributions of Levac et al. 2023, Table 1 (knee PD/PDFS, brain
    T1/T1POST/T2/FLAIR at 1.5T and 3T), ordered so that any first ``n`` sites are as different as
    possible.

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


def jitter_tissues(p: SitePreset, rng: np.random.Generator) -> dict[str, float]:
    """The site's tissue intensities: ``TISSUES[p.contrast]``, each times ``1 + N(0, jitter)``."""
    base = TISSUES[p.contrast]
    return {k: float(v * (1 + rng.normal(0, p.intensity_jitter))) for k, v in base.items()}

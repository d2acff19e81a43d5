"""Site presets: tissue relaxation parameters, each contrast's protocol and each synthetic
hospital's scanner (the 12 site distributions of Levac et al. 2023, Table 1).

Tissue intensities are not tabulated per contrast: they follow from the spin-echo and
inversion-recovery signal equations with each tissue's proton density, T1 (at the site's field
strength) and T2, and the site's TR / TE / TI (:func:`tissue_signals`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Per tissue: (proton density, T1 at 1.5T [ms], T1 at 3T [ms], T2 [ms], fat fraction).
# Literature-typical values (e.g. Stanisz et al., MRM 2005; Bojorquez et al., MRI 2017); the fat
# fraction decides what a fat-saturation pulse removes (marrow is mostly fat).
TISSUES: dict[str, dict[str, tuple[float, float, float, float, float]]] = {
    "brain": {
        "fat": (0.90, 260, 370, 80, 1.0),
        "bone": (0.05, 300, 400, 1, 0.0),
        "csf": (1.00, 4000, 4200, 2000, 0.0),
        "gm": (0.80, 950, 1330, 95, 0.0),
        "wm": (0.69, 600, 830, 75, 0.0),
        "deep": (0.76, 800, 1100, 70, 0.0),
        "lesion": (0.85, 1200, 1500, 150, 0.0),
        "rim": (0.85, 1200, 1500, 150, 0.0),  # enhances (T1 shortened) with gadolinium
    },
    "knee": {
        "fat": (0.90, 260, 370, 80, 1.0),
        "marrow": (0.85, 280, 380, 70, 0.8),
        "muscle": (0.70, 1000, 1400, 40, 0.0),
        "cartilage": (0.75, 1000, 1240, 40, 0.0),
        "fluid": (1.00, 3000, 3600, 1000, 0.0),
        "cortex": (0.05, 1000, 1200, 1, 0.0),
        "meniscus": (0.20, 1000, 1100, 10, 0.0),
        "ligament": (0.20, 1000, 1100, 8, 0.0),
        "edema": (0.95, 1500, 1800, 200, 0.3),
    },
}

# Gadolinium: T1 of enhancing tissue in T1POST (r1 * concentration dominates 1/T1).
ENHANCED_T1_MS = 300.0


@dataclass(frozen=True)
class Protocol:
    """A sequence's timing: spin echo (``ti = 0``) or inversion recovery, in ms.

    ``fat_sat`` is the fraction of fat signal left by fat suppression (1 = none); ``contrast_agent``
    shortens the T1 of enhancing tissue to :data:`ENHANCED_T1_MS`.
    """

    tr: float
    te: float
    ti: float = 0.0
    fat_sat: float = 1.0
    contrast_agent: bool = False


# The standard protocol per contrast (fastMRI acquisition names in ACQUISITION); a preset may
# override TR / TE / TI (sites differ in their protocols as much as in their scanners).
PROTOCOLS: dict[str, Protocol] = {
    "T1": Protocol(tr=550, te=10),
    "T1POST": Protocol(tr=550, te=10, contrast_agent=True),
    "T2": Protocol(tr=4000, te=100),
    "FLAIR": Protocol(tr=9000, te=120, ti=2500),
    "PD": Protocol(tr=3000, te=30),
    "PDFS": Protocol(tr=3000, te=30, fat_sat=0.08),
}

ACQUISITION = {
    "T1": "AXT1PRE",
    "T1POST": "AXT1POST",
    "T2": "AXT2",
    "FLAIR": "AXFLAIR",
    "PD": "CORPD_FBK",
    "PDFS": "CORPDFS_FBK",
}

ANATOMY_CONTRASTS = {"brain": ("T1", "T1POST", "T2", "FLAIR"), "knee": ("PD", "PDFS")}


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
        Tesla (1.5 or 3.0); sets the tissues' T1, the noise and the B1 shading.
    num_coils : int
    matrix : (int, int)
        ``(H, W)`` of the reconstructed field of view; ``H`` readout, ``W`` phase encode.
    noise : float
        k-space noise std per coil, in units of the brightest tissue (image domain, ortho FFT).
    noise_corr : float
        Weight of the coils' sensitivity overlap in the noise covariance (0 = independent coils).
    coil_radius, coil_size : float
        Radius of the cylinder the loops sit on and loop radius (FOV half-width = 1).
    coil_arc : float
        Angular coverage of the array in radians (``2 pi`` = full ring).
    coil_phase : float
        Spread of the coils' constant phase offsets (radians; cables and preamplifiers).
    image_phase : float
        Amplitude of the smooth background (object) phase (radians).
    bias : float
        Amplitude of the smooth B1 (transmit) shading.
    texture : float
        Amplitude of the tissue texture.
    intensity_jitter : float
        Relative site-specific perturbation of the tissues' PD, T1 and T2 (scanner, calibration).
    gain : float
        Raw-data scale of the written k-space (normalisation removes it).
    readout : {'vertical', 'horizontal'}
        ``'horizontal'`` stores k-space transposed (readout along ``W``), like the Stanford
        abdomen data of Levac et al. 2023; read it with ``SiteDataset(rotate=True)``.
    tr, te, ti : float
        Protocol timing in ms; 0 = the contrast's standard (:data:`PROTOCOLS`).
    readout_os : float
        Readout oversampling: k-space covers ``readout_os`` times the FOV along ``H`` (fastMRI:
        2, 640 x 368 k-space for 320 x 320 images; remove it with ``data.crop``).
    size : float
        The hospital's data volume relative to a large site (slices = ``size`` x ``n_slices``).
    """

    name: str
    anatomy: str
    contrast: str
    field_strength: float
    num_coils: int
    matrix: tuple[int, int]
    noise: float
    noise_corr: float = 0.3
    coil_radius: float = 1.25
    coil_size: float = 0.6
    coil_arc: float = 2 * math.pi
    coil_phase: float = 1.0
    image_phase: float = 0.8
    bias: float = 0.05
    texture: float = 0.06
    intensity_jitter: float = 0.04
    gain: float = 1e-4
    readout: str = "vertical"
    tr: float = 0.0
    te: float = 0.0
    ti: float = 0.0
    readout_os: float = 1.0
    size: float = 1.0

    @property
    def acquisition(self) -> str:
        return ACQUISITION[self.contrast]

    @property
    def protocol(self) -> Protocol:
        """The contrast's standard protocol with this site's TR / TE / TI."""
        base = PROTOCOLS[self.contrast]
        return Protocol(
            tr=self.tr or base.tr,
            te=self.te or base.te,
            ti=self.ti if self.ti or not base.ti else base.ti,
            fat_sat=base.fat_sat,
            contrast_agent=base.contrast_agent,
        )

    @property
    def encoded_height(self) -> int:
        """Readout samples ``H * readout_os`` (even, so the FOV crop is centred)."""
        h = int(self.matrix[0])
        if self.readout_os <= 1:
            return h
        return int(2 * math.ceil(h * self.readout_os / 2))


def signal(pd: float, t1: float, t2: float, protocol: Protocol, fat_fraction: float = 0.0) -> float:
    """Magnitude signal of one tissue.

    Spin echo: ``PD (1 - exp(-TR/T1)) exp(-TE/T2)``; inversion recovery (``TI > 0``):
    ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``; fat suppression keeps
    ``1 - fat_fraction (1 - fat_sat)`` of it.
    """
    tr, te, ti = protocol.tr, protocol.te, protocol.ti
    if ti > 0:
        mz = abs(1 - 2 * math.exp(-ti / t1) + math.exp(-tr / t1))
    else:
        mz = 1 - math.exp(-tr / t1)
    suppressed = 1 - fat_fraction * (1 - protocol.fat_sat)
    return pd * mz * math.exp(-te / t2) * suppressed


def tissue_signals(p: SitePreset, rng: np.random.Generator | None = None) -> dict[str, float]:
    """Each tissue's intensity at site ``p`` (brightest tissue = 1).

    T1 at the site's field (1.5T or 3T values, interpolated in between), the contrast agent's
    T1 shortening for enhancing tissue, then :func:`signal`. With ``rng`` the PD, T1 and T2 are
    perturbed by ``1 + N(0, intensity_jitter)`` each (a site's own scanner and calibration).
    """
    if p.anatomy not in TISSUES:
        raise ValueError(f"unknown anatomy {p.anatomy!r}; choose 'brain' or 'knee'")
    if p.contrast not in ANATOMY_CONTRASTS[p.anatomy]:
        raise ValueError(f"contrast {p.contrast!r} is not one of {p.anatomy}'s")
    proto = p.protocol
    w = min(max((p.field_strength - 1.5) / 1.5, 0.0), 1.0)
    out: dict[str, float] = {}
    for name, (pd, t1_15, t1_3, t2, fat) in TISSUES[p.anatomy].items():
        t1 = (1 - w) * t1_15 + w * t1_3
        if proto.contrast_agent and name == "rim":
            t1 = ENHANCED_T1_MS
        if rng is not None:
            j = 1 + rng.normal(0, p.intensity_jitter, 3)
            pd, t1, t2 = pd * j[0], t1 * j[1], t2 * j[2]
        out[name] = signal(pd, t1, t2, proto, fat)
    top = max(out.values())
    return {k: v / top for k, v in out.items()}


def site_presets() -> list[SitePreset]:
    """The 12 site distributions of Levac et al. 2023, Table 1 (knee PD/PDFS, brain
    T1/T1POST/T2/FLAIR at 1.5T and 3T), ordered so that any first ``n`` sites are as different as
    possible.

    ``generate_sites(n_sites=4)`` uses the first four: two large hospitals (brain T1 3T 8 coils,
    knee PD 1.5T 5 coils) and two small ones with 30% of their data (brain FLAIR 1.5T 6 coils,
    knee PDFS 3T 4 coils).
    """
    tau = 2 * math.pi
    return [
        SitePreset("brain_t1_3t", "brain", "T1", 3.0, 8, (64, 64), noise=0.012, bias=0.15,
                   coil_radius=1.2, coil_size=0.55, gain=3e-5, tr=600),
        SitePreset("knee_pd_15t", "knee", "PD", 1.5, 5, (64, 48), noise=0.03, bias=0.05,
                   coil_radius=1.15, coil_size=0.7, gain=2e-4, te=27),
        SitePreset("brain_flair_15t", "brain", "FLAIR", 1.5, 6, (48, 48), noise=0.022,
                   bias=0.05, coil_radius=1.3, coil_size=0.65, coil_arc=0.8 * tau, gain=8e-5,
                   size=0.3),
        SitePreset("knee_pdfs_3t", "knee", "PDFS", 3.0, 4, (80, 64), noise=0.013, bias=0.12,
                   coil_radius=1.15, coil_size=0.75, coil_phase=1.5, noise_corr=0.45, gain=5e-4,
                   te=33, size=0.3),
        SitePreset("brain_t2_3t", "brain", "T2", 3.0, 8, (80, 80), noise=0.014, bias=0.15,
                   coil_radius=1.15, coil_size=0.5, gain=4e-5, te=90),
        SitePreset("knee_pdfs_15t", "knee", "PDFS", 1.5, 4, (64, 48), noise=0.035, bias=0.05,
                   coil_radius=1.05, coil_size=0.7, gain=1e-4),
        SitePreset("brain_t1post_15t", "brain", "T1POST", 1.5, 4, (64, 64), noise=0.025,
                   bias=0.05, coil_radius=1.3, coil_size=0.8, gain=6e-5, tr=500),
        SitePreset("knee_pd_3t", "knee", "PD", 3.0, 8, (80, 64), noise=0.015, bias=0.12,
                   coil_radius=1.0, coil_size=0.5, coil_phase=1.4, gain=3e-4, tr=2800),
        SitePreset("brain_t2_15t", "brain", "T2", 1.5, 5, (64, 64), noise=0.028, bias=0.05,
                   coil_radius=1.25, coil_size=0.7, coil_arc=0.75 * tau, gain=9e-5, te=110),
        SitePreset("brain_flair_3t", "brain", "FLAIR", 3.0, 7, (64, 64), noise=0.015,
                   bias=0.15, coil_radius=1.2, coil_size=0.55, gain=2e-5, ti=2800, tr=10000),
        SitePreset("brain_t1post_3t", "brain", "T1POST", 3.0, 6, (80, 80), noise=0.014,
                   bias=0.15, coil_radius=1.2, coil_size=0.6, gain=5e-5, tr=650),
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
    """The site's tissue intensities: :func:`tissue_signals` with the site's jittered PD, T1 and
    T2."""
    return tissue_signals(p, rng)

"""Synthetic multi-site, multi-coil MRI data in the fastMRI layout (the project's default data).

Each site mimics one row of the client table of Levac et al. 2023 (Table 1: anatomy x contrast x
field strength) with its own scanner and protocol: tissue contrast from the spin-echo /
inversion-recovery signal equations (per-tissue PD, T1 at the site's field, T2; the site's TR /
TE / TI, fat suppression, gadolinium), textured anatomy (axial brain, coronal knee), receive
coils from a Biot-Savart loop model (count, geometry, B1- phase), smooth B1 shading and
background phase, noise correlated across coils, optional readout oversampling, any matrix size,
and a data volume (large and small hospitals). Everything is deterministic given ``seed`` (a
site's data do not depend on how many other sites are generated).

- :mod:`~recon.data.synth.presets`: tissue parameters, protocols, signal equations, site presets;
- :mod:`~recon.data.synth.phantoms`: drawing primitives, textures, the brain and knee phantoms;
- :mod:`~recon.data.synth.scanner`: coil model, shading, phase, noise and one subject's k-space;
- :mod:`~recon.data.synth.writer`: h5 files and ``site.json`` per site (:func:`generate_sites`).
"""

from recon.data.synth.phantoms import blob, smooth_noise, tissue_textures
from recon.data.synth.presets import (
    ACQUISITION,
    PROTOCOLS,
    TISSUES,
    Protocol,
    SitePreset,
    get_preset,
    signal,
    site_presets,
    tissue_signals,
)
from recon.data.synth.scanner import coil_maps, noise_factor, synth_volume
from recon.data.synth.writer import GENERATOR, generate_site, generate_sites, site_slices

__all__ = [
    "ACQUISITION",
    "GENERATOR",
    "PROTOCOLS",
    "TISSUES",
    "Protocol",
    "SitePreset",
    "blob",
    "coil_maps",
    "generate_site",
    "generate_sites",
    "get_preset",
    "noise_factor",
    "signal",
    "site_presets",
    "site_slices",
    "smooth_noise",
    "synth_volume",
    "tissue_signals",
    "tissue_textures",
]

"""Synthetic multi-site, multi-coil MRI data in the fastMRI layout (the project's default data).

Each site mimics one row of the client table of Levac et al. 2023 (Table 1: anatomy x contrast x
field strength) with its own scanner: coil count and geometry, noise level, matrix size, intensity
jitter, B1 bias and raw-data gain. Slices come from anatomical phantoms with smooth random
deformations and textures (brain axial, knee coronal). Everything is deterministic given ``seed``
(a site's data do not depend on how many other sites are generated).

- :mod:`~recon.data.synth.presets`: tissue intensities and the per-site scanner presets;
- :mod:`~recon.data.synth.phantoms`: drawing primitives and the brain and knee phantoms;
- :mod:`~recon.data.synth.scanner`: coil maps, noise and the k-space of one subject;
- :mod:`~recon.data.synth.writer`: h5 files and ``site.json`` per site (:func:`generate_sites`).
"""

from recon.data.synth.phantoms import blob, smooth_noise
from recon.data.synth.presets import ACQUISITION, TISSUES, SitePreset, get_preset, site_presets
from recon.data.synth.scanner import coil_maps, synth_volume
from recon.data.synth.writer import GENERATOR, generate_site, generate_sites

__all__ = [
    "ACQUISITION",
    "GENERATOR",
    "TISSUES",
    "SitePreset",
    "blob",
    "coil_maps",
    "generate_site",
    "generate_sites",
    "get_preset",
    "site_presets",
    "smooth_noise",
    "synth_volume",
]

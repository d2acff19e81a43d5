"""Site data: fastMRI-layout h5 I/O, site preparation (cached coil maps), the per-slice dataset
and the synthetic multi-site generator. Pure numpy / h5py / SigPy / torch; no flwr.

Names are imported lazily (PEP 562), so that ``fedunroll.data`` (the CLI) loads without
torch and ``fedunroll --help`` stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Sample": "sample",
    "collate": "sample",
    "SiteDataset": "dataset",
    "acs_rss_max": "dataset",
    "split_files": "dataset",
    "parse_crop": "dataset",
    "DataError": "h5io",
    "Volume": "h5io",
    "check_file": "h5io",
    "read_volume": "h5io",
    "scan_site": "h5io",
    "site_files": "h5io",
    "write_volume": "h5io",
    "cache_path": "prepare",
    "load_or_compute_maps": "prepare",
    "prepare_site": "prepare",
    "SitePreset": "synth",
    "generate_site": "synth",
    "generate_sites": "synth",
    "site_presets": "synth",
}

__all__ = [
    "DataError",
    "Sample",
    "SiteDataset",
    "SitePreset",
    "Volume",
    "acs_rss_max",
    "cache_path",
    "check_file",
    "collate",
    "generate_site",
    "generate_sites",
    "load_or_compute_maps",
    "parse_crop",
    "prepare_site",
    "read_volume",
    "scan_site",
    "site_files",
    "site_presets",
    "split_files",
    "write_volume",
]

if TYPE_CHECKING:
    from recon.data.dataset import (
        SiteDataset,
        acs_rss_max,
        parse_crop,
        split_files,
    )
    from recon.data.h5io import (
        DataError,
        Volume,
        check_file,
        read_volume,
        scan_site,
        site_files,
        write_volume,
    )
    from recon.data.prepare import cache_path, load_or_compute_maps, prepare_site
    from recon.data.sample import Sample, collate
    from recon.data.synth import SitePreset, generate_site, generate_sites, site_presets


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recon.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"recon.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

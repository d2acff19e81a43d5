"""Writing synthetic sites to disk in the fastMRI layout (:func:`generate_sites`)::

    out_dir/site{k}/site.json
    out_dir/site{k}/{train,val,test}/site{k}_vol{v:03d}.h5   kspace [S, C, H, W] complex64,
                                                             reconstruction_rss [S, H, W]

Volumes are split 70/15/15 by volume, so no subject is in two splits. Hospitals differ in size:
a site gets ``preset.size`` times the requested slices (``site.json``: ``slices`` per split and
``requested_slices``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from recon.data.h5io import SPLITS, write_volume
from recon.data.synth.presets import SitePreset, get_preset, jitter_tissues, site_presets
from recon.data.synth.scanner import synth_volume
from recon.fileio import atomic_write_json

GENERATOR = "fedunroll.synth/2"

_HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <acquisitionSystemInformation>
    <systemFieldStrength_T>{field}</systemFieldStrength_T>
    <receiverChannels>{coils}</receiverChannels>
    <institutionName>{site}</institutionName>
  </acquisitionSystemInformation>
  <encoding>
    <encodedSpace><matrixSize><x>{h_enc}</x><y>{w}</y><z>1</z></matrixSize></encodedSpace>
    <reconSpace><matrixSize><x>{h}</x><y>{w}</y><z>1</z></matrixSize></reconSpace>
  </encoding>
  <measurementInformation><protocolName>{acq} (synthetic)</protocolName></measurementInformation>
</ismrmrdHeader>
"""


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


def site_slices(preset: SitePreset, n_slices: int) -> int:
    """Slices of a site of this preset when a large site has ``n_slices`` (at least 3, so that
    train, val and test each get a volume)."""
    return max(3, round(n_slices * preset.size)) if preset.size != 1 else n_slices


def generate_site(
    site_dir: str | os.PathLike[str],
    preset: SitePreset,
    n_slices: int = 50,
    seed: int = 0,
    site_index: int = 0,
    slices_per_volume: int = 5,
    iid: bool = False,
) -> dict[str, Any]:
    """Write one site (see the module docstring) and return its ``site.json`` content.

    ``n_slices`` is the size of a large hospital; the site gets :func:`site_slices` of them.
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    requested = n_slices
    n_slices = site_slices(preset, n_slices)
    root = Path(site_dir)
    _prepare_dir(root)
    scanner = np.random.default_rng([seed, 7919, *preset.name.encode()])  # same for IID sites
    tissues = jitter_tissues(preset, scanner)
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
                h_enc=preset.encoded_height,
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
        "requested_slices": requested,
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
        Number of sites; non-IID sites cycle through :func:`site_presets` (Table 1 of Levac et al.
        2023).
    n_slices : int
        Slices of a large site over all splits (volumes of ``slices_per_volume`` slices, split
        70/15/15 by volume); a preset with ``size < 1`` (a small hospital) gets that fraction.
    seed : int
        Everything is a deterministic function of ``seed`` (and the site index).
    matrix : int or (int, int), optional
        Override every site's matrix ``(H, W)`` (e.g. 32 for tests, 320 like fastMRI); default:
        the presets' (48-80).
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

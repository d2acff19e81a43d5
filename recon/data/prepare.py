"""Site preparation: estimate coil maps once per slice and cache them beside the data.

Cache layout (one file per data file, mirroring the site's folders)::

    <site_dir>/.cache/maps-<method>/<split>/<stem>.maps.h5
        maps   complex64 [slices, coils, H, W]   (original orientation, before any rotation)
        attrs  params (JSON of method + calibration settings + image crop), source (file name),
               version

With an image-domain ``crop`` (readout oversampling removed, :func:`crop_kspace`) the maps are
those of the cropped k-space; the crop is part of ``params`` (``"matrix_crop": [H, W]``, absent
without a crop, so older caches stay valid), and a cache for another crop is recomputed.

A cache file is reused when it is newer than its source, its ``params`` match, its shape
matches the source k-space and its maps are finite; otherwise it is recomputed. Writes are
atomic (temporary file, then ``os.replace``), so concurrent sites/workers and killed runs never
leave a half-written cache.

Before any map is computed, :func:`prepare_site` runs the input checks of
:mod:`recon.data.checks` on every file (layout, finite values, centred k-space, fully sampled,
optionally the acceleration against the coil count) and reports which ran; maps that come out
non-finite fail their file with the slice and the likely cause, and are never cached.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from recon.data.checks import DataError, describe, maps_reason
from recon.data.h5io import KSPACE, display_name, read_volume, scan_site
from recon.fileio import atomic_path
from recon.physics.coils import default_calib_width, estimate_maps, np_crop_kspace
from recon.physics.masks import default_calibration_width

CACHE_DIR = ".cache"
CACHE_VERSION = 1
METHODS = ("espirit", "jsense")


def _params(
    method: str,
    calib: int | None,
    map_kwargs: Mapping[str, Any] | None,
    crop: tuple[int, int] | None = None,
) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown coil-map method {method!r}; choose one of {', '.join(METHODS)}")
    params: dict[str, Any] = {"method": method, "calib_width": calib, **dict(map_kwargs or {})}
    if crop is not None:  # not ``"crop"``: that is ESPIRiT's eigenvalue threshold (map_kwargs)
        params["matrix_crop"] = [int(crop[0]), int(crop[1])]
    return json.dumps(params, sort_keys=True)


def crop_kspace(kspace: np.ndarray, crop: tuple[int, int] | None, name: str) -> np.ndarray:
    """``kspace [..., C, H0, W0]`` cropped to the centre ``crop = (H, W)`` of its image (None:
    unchanged); a crop larger than the matrix is a :class:`DataError` naming ``name``."""
    if crop is None:
        return kspace
    h, w = (int(c) for c in crop)
    h0, w0 = kspace.shape[-2:]
    if h > h0 or w > w0:
        raise DataError(name, "kspace", f"crop {h}x{w} larger than the {h0}x{w0} matrix")
    return np_crop_kspace(kspace, (h, w))


def cache_path(
    h5_path: str | os.PathLike[str],
    site_dir: str | os.PathLike[str] | None = None,
    method: str = "espirit",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Where the maps of ``h5_path`` are cached (see the module docstring)."""
    src = Path(h5_path)
    root = Path(site_dir) if site_dir is not None else src.parent
    base = Path(cache_dir) if cache_dir is not None else root / CACHE_DIR
    try:
        rel = src.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(src.name)
    return base / f"maps-{method}" / rel.parent / f"{src.stem}.maps.h5"


def _read_cache(path: Path, src: Path, params: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """Cached maps if fresh and matching, else None (a broken cache is just recomputed)."""
    try:
        if not path.is_file() or path.stat().st_mtime_ns < src.stat().st_mtime_ns:
            return None
        with h5py.File(path, "r") as f:
            if f.attrs.get("params") != params or f.attrs.get("version") != CACHE_VERSION:
                return None
            if tuple(f["maps"].shape) != tuple(shape):
                return None
            maps = np.asarray(f["maps"][()], dtype=np.complex64)
            return maps if np.isfinite(maps).all() else None  # never reuse NaN maps
    except (OSError, KeyError, RuntimeError, ValueError):
        return None


def _write_cache(path: Path, maps: np.ndarray, params: str, source: str) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("maps", data=maps.astype(np.complex64, copy=False))
        f.attrs["params"] = params
        f.attrs["version"] = CACHE_VERSION
        f.attrs["source"] = source


def _num_slices(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f[KSPACE].shape[0])


def compute_maps(
    kspace: np.ndarray,
    method: str = "espirit",
    calib: int | None = None,
    map_kwargs: Mapping[str, Any] | None = None,
    pbar: Any = None,
    name: str = "kspace",
) -> np.ndarray:
    """Coil maps for every slice of a volume ``[S, C, H, W]`` -> complex64 ``[S, C, H, W]``.

    Raises
    ------
    DataError
        Naming ``name``, the slice and the likely cause, if a slice's maps are not finite
        (e.g. ESPIRiT on k-space that is not centred gives all-NaN maps).
    """
    kw = dict(map_kwargs or {})
    out = np.empty(kspace.shape, dtype=np.complex64)
    for s in range(kspace.shape[0]):
        with np.errstate(invalid="ignore", divide="ignore"):  # non-finite maps: reported below
            out[s] = estimate_maps(kspace[s], method, calib_width=calib, **kw)
        cw = default_calib_width(kspace.shape) if calib is None else int(calib)
        why = maps_reason(out[s], kspace[s], method, cw, s)
        if why is not None:
            raise DataError(name, KSPACE, why)
        if pbar is not None:
            pbar.update(1)
    return out


def load_or_compute_maps(
    h5_path: str | os.PathLike[str],
    kspace: np.ndarray | None = None,
    site_dir: str | os.PathLike[str] | None = None,
    method: str = "espirit",
    calib: int | None = None,
    map_kwargs: Mapping[str, Any] | None = None,
    force: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    pbar: Any = None,
    crop: tuple[int, int] | None = None,
) -> tuple[np.ndarray, bool]:
    """Maps of one file from the cache, or computed (and cached) if absent or stale.

    Parameters
    ----------
    kspace : complex ndarray ``[S, C, H, W]``, optional
        The file's k-space if already loaded, already cropped to ``crop`` if one is given (else
        it is read, and cropped).
    crop : (H, W), optional
        Image-domain centre crop of the k-space the maps belong to (:func:`crop_kspace`).

    Returns
    -------
    maps : complex64 ndarray ``[S, C, H, W]``
    computed : bool
        True if the maps were (re)computed now.
    """
    src = Path(h5_path)
    params = _params(method, calib, map_kwargs, crop)
    path = cache_path(src, site_dir, method, cache_dir)
    shown = display_name(src, site_dir) if site_dir is not None else str(src)
    if kspace is None:
        kspace = crop_kspace(read_volume(src, name=shown).kspace, crop, shown)
    elif crop is not None and tuple(kspace.shape[-2:]) != tuple(crop):
        raise ValueError(f"{shown}: k-space {kspace.shape[-2:]} is not cropped to {tuple(crop)}")
    if calib is None:  # the ACS lines of the default mask, as SiteDataset calibrates
        calib = default_calibration_width(kspace.shape)
        params = _params(method, calib, map_kwargs, crop)
    if not force:
        cached = _read_cache(path, src, params, kspace.shape)
        if cached is not None:
            if pbar is not None:
                pbar.update(kspace.shape[0])
            return cached, False
    try:
        maps = compute_maps(kspace, method, calib, map_kwargs, pbar, name=shown)
    except (ValueError, np.linalg.LinAlgError) as err:
        raise DataError(shown, "kspace", f"coil-map estimation ({method}) failed: {err}") from err
    try:
        _write_cache(path, maps, params, src.name)
    except OSError as err:  # read-only data mount: still usable, just not cached
        warnings.warn(f"{shown}: could not cache coil maps at {path}: {err}", stacklevel=2)
    return maps, True


def _prepare_one(job: tuple[Any, ...], pbar: Any = None) -> tuple[bool, list[str], list[str]]:
    """Check one file and compute (or reuse) its maps (a picklable unit of work).

    Returns (computed now, checks run, warnings). Raises :class:`DataError` for a bad file:
    structure, values, k-space not centred, already undersampled (training needs fully sampled
    k-space), non-finite maps.
    """
    path, root, method, calib, map_kwargs, force, cache_dir, crop, accel = job
    shown = display_name(path, root)
    vol = read_volume(path, name=shown, accel=accel, warn=False)
    for finding in vol.findings:
        if finding.check == "sampling":
            raise finding.error()
    kspace = crop_kspace(vol.kspace, crop, shown)
    _, fresh = load_or_compute_maps(
        path, kspace, root, method, calib, map_kwargs, force, cache_dir, pbar, crop
    )
    return fresh, [*vol.checks, "maps"], [str(f) for f in vol.findings]


def _prepare_safe(
    job: tuple[Any, ...], pbar: Any = None
) -> tuple[bool, list[str], list[str]] | DataError:
    try:
        return _prepare_one(job, pbar)
    except DataError as err:
        return err


def prepare_site(
    site_dir: str | os.PathLike[str],
    method: str = "espirit",
    calib: int | None = None,
    force: bool = False,
    progress: bool = True,
    map_kwargs: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 1,
    crop: tuple[int, int] | None = None,
    accel: float | None = None,
) -> dict[str, Any]:
    """Check a site and compute (or reuse) the coil maps of every slice of every valid file.

    Parameters
    ----------
    site_dir : path-like
        ``site_dir/{train,val,test}/*.h5`` (or ``site_dir/*.h5``).
    method : {'espirit', 'jsense'}
        Map estimator (ESPIRiT as in Levac et al. 2023, Sec. 3.1).
    calib : int, optional
        Calibration box width (default: 24, smaller for small matrices).
    force : bool
        Recompute even if the cache is fresh.
    progress : bool
        Show a tqdm bar (stderr) over slices.
    workers : int
        Processes computing maps in parallel, one file each (BLAS single-threaded in each).
        Workers are spawned (each imports torch + SigPy, ~2-3 s), so this pays off for large
        matrices on idle multi-core machines (ESPIRiT at 320x320/15 coils takes 10+ s a slice),
        not for small synthetic sites. Scripts calling it need an ``if __name__ == "__main__"``
        guard (spawn re-imports the main module).
    crop : (H, W), optional
        Maps of the centre ``H x W`` image crop (``SiteDataset(crop=...)``; fastMRI readout
        oversampling); a file whose matrix is smaller is reported as bad.
    accel : float, optional
        The acceleration the site will train at (``data.accel``): a file with fewer coils gets
        a warning.

    Returns
    -------
    dict
        ``site``, ``method``, ``cache_dir``, ``files`` (valid), ``slices``, ``computed`` /
        ``reused`` (files), ``checks`` (what was checked, :func:`recon.data.checks.describe`),
        ``warnings`` and ``errors`` (messages naming file and field), ``seconds``.
    """
    t0 = time.perf_counter()
    _params(method, calib, map_kwargs, crop)  # fail fast on an unknown method
    root = Path(site_dir)
    valid, errors = scan_site(root)
    slices = {p: _num_slices(p) for p in valid}
    total = sum(slices.values())
    computed = reused = 0
    ok: list[Path] = []
    with tqdm(
        total=total,
        desc=f"coil maps {root.name} ({method})",
        unit="slice",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        jobs = [(p, root, method, calib, map_kwargs, force, cache_dir, crop, accel) for p in valid]
        if workers > 1 and len(jobs) > 1:
            # spawn, not fork: the parent may hold torch/OpenMP threads
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                results = []
                for job, res in zip(jobs, pool.map(_prepare_safe, jobs)):
                    bar.update(slices[job[0]])
                    results.append(res)
        else:
            results = [_prepare_safe(job, bar) for job in jobs]
        ran: list[str] = ["layout", "finite"]  # scan_site's checks, on every file
        warned: list[str] = []
        for p, res in zip(valid, results):
            if isinstance(res, DataError):
                errors.append(res)
                continue
            fresh, checks, found = res
            ok.append(p)
            ran += checks
            warned += found
            computed += int(fresh)
            reused += int(not fresh)
    base = Path(cache_dir) if cache_dir is not None else root / CACHE_DIR
    return {
        "site": str(root),
        "method": method,
        "cache_dir": str(base / f"maps-{method}"),
        "files": len(ok),
        "slices": int(sum(slices[p] for p in ok)),
        "computed": computed,
        "reused": reused,
        "checks": describe(ran),
        "warnings": warned,
        "errors": [str(e) for e in errors],
        "seconds": round(time.perf_counter() - t0, 3),
    }

"""A site's slices as a torch ``Dataset`` of :class:`~recon.data.sample.Sample`.

Per slice, following Levac et al. 2023, Sec. 3.1:

0. optional image-domain centre crop (``crop=(H, W)``): the fully sampled k-space becomes
   ``F(crop(F^-1 k))``, e.g. fastMRI's 2x readout oversampling (640x368 k-space) removed for its
   320x320 reference images; everything below (coil maps included) sees the cropped k-space;
1. optional rotation (transpose ``H``/``W``) for data whose readout is horizontal, so that the
   mask always undersamples the phase-encode axis ``W``;
2. normalisation: k-space is divided by the maximum of the RSS image computed from the fully
   sampled central ``acs_frac * W`` phase-encode lines only;
3. target = RSS of the fully sampled coil images (same scale), and ``image`` = the coil-combined
   fully sampled image ``S^H F^H y_full`` (complex, for complex-valued losses);
4. mask seeded by :func:`~recon.physics.masks.slice_seed` (file name, slice index, ``seed``), so a
   slice keeps its mask across epochs and federated rounds; ``kspace = full_kspace * mask``;
5. coil maps from the site cache (:mod:`recon.data.prepare`), computed and cached if absent.

Everything is computed once at construction and kept in memory (sites are small), so epochs never
reread the h5 files.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from recon.data.h5io import SPLITS, DataError, display_name, list_h5, read_volume
from recon.data.prepare import crop_kspace, load_or_compute_maps
from recon.data.sample import Sample
from recon.physics.coils import np_ifft2c, np_rss
from recon.physics.masks import acs_slice, make_mask, slice_seed

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def parse_crop(text: object) -> tuple[int, int] | None:
    """An image crop ``(H, W)`` from ``"320x320"``, ``"320,320"`` or two integers; ``None`` or
    ``""`` mean no crop. Anything else is a ``ValueError`` naming the text."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    nums: list[int] = []
    if isinstance(text, str):
        parts = re.split(r"\s*[xX,]\s*", text.strip())
        nums = [int(p) for p in parts if re.fullmatch(r"\d+", p)]
        nums = nums if len(nums) == len(parts) else []
    elif isinstance(text, list | tuple):
        ints = [p for p in text if isinstance(p, int | np.integer) and not isinstance(p, bool)]
        nums = [int(p) for p in ints] if len(ints) == len(text) else []
    if len(nums) == 2 and min(nums) >= 1:
        return nums[0], nums[1]
    raise ValueError(
        f"bad crop {text!r}: expected HxW such as '320x320' (or 'H,W', two positive integers; "
        "'' for no crop)"
    )


def crop_text(value: object) -> str:
    """A crop setting as the run config stores it: ``"HxW"``, or ``""`` for none (the
    validator of ``data.crop``, :class:`recon.config.DataConfig`)."""
    crop = parse_crop(value)
    return "" if crop is None else f"{crop[0]}x{crop[1]}"


def split_files(files: Sequence[Path], split: str) -> list[Path]:
    """Deterministic train/val/test split of a flat file list (sorted by name, 80/10/10).

    With 3 files or more, val and test get at least one file each and train keeps the rest.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ordered = sorted(files, key=lambda p: p.name)
    n = len(ordered)
    if n < 3:
        n_val = n_test = 0
    else:
        n_val = max(1, round(SPLIT_FRACTIONS[1] * n))
        n_test = max(1, round(SPLIT_FRACTIONS[2] * n))
    n_train = n - n_val - n_test
    bounds = {
        "train": (0, n_train),
        "val": (n_train, n_train + n_val),
        "test": (n_train + n_val, n),
    }
    lo, hi = bounds[split]
    return list(ordered[lo:hi])


def acs_rss_max(kspace: np.ndarray, acs_frac: float = 0.08) -> float:
    """Max of the RSS image from the central ``acs_frac * W`` phase-encode lines of ``[C, H, W]``.

    The normalisation of Levac et al. 2023, Sec. 3.1: divide k-space by this value.
    """
    low = np.zeros_like(kspace)
    acs = acs_slice(kspace.shape[-1], acs_frac)
    low[..., acs] = kspace[..., acs]
    return float(np_rss(np_ifft2c(low)).max())


def split_dir_layout(site_dir: Path) -> bool:
    """True if the site uses ``{train,val,test}/`` sub-folders."""
    return any((site_dir / s).is_dir() for s in SPLITS)


class SiteDataset(Dataset[Sample]):
    """All slices of one site split, normalised and undersampled, held in memory.

    Parameters
    ----------
    site_dir : path-like
        ``site_dir/{train,val,test}/*.h5``; without split folders, ``site_dir/*.h5`` is split
        deterministically by file name (:func:`split_files`).
    split : {'train', 'val', 'test'}
    mask_kind : {'random1d', 'equispaced1d', 'poisson2d'}
    accel : float
        Acceleration ``R`` (paper: 4).
    acs_frac : float
        Fully sampled central fraction of the phase-encode lines (paper: 0.08); also the lines
        used for normalisation.
    seed : int
        Base seed of the per-slice masks.
    rotate : bool or None
        Transpose ``H``/``W`` (horizontal-readout data). ``None``: rotate the files whose
        attribute ``readout`` is ``'horizontal'``.
    max_slices : int, optional
        Keep only the first ``max_slices`` slices (files in name order).
    maps_method : {'espirit', 'jsense'}
        Coil-map estimator for the cache.
    calib : int, optional
        Calibration width for the maps.
    cache_dir : path-like, optional
        Map cache root (default ``site_dir/.cache``).
    files : sequence of path-like, optional
        Use exactly these files (any folder under ``site_dir``) instead of a split's files.
    map_kwargs : mapping, optional
        Extra estimator settings, e.g. ``{"crop": 0}`` for ESPIRiT maps that are not zeroed
        outside the object (part of the cache key).
    crop : (H, W) or None
        Image-domain centre crop of every slice, in the file's orientation (before rotation),
        applied to the fully sampled k-space right after reading (fastMRI readout
        oversampling: ``(320, 320)``); the coil maps are those of the cropped k-space (cached
        per crop). A file whose matrix is smaller than the crop is skipped (:class:`DataError`).

    Attributes
    ----------
    files : list of Path
        The valid files used.
    errors : list of DataError
        Files of this split that were skipped, each naming file and field.

    Raises
    ------
    DataError
        If the split has no usable file.
    """

    def __init__(
        self,
        site_dir: str | os.PathLike[str],
        split: str = "train",
        mask_kind: str = "random1d",
        accel: float = 4,
        acs_frac: float = 0.08,
        seed: int = 0,
        rotate: bool | None = False,
        max_slices: int | None = None,
        maps_method: str = "espirit",
        calib: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        map_kwargs: Mapping[str, Any] | None = None,
        files: Sequence[str | os.PathLike[str]] | None = None,
        crop: tuple[int, int] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = Path(site_dir)
        if not root.is_dir():
            raise DataError(root, "site_dir", "is not a directory")
        self.site_dir = root
        self.site = root.name
        self.split = split
        self.mask_kind = mask_kind
        self.accel = accel
        self.acs_frac = acs_frac
        self.seed = seed
        self.crop = None if crop is None else (int(crop[0]), int(crop[1]))
        if files is not None:  # explicit files (e.g. one file to reconstruct): no split logic
            candidates = [Path(f) for f in files]
        elif split_dir_layout(root):
            candidates = list_h5(root / split)
        else:
            candidates = split_files(list_h5(root), split)
        self.errors: list[DataError] = []
        self.files: list[Path] = []
        self._items: list[Sample] = []
        for path in candidates:
            if max_slices is not None and len(self._items) >= max_slices:
                break
            name = display_name(path, root)
            try:
                vol = read_volume(path, name=name)
                kspace = crop_kspace(vol.kspace, self.crop, name)
                maps, _ = load_or_compute_maps(
                    path,
                    kspace,
                    root,
                    maps_method,
                    calib,
                    map_kwargs,
                    cache_dir=cache_dir,
                    crop=self.crop,
                )
                rot = bool(vol.attrs.get("readout") == "horizontal") if rotate is None else rotate
                n = vol.num_slices
                if max_slices is not None:
                    n = min(n, max_slices - len(self._items))
                items = [
                    self._make(kspace[s], maps[s], path, name, s, rot, vol.attrs) for s in range(n)
                ]
            except DataError as err:
                self.errors.append(err)
                continue
            self.files.append(path)
            self._items.extend(items)
        for bad in self.errors:
            warnings.warn(f"skipping bad file: {bad}", stacklevel=2)
        if not self._items:
            detail = "; ".join(str(e) for e in self.errors) or "no .h5 files"
            raise DataError(root / split, "split", f"no usable slices ({detail})")

    def _make(
        self,
        full: np.ndarray,
        maps: np.ndarray,
        path: Path,
        name: str,
        s: int,
        rotate: bool,
        attrs: dict[str, Any],
    ) -> Sample:
        if rotate:  # horizontal readout -> readout along H, phase encode along W
            full = np.swapaxes(full, -1, -2)
            maps = np.swapaxes(maps, -1, -2)
        peak = acs_rss_max(full, self.acs_frac)
        if not np.isfinite(peak) or peak <= 0:
            raise DataError(name, "kspace", f"slice {s}: no signal in the ACS lines")
        full = (full / peak).astype(np.complex64)  # [C, H, W], max ACS-RSS == 1
        coil_images = np_ifft2c(full)  # [C, H, W]
        target = np_rss(coil_images).astype(np.float32)  # [H, W]
        image = np.sum(np.conj(maps) * coil_images, axis=0).astype(np.complex64)  # S^H F^H y
        mask = make_mask(
            self.mask_kind,
            full.shape,
            self.accel,
            self.acs_frac,
            slice_seed(path.name, s, self.seed),
        )
        meta = {
            "file": name,
            "slice": s,
            "site": self.site,
            "acquisition": attrs.get("acquisition", ""),
            "scale": 1.0 / peak,
        }
        return Sample(
            kspace=torch.from_numpy(np.ascontiguousarray(full * mask)),
            mask=torch.from_numpy(mask),
            maps=torch.from_numpy(np.ascontiguousarray(maps, dtype=np.complex64)),
            target=torch.from_numpy(target),
            meta=meta,
            image=torch.from_numpy(image),
        )

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, idx: int) -> Sample:
        """The ``idx``-th slice (the same tensors every epoch; treat them as read-only)."""
        return self._items[idx]


def file_samples(path: str | os.PathLike[str], **kwargs: Any) -> SiteDataset:
    """All slices of one h5 file through the same pipeline as :class:`SiteDataset`.

    Coil maps are cached under the file's folder (``.cache/``) like a site's. A bad file raises
    :class:`DataError` naming the file and field.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "file", "does not exist")
    ds = SiteDataset(p.parent, files=[p], **kwargs)
    if ds.errors:
        raise ds.errors[0]
    return ds

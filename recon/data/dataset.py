"""A site's slices as a torch ``Dataset`` of :class:`~recon.data.sample.Sample`.

Per slice, following Levac et al. 2023, Sec. 3.1:

0. optional image-domain centre crop (``crop=(H, W)``): the fully sampled k-space becomes
   ``F(crop(F^-1 k))``, e.g. fastMRI's 2x readout oversampling (640x368 k-space) removed for its
   320x320 reference images; everything below (coil maps included) sees the cropped k-space;
1. optional rotation (transpose ``H``/``W``) for data whose readout is horizontal, so that the
   mask always undersamples the phase-encode axis ``W``;
2. normalisation: k-space is divided by the maximum of the RSS image computed from the fully
   sampled central ``acs_frac * W`` phase-encode lines only (with a given or acquired mask: its
   own central fully sampled lines);
3. target = RSS of the fully sampled coil images (same scale), and ``image`` = the coil-combined
   fully sampled image ``S^H F^H y_full`` (complex, for complex-valued losses);
4. mask seeded by :func:`~recon.physics.masks.slice_seed` (file name, slice index, ``seed``), so a
   slice keeps its mask across epochs and federated rounds; ``kspace = full_kspace * mask``;
5. coil maps calibrated as a scanner has them: ESPIRiT on a calibration box as wide as the ACS
   lines the masks keep (the nominal ACS lines of generated masks; for a given or acquired mask
   the central fully sampled block common to every slice of a file,
   :func:`~recon.physics.masks.acs_box_width`), never a fully sampled 24x24 centre the scanner
   did not acquire. Below :data:`~recon.physics.masks.MIN_CALIB_LINES` (8) lines SigPy's
   ESPIRiT (square box) gives unusable maps on small matrices, so retrospectively the box is
   widened to the central 8 lines of the fully sampled data: at 8% ACS that is every matrix
   with ``W < 94`` (the synthetic sites: 4-6 ACS lines), while fastMRI's 320-368 lines keep
   26-29 acquired ACS lines. Prospective data calibrate from the acquired lines only (at least
   4, with a warning under 8). The maps are cached per calibration width
   (:mod:`recon.data.prepare`), computed if absent.

Prospective data (``prospective=True``, k-space undersampled at acquisition with exact zeros on
the skipped lines): the mask is read from the data (:func:`~recon.physics.masks.sampled_mask`)
or given, the maps come from the acquired ACS lines, and there is no reference: ``target`` is
NaN and ``meta["reference"]`` is False.

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
from recon.physics.masks import (
    ESPIRIT_MIN_LINES,
    MIN_CALIB_LINES,
    SamplingSummary,
    acs_box_width,
    acs_slice,
    calibration_width,
    make_mask,
    nominal_acs_lines,
    sampled_mask,
    slice_seed,
)

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


def acs_rss_max(kspace: np.ndarray, acs_frac: float = 0.08, n_lines: int | None = None) -> float:
    """Max of the RSS image from the central ``acs_frac * W`` phase-encode lines of ``[C, H, W]``
    (or the central ``n_lines``, e.g. the ACS block of an acquired mask).

    The normalisation of Levac et al. 2023, Sec. 3.1: divide k-space by this value.
    """
    low = np.zeros_like(kspace)
    w = kspace.shape[-1]
    if n_lines is None:
        acs = acs_slice(w, acs_frac)
    else:
        acs = slice(w // 2 - n_lines // 2, w // 2 - n_lines // 2 + n_lines)
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
    masks : array, optional
        Use this sampling pattern instead of generating one (retrospective with a given mask, or
        the mask of prospective data): ``[W]`` (phase-encode lines), ``[H, W]`` or ``[S, H, W]``
        (one per slice), in the working orientation (phase encode along ``W``, after rotation).
    prospective : bool
        The files hold k-space undersampled at acquisition (exact zeros on the skipped lines):
        the mask is read from the data unless ``masks`` is given, and there is no reference
        (``target`` is NaN). A crop may only change the readout size.
    min_calib : int
        Narrowest calibration box (:data:`MIN_CALIB_LINES`).

    Attributes
    ----------
    files : list of Path
        The valid files used.
    errors : list of DataError
        Files of this split that were skipped, each naming file and field.
    calibration : dict
        ``lines`` (narrowest calibration box over the files) and ``source`` (``"acquired ACS"``,
        or ``"fully sampled centre (floor)"`` where the masks keep fewer than ``min_calib``
        lines).

    Raises
    ------
    DataError
        If the split has no usable file; with ``strict=True`` (one file asked for by name, as
        ``fedunroll recon`` does) the first bad file's own error, without a warning.
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
        masks: np.ndarray | None = None,
        prospective: bool = False,
        min_calib: int = MIN_CALIB_LINES,
        strict: bool = False,
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
        self.fixed_masks = None if masks is None else np.asarray(masks, dtype=np.float32)
        self.prospective = prospective
        self.min_calib = int(min_calib)
        self.calibration: dict[str, Any] = {}
        self._calib: list[tuple[int, str]] = []
        self._cache_dir = cache_dir
        self._calib_arg = calib
        self._map_kwargs = map_kwargs
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
                vol = read_volume(path, name=name, expect_full=not prospective)
                rot = bool(vol.attrs.get("readout") == "horizontal") if rotate is None else rotate
                kspace, masks = self._kspace_and_masks(vol.kspace, path, name, rot)
                maps, calib_info = self._maps(path, name, root, kspace, masks, maps_method)
                n = vol.num_slices
                if max_slices is not None:
                    n = min(n, max_slices - len(self._items))
                items = [
                    self._make(kspace[s], maps[s], masks[s], path, name, s, rot, vol.attrs)
                    for s in range(n)
                ]
                for it in items:
                    it.meta.update(calib_lines=calib_info[0], calib_from=calib_info[1])
                self._calib.append(calib_info)
            except DataError as err:
                if strict:  # one file asked for by name: its own error, once
                    raise
                self.errors.append(err)
                continue
            self.files.append(path)
            self._items.extend(items)
        for bad in self.errors:
            warnings.warn(f"skipping bad file: {bad}", stacklevel=2)
        if self._calib:
            self.calibration = {
                "lines": min(c for c, _ in self._calib),
                "source": ", ".join(sorted({src for _, src in self._calib})),
            }
        if not self._items:
            detail = "; ".join(str(e) for e in self.errors) or "no .h5 files"
            raise DataError(root / split, "split", f"no usable slices ({detail})")

    def _slice_masks(self, n: int, shape: tuple[int, int], path: Path, name: str) -> np.ndarray:
        """Masks ``[n, H, W]`` of a file in the working orientation: the given ones, else the
        seeded ones of the mask keys."""
        h, w = shape
        if self.fixed_masks is None:
            return np.stack(
                [
                    make_mask(
                        self.mask_kind,
                        shape,
                        self.accel,
                        self.acs_frac,
                        slice_seed(path.name, s, self.seed),
                    )
                    for s in range(n)
                ]
            )
        m = self.fixed_masks
        if m.ndim == 1:
            m = m[None, :]
        if m.shape[-1] != w or m.shape[-2] not in (1, h) or (m.ndim == 3 and m.shape[0] != n):
            raise DataError(
                name,
                "mask",
                f"mask of shape {self.fixed_masks.shape} does not fit {n} slices of {h}x{w} "
                "(phase encode along W; expected [W], [H, W] or [slices, H, W])",
            )
        m = np.broadcast_to(m.reshape(-1, m.shape[-2], w), (n, h, w))
        return (m != 0).astype(np.float32)

    def _kspace_and_masks(
        self, raw: np.ndarray, path: Path, name: str, rot: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """The file's k-space ``[S, C, H, W]`` (file orientation, cropped) and its masks
        ``[S, H, W]`` (working orientation)."""
        n = raw.shape[0]
        if not self.prospective:
            kspace = crop_kspace(raw, self.crop, name)
            shape = kspace.shape[-2:][::-1] if rot else kspace.shape[-2:]
            return kspace, self._slice_masks(n, (int(shape[0]), int(shape[1])), path, name)
        # Undersampled at acquisition: read the mask before a crop smears the zero lines.
        work = np.swapaxes(raw, -1, -2) if rot else raw
        h, w = work.shape[-2:]
        if self.fixed_masks is None:
            masks = sampled_mask(work)  # [S, H, W]
        else:
            masks = self._slice_masks(n, (h, w), path, name)
        if self.crop is not None:
            pe = self.crop[0] if rot else self.crop[1]
            if pe != w:
                raise DataError(
                    name,
                    "kspace",
                    f"undersampled data: a crop may only change the readout size, not the {w} "
                    f"phase-encode lines (crop {self.crop[0]}x{self.crop[1]})",
                )
            if not np.all(masks == masks[:, :1]):
                raise DataError(name, "kspace", "a crop of 2D-undersampled data is not supported")
            ro = self.crop[1] if rot else self.crop[0]
            masks = np.ascontiguousarray(masks[:, :1].repeat(ro, axis=1))  # 1D lines
        kspace = crop_kspace(raw, self.crop, name)
        file_masks = np.swapaxes(masks, -1, -2) if rot else masks
        return (kspace * file_masks[:, None]).astype(np.complex64), masks

    def _maps(
        self,
        path: Path,
        name: str,
        root: Path,
        kspace: np.ndarray,
        masks: np.ndarray,
        method: str,
    ) -> tuple[np.ndarray, tuple[int, str]]:
        """Coil maps of a file from the ACS lines its masks keep (see the module docstring),
        with the calibration width and where its lines came from."""
        own_masks = self.prospective or self.fixed_masks is not None
        acs = (
            acs_box_width(masks)
            if own_masks
            else nominal_acs_lines(self.mask_kind, masks.shape, self.acs_frac)
        )
        if acs == 0:
            raise DataError(name, "mask", "no fully sampled centre line to calibrate coil maps")
        if self._calib_arg is not None:
            width = min(int(self._calib_arg), *masks.shape[-2:])
        elif self.prospective:  # only what was acquired (widening would add unacquired lines)
            width = calibration_width(masks.shape, acs, min(self.min_calib, ESPIRIT_MIN_LINES))
        else:
            width = calibration_width(masks.shape, acs, self.min_calib)
        # The calibration box holds only ACS lines (width <= acs): the same k-space a scanner
        # has there, so the maps are a function of (file, width) and the cache key says which.
        # Retrospectively the periphery that sets ESPIRiT's noise threshold is fully sampled.
        calib_kspace = kspace
        source = "acquired ACS"
        if width > acs and not self.prospective:
            source = "fully sampled centre" + (" (floor)" if self._calib_arg is None else "")
        elif self.prospective and acs < self.min_calib:
            warnings.warn(
                f"{name}: only {acs} ACS lines acquired (coil maps from fewer than "
                f"{self.min_calib} lines are often poor); calibrating from the central {width}"
                + (f", {width - acs} of them not fully acquired" if width > acs else ""),
                stacklevel=3,
            )
        maps, _ = load_or_compute_maps(
            path,
            calib_kspace,
            root,
            method,
            width,
            self._map_kwargs,
            cache_dir=self._cache_dir,
            crop=self.crop,
        )
        return maps, (width, source)

    def _make(
        self,
        full: np.ndarray,
        maps: np.ndarray,
        mask: np.ndarray,
        path: Path,
        name: str,
        s: int,
        rotate: bool,
        attrs: dict[str, Any],
    ) -> Sample:
        if rotate:  # horizontal readout -> readout along H, phase encode along W
            full = np.swapaxes(full, -1, -2)
            maps = np.swapaxes(maps, -1, -2)
        own_acs = self.prospective or self.fixed_masks is not None
        lines = acs_box_width(mask) if own_acs else None
        peak = acs_rss_max(full, self.acs_frac, lines)
        if not np.isfinite(peak) or peak <= 0:
            raise DataError(name, "kspace", f"slice {s}: no signal in the ACS lines")
        full = (full / peak).astype(np.complex64)  # [C, H, W], max ACS-RSS == 1
        meta = {
            "file": name,
            "slice": s,
            "site": self.site,
            "acquisition": attrs.get("acquisition", ""),
            "scale": 1.0 / peak,
            "rotated": rotate,
            "reference": not self.prospective,
        }
        maps_t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.complex64))
        if self.prospective:  # no fully sampled reference: NaN, so no metric can pass unnoticed
            return Sample(
                kspace=torch.from_numpy(np.ascontiguousarray(full * mask)),
                mask=torch.from_numpy(np.ascontiguousarray(mask)),
                maps=maps_t,
                target=torch.full(full.shape[-2:], float("nan")),
                meta=meta,
            )
        coil_images = np_ifft2c(full)  # [C, H, W]
        target = np_rss(coil_images).astype(np.float32)  # [H, W]
        image = np.sum(np.conj(maps) * coil_images, axis=0).astype(np.complex64)  # S^H F^H y
        return Sample(
            kspace=torch.from_numpy(np.ascontiguousarray(full * mask)),
            mask=torch.from_numpy(np.ascontiguousarray(mask)),
            maps=maps_t,
            target=torch.from_numpy(target),
            meta=meta,
            image=torch.from_numpy(image),
        )

    def sampling(self) -> SamplingSummary:
        """How these slices are sampled (mask kind, R, ACS lines, seed, effective R)."""
        masks = np.stack([s.mask.numpy() for s in self._items])
        if self.prospective and self.fixed_masks is None:
            return SamplingSummary.of(masks, "acquired")
        if self.fixed_masks is not None:
            return SamplingSummary.of(masks, "file")
        acs = nominal_acs_lines(self.mask_kind, masks.shape, self.acs_frac)
        return SamplingSummary.of(masks, self.mask_kind, self.accel, self.seed, acs)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, idx: int) -> Sample:
        """The ``idx``-th slice (the same tensors every epoch; treat them as read-only)."""
        return self._items[idx]


def file_samples(path: str | os.PathLike[str], **kwargs: Any) -> SiteDataset:
    """All slices of one h5 file through the same pipeline as :class:`SiteDataset`.

    Coil maps are cached under ``cache_dir`` (default the file's folder's ``.cache/``, like a
    site's; ``fedunroll recon`` passes its output folder, never the input's). A bad file raises
    :class:`DataError` naming the file and field.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "file", "does not exist")
    return SiteDataset(p.parent, files=[p], strict=True, **kwargs)

"""Read, write and validate fastMRI-layout multi-coil h5 files.

Layout (fastMRI, Zbontar et al. 2018): dataset ``kspace`` complex ``[slices, coils, H, W]``
(``H`` readout, ``W`` phase encode), optional ``reconstruction_rss`` ``[slices, h, w]``, optional
``ismrmrd_header`` (XML string), and file attributes such as ``acquisition``, ``site``,
``field_strength``. Every problem raises :class:`DataError` naming the file and the field, so a
site can report exactly which input is wrong and still use its other files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from recon.fileio import atomic_path

KSPACE = "kspace"
RSS = "reconstruction_rss"
HEADER = "ismrmrd_header"


class DataError(Exception):
    """Bad input data; the message always reads ``"<file>: field '<field>': <reason>"``.

    Attributes
    ----------
    file : str
        The file (or folder) at fault, as shown to the user.
    field : str
        The h5 key / attribute / pseudo-field (``'file'``, ``'split'``) at fault.
    reason : str
        What is wrong.
    """

    def __init__(self, file: str | os.PathLike[str], field: str, reason: str) -> None:
        self.file = str(file)
        self.field = field
        self.reason = reason
        super().__init__(f"{self.file}: field '{field}': {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (DataError, (self.file, self.field, self.reason))


@dataclass
class Volume:
    """One fastMRI-layout file in memory.

    Attributes
    ----------
    kspace : complex64 ndarray ``[S, C, H, W]``
    rss : float32 ndarray ``[S, h, w]`` or None
    attrs : dict of file attributes (``acquisition``, ``site``, ``field_strength``, ...)
    header : str or None
        The ``ismrmrd_header`` XML, if present.
    path : Path
    """

    kspace: np.ndarray
    rss: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    header: str | None = None
    path: Path = Path()

    @property
    def num_slices(self) -> int:
        return int(self.kspace.shape[0])


def _shown(path: Path, name: str | None) -> str:
    return name if name is not None else str(path)


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _check_finite(ds: h5py.Dataset, shown: str, key: str) -> None:
    """Scan a dataset slice by slice (bounded memory) for NaN / Inf."""
    bad = 0
    for i in range(ds.shape[0]):
        bad += int(np.count_nonzero(~np.isfinite(ds[i])))
    if bad:
        raise DataError(shown, key, f"contains {bad} NaN/Inf values")


def _validate(f: h5py.File, shown: str, check_values: bool) -> tuple[int, int, int, int]:
    if KSPACE not in f:
        raise DataError(shown, KSPACE, f"missing (keys present: {sorted(f.keys()) or 'none'})")
    ds = f[KSPACE]
    if not isinstance(ds, h5py.Dataset):
        raise DataError(shown, KSPACE, "is a group, expected a dataset")
    if ds.ndim != 4:
        raise DataError(
            shown, KSPACE, f"expected 4 dims [slices, coils, H, W], got {ds.ndim} {ds.shape}"
        )
    if ds.dtype.kind != "c":
        raise DataError(shown, KSPACE, f"expected complex values, got dtype {ds.dtype}")
    s, c, h, w = (int(n) for n in ds.shape)
    for n, what in ((s, "slices"), (c, "coils"), (h, "H"), (w, "W")):
        if n == 0:
            raise DataError(shown, KSPACE, f"zero {what} in shape {ds.shape}")
    if RSS in f:
        r = f[RSS]
        if not isinstance(r, h5py.Dataset) or r.ndim != 3:
            raise DataError(shown, RSS, f"expected 3 dims [slices, H, W], got {_shape_of(r)}")
        if r.shape[0] != s:
            raise DataError(shown, RSS, f"has {r.shape[0]} slices but kspace has {s}")
    if check_values:
        try:
            _check_finite(ds, shown, KSPACE)
        except (OSError, RuntimeError) as err:
            raise DataError(shown, KSPACE, f"unreadable data ({err})") from err
    return s, c, h, w


def _shape_of(obj: Any) -> str:
    return str(getattr(obj, "shape", "a group"))


def _open(path: Path, shown: str) -> h5py.File:
    if not path.is_file():
        raise DataError(shown, "file", "does not exist")
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as err:
        raise DataError(shown, "file", f"not a readable HDF5 file ({err})") from err


def check_file(path: str | os.PathLike[str], name: str | None = None) -> tuple[int, int, int, int]:
    """Validate a file without keeping its data in memory.

    Returns
    -------
    (slices, coils, H, W)

    Raises
    ------
    DataError
        Missing key, wrong rank, non-complex, zero slices/coils, NaN/Inf, corrupt file.
    """
    p = Path(path)
    shown = _shown(p, name)
    with _open(p, shown) as f:
        try:
            return _validate(f, shown, check_values=True)
        except (OSError, RuntimeError, KeyError) as err:
            raise DataError(shown, "file", f"corrupt HDF5 content ({err})") from err


def read_volume(
    path: str | os.PathLike[str], name: str | None = None, slices: slice | None = None
) -> Volume:
    """Read and validate a fastMRI-layout file.

    Parameters
    ----------
    path : path-like
    name : str, optional
        How to name the file in errors (e.g. ``"site3/train/vol01.h5"``); default the path.
    slices : slice, optional
        Read only these slices.

    Returns
    -------
    Volume
        ``kspace`` as complex64 ``[S, C, H, W]``.
    """
    p = Path(path)
    shown = _shown(p, name)
    sel = slice(None) if slices is None else slices
    with _open(p, shown) as f:
        try:
            _validate(f, shown, check_values=False)
        except (OSError, RuntimeError, KeyError) as err:
            raise DataError(shown, "file", f"corrupt HDF5 content ({err})") from err
        try:
            kspace = np.asarray(f[KSPACE][sel], dtype=np.complex64)
            rss = np.asarray(f[RSS][sel], dtype=np.float32) if RSS in f else None
            header = None
            if HEADER in f:
                raw = f[HEADER][()]
                header = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
        except (OSError, RuntimeError) as err:
            raise DataError(shown, KSPACE, f"unreadable data ({err})") from err
    if kspace.shape[0] == 0:
        raise DataError(shown, KSPACE, f"slice selection {sel} is empty")
    bad = int(np.count_nonzero(~np.isfinite(kspace)))
    if bad:
        raise DataError(shown, KSPACE, f"contains {bad} NaN/Inf values")
    return Volume(kspace=kspace, rss=rss, attrs=attrs, header=header, path=p)


def write_volume(
    path: str | os.PathLike[str],
    kspace: np.ndarray,
    rss: np.ndarray | None = None,
    attrs: Mapping[str, Any] | None = None,
    header: str | None = None,
) -> Path:
    """Write a fastMRI-layout file atomically (temporary file, then ``os.replace``).

    Parameters
    ----------
    kspace : complex ndarray ``[S, C, H, W]`` (stored as complex64)
    rss : ndarray ``[S, h, w]``, optional (stored as float32)
    attrs : mapping, optional
        Scalar / string file attributes.
    header : str, optional
        ``ismrmrd_header`` XML.
    """
    p = Path(path)
    k = np.asarray(kspace)
    if k.ndim != 4 or not np.iscomplexobj(k):
        raise ValueError(f"kspace must be complex [slices, coils, H, W], got {k.dtype} {k.shape}")
    with atomic_path(p) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(KSPACE, data=k.astype(np.complex64, copy=False))
        if rss is not None:
            f.create_dataset(RSS, data=np.asarray(rss, dtype=np.float32))
        if header is not None:
            f.create_dataset(HEADER, data=header)
        for key, val in (attrs or {}).items():
            f.attrs[key] = val
    return p


def list_h5(folder: str | os.PathLike[str]) -> list[Path]:
    """Data files in ``folder`` (``*.h5``, sorted, hidden and temporary files skipped)."""
    d = Path(folder)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.h5") if p.is_file() and not p.name.startswith("."))


SPLITS = ("train", "val", "test")


def site_files(site_dir: str | os.PathLike[str]) -> list[Path]:
    """All data files of a site: ``site_dir/{train,val,test}/*.h5`` plus ``site_dir/*.h5``."""
    root = Path(site_dir)
    files = list_h5(root)
    for split in SPLITS:
        files += list_h5(root / split)
    return files


def display_name(path: Path, site_dir: str | os.PathLike[str]) -> str:
    """Name a file relative to the site's parent folder, e.g. ``site3/train/vol01.h5``."""
    root = Path(site_dir).resolve()
    try:
        return str(Path(path).resolve().relative_to(root.parent))
    except ValueError:
        return str(path)


def scan_site(site_dir: str | os.PathLike[str]) -> tuple[list[Path], list[DataError]]:
    """Validate every h5 file of a site.

    Returns
    -------
    valid_files : list of Path
        Files that passed :func:`check_file` (usable).
    errors : list of DataError
        One per bad file, naming the file and the field; bad files never stop the good ones.
    """
    root = Path(site_dir)
    if not root.is_dir():
        return [], [DataError(root, "site_dir", "is not a directory")]
    valid: list[Path] = []
    errors: list[DataError] = []
    for p in site_files(root):
        try:
            check_file(p, name=display_name(p, root))
        except DataError as err:
            errors.append(err)
        else:
            valid.append(p)
    return valid, errors

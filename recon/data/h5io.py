"""Read, write and validate fastMRI-layout multi-coil h5 files.

Layout (fastMRI, Zbontar et al. 2018): dataset ``kspace`` complex ``[slices, coils, H, W]``
(``H`` readout, ``W`` phase encode), optional ``reconstruction_rss`` ``[slices, h, w]``, optional
``ismrmrd_header`` (XML string), and file attributes such as ``acquisition``, ``site``,
``field_strength``. Every problem raises :class:`DataError` naming the file and the field, so a
site can report exactly which input is wrong and still use its other files.

Complex ``kspace`` may also be stored as a compound of ``r``/``i`` or ``real``/``imag`` floats
(as MATLAB v7.3 writes it) or as floats ``[slices, coils, H, W, 2]`` (real, imaginary); it is
read as complex64. Reading runs the input checks of :mod:`recon.data.checks` (layout, finite
values, centred k-space, fully sampled) before any work. A MATLAB v7.3 variable (axes reversed)
or an ISMRMRD raw-data file is refused with the ``fedunroll convert`` command that reads it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from recon.data.checks import (
    COMPLEX_FORMS,
    DataError,
    DataWarning,
    Finding,
    check_kspace,
    coil_axis_reason,
    complex_kind,
    redact_paths,
    suggest_layout,
    to_complex,
)
from recon.fileio import atomic_path

KSPACE = "kspace"
RSS = "reconstruction_rss"
HEADER = "ismrmrd_header"


__all__ = [
    "HEADER",
    "KSPACE",
    "RSS",
    "SPLITS",
    "DataError",
    "DataWarning",
    "Volume",
    "check_file",
    "display_name",
    "list_h5",
    "read_volume",
    "scan_site",
    "site_files",
    "write_volume",
]


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
    checks : list of str
        The input checks that ran (:data:`recon.data.checks.CHECK_NAMES`).
    findings : list of Finding
        Their warnings (e.g. k-space already undersampled), also emitted as ``DataWarning``.
    """

    kspace: np.ndarray
    rss: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    header: str | None = None
    path: Path = Path()
    checks: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

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


def _check_finite(ds: h5py.Dataset, shown: str, key: str, kind: str) -> None:
    """Scan a dataset slice by slice (bounded memory) for NaN / Inf."""
    bad = 0
    for i in range(ds.shape[0]):
        bad += int(np.count_nonzero(~np.isfinite(to_complex(ds[i], kind))))
    if bad:
        raise DataError(shown, key, f"contains {bad} NaN/Inf values")


def _convert_hint(shown: str, extra: str = "") -> str:
    return f"fedunroll convert {Path(shown).name} OUT.h5{extra}"


def _foreign_format(f: h5py.File, shown: str) -> str | None:
    """Why this HDF5 file is another format that ``fedunroll convert`` reads, else None."""
    ds = f.get("dataset")
    if isinstance(ds, h5py.Group) and "data" in ds:
        return f"an ISMRMRD raw-data file (group 'dataset'); convert it: {_convert_hint(shown)}"
    for key, obj in f.items():
        if isinstance(obj, h5py.Dataset) and "MATLAB_class" in obj.attrs:
            return (
                f"a MATLAB v7.3 file (variable '{key}'); convert it: "
                f"{_convert_hint(shown, f' --var {key}')}"
            )
    return None


def _validate(
    f: h5py.File, shown: str, check_values: bool
) -> tuple[tuple[int, int, int, int], str]:
    """Structural checks of ``kspace`` (and ``reconstruction_rss``): ``((S, C, H, W), kind)``
    with ``kind`` how complex values are stored (:func:`recon.data.checks.complex_kind`)."""
    if KSPACE not in f:
        keys = sorted(f.keys()) or "none"
        other = _foreign_format(f, shown)
        raise DataError(
            shown, KSPACE, f"missing (keys present: {keys})" + (f"; {other}" if other else "")
        )
    ds = f[KSPACE]
    if not isinstance(ds, h5py.Dataset):
        raise DataError(shown, KSPACE, "is a group, expected a dataset")
    if "MATLAB_class" in ds.attrs:
        raise DataError(
            shown,
            KSPACE,
            f"a MATLAB v7.3 variable: MATLAB writes axes in reverse order, so shape {ds.shape} "
            f"is its size() reversed; convert it: {_convert_hint(shown, ' --var kspace')}",
        )
    kind = complex_kind(ds.dtype, ds.shape)
    rank = 5 if kind == "pairs" else 4
    if ds.ndim != rank:
        raise DataError(
            shown,
            KSPACE,
            f"expected 4 dims [slices, coils, H, W], got {ds.ndim} {ds.shape}; other layouts: "
            f"{_convert_hint(shown, ' --layout ...')}",
        )
    if kind is None:
        raise DataError(
            shown, KSPACE, f"expected complex values ({COMPLEX_FORMS}), got dtype {ds.dtype}"
        )
    s, c, h, w = (int(n) for n in ds.shape[:4])
    for n, what in ((s, "slices"), (c, "coils"), (h, "H"), (w, "W")):
        if n == 0:
            raise DataError(shown, KSPACE, f"zero {what} in shape {ds.shape}")
    hint = suggest_layout("schw", (s, c, h, w)) or "shwc"
    misplaced = coil_axis_reason((s, c, h, w), f" ({_convert_hint(shown, f' --layout {hint}')})")
    if misplaced is not None:
        raise DataError(shown, KSPACE, misplaced)
    if RSS in f:
        r = f[RSS]
        if not isinstance(r, h5py.Dataset) or r.ndim != 3:
            raise DataError(shown, RSS, f"expected 3 dims [slices, H, W], got {_shape_of(r)}")
        if r.shape[0] != s:
            raise DataError(shown, RSS, f"has {r.shape[0]} slices but kspace has {s}")
    if check_values:
        try:
            _check_finite(ds, shown, KSPACE, kind)
        except (OSError, RuntimeError) as err:
            raise DataError(shown, KSPACE, f"unreadable data ({redact_paths(str(err))})") from err
    return (s, c, h, w), kind


def _shape_of(obj: Any) -> str:
    return str(getattr(obj, "shape", "a group"))


def _open(path: Path, shown: str) -> h5py.File:
    if not path.is_file():
        raise DataError(shown, "file", "does not exist")
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as err:
        why = redact_paths(str(err))
        raise DataError(shown, "file", f"not a readable HDF5 file ({why})") from err


def check_file(path: str | os.PathLike[str], name: str | None = None) -> tuple[int, int, int, int]:
    """Validate a file's structure and values without keeping its data in memory.

    Returns
    -------
    (slices, coils, H, W)

    Raises
    ------
    DataError
        Missing key, wrong rank or layout (coil axis last, MATLAB / ISMRMRD file), non-complex,
        zero slices/coils, NaN/Inf, corrupt file.
    """
    p = Path(path)
    shown = _shown(p, name)
    with _open(p, shown) as f:
        try:
            return _validate(f, shown, check_values=True)[0]
        except (OSError, RuntimeError, KeyError) as err:
            why = redact_paths(str(err))
            raise DataError(shown, "file", f"corrupt HDF5 content ({why})") from err


def read_volume(
    path: str | os.PathLike[str],
    name: str | None = None,
    slices: slice | None = None,
    *,
    expect_full: bool = True,
    accel: float | None = None,
    warn: bool = True,
) -> Volume:
    """Read and check a fastMRI-layout file.

    Parameters
    ----------
    path : path-like
    name : str, optional
        How to name the file in errors (e.g. ``"site3/train/vol01.h5"``); default the path.
    slices : slice, optional
        Read only these slices.
    expect_full : bool
        The k-space is meant to be fully sampled (training, retrospective evaluation): an
        already undersampled file gives a finding. False for prospective reconstruction.
    accel : float, optional
        The acceleration the file will be used at: above the coil count gives a finding.
    warn : bool
        Emit the findings as :class:`~recon.data.checks.DataWarning` (they are also in
        ``Volume.findings``).

    Returns
    -------
    Volume
        ``kspace`` as complex64 ``[S, C, H, W]``.

    Raises
    ------
    DataError
        Structure (as :func:`check_file`), NaN/Inf, or k-space not centred.
    """
    p = Path(path)
    shown = _shown(p, name)
    sel = slice(None) if slices is None else slices
    with _open(p, shown) as f:
        try:
            _, kind = _validate(f, shown, check_values=False)
        except (OSError, RuntimeError, KeyError) as err:
            why = redact_paths(str(err))
            raise DataError(shown, "file", f"corrupt HDF5 content ({why})") from err
        try:
            kspace = to_complex(f[KSPACE][sel], kind)
            rss = np.asarray(f[RSS][sel], dtype=np.float32) if RSS in f else None
            header = None
            if HEADER in f:
                raw = f[HEADER][()]
                header = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
        except (OSError, RuntimeError) as err:
            raise DataError(shown, KSPACE, f"unreadable data ({redact_paths(str(err))})") from err
    if kspace.shape[0] == 0:
        raise DataError(shown, KSPACE, f"slice selection {sel} is empty")
    report = check_kspace(kspace, shown, expect_full=expect_full, accel=accel)
    if warn:
        for finding in report.findings:
            warnings.warn(str(finding), DataWarning, stacklevel=2)
    return Volume(
        kspace=kspace,
        rss=rss,
        attrs=attrs,
        header=header,
        path=p,
        checks=["layout", *report.ran],
        findings=report.findings,
    )


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

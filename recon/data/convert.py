"""Scanner data -> fastMRI-layout h5 (``fedunroll convert``), checked like every other input.

Sources (detected from the file's content, not its name):

- **ISMRMRD raw data** (the HDF5 file of the ``ismrmrd`` converters: group ``dataset`` with
  ``data`` and ``xml``), read with the ``ismrmrd`` package. Cartesian 2D multi-slice only:
  every imaging (and parallel-calibration) acquisition is one readout line of ``coils x
  samples``, placed by its encoding counters at slice ``idx.slice`` and phase-encode column
  ``idx.kspace_encode_step_1`` (shifted so the header's ``encodingLimits`` centre lands at
  ``W // 2``), its ``center_sample`` at ``H // 2``; missing lines stay zero (zero-filled);
  repeated averages are averaged; only the first contrast / phase / repetition / set is kept
  (a note says how many were dropped); noise, navigator, phase-correction and other non-imaging
  acquisitions are skipped; reversed lines (``ACQ_IS_REVERSE``) are flipped. The header XML is
  stored as ``ismrmrd_header`` (as the fastMRI files have it; it may hold subject information,
  and it stays at the site like the k-space).
- **MATLAB v7.3** ``.mat`` files (HDF5 with a 512-byte MATLAB header): a complex variable given
  by name (``var``) or the only complex one. MATLAB stores complex arrays as a compound of
  ``real``/``imag`` and writes dimensions in reverse order (it is column-major): a MATLAB
  variable of ``size(kspace) == [H W coils slices]`` is an HDF5 dataset of shape
  ``(slices, coils, W, H)``. ``layout`` for a MATLAB file is therefore given in MATLAB's own
  ``size()`` order (default ``hwcs``, i.e. ``kspace(kx, ky, coil, slice)``); it is reversed here.
- **Any other h5** (e.g. a coil-last fastMRI-like file): dataset ``var`` (default ``kspace``,
  else the only complex one), ``layout`` in numpy / h5py order (default ``schw``).

A layout is one letter per stored axis: ``s`` slices, ``c`` coils, ``h`` H (readout, frequency
encode), ``w`` W (phase encode), ``r`` a real/imag axis of length 2 (for arrays stored as real
floats). ``s`` may be absent (one slice). The output is ``kspace`` complex64
``[slices, coils, H, W]``; before it is written, the input checks of :mod:`recon.data.checks`
run on it (layout, finite values, centred k-space; sampling and acceleration are reported).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from recon.data.checks import (
    COMPLEX_FORMS,
    CheckReport,
    DataError,
    check_kspace,
    coil_axis_reason,
    complex_kind,
    compound_fields,
    suggest_layout,
    to_complex,
)
from recon.data.h5io import HEADER, KSPACE, RSS, write_volume

FORMATS = ("ismrmrd", "matlab", "h5")
AXES = {"s": "slices", "c": "coils", "h": "H (readout)", "w": "W (phase encode)", "r": "real/imag"}
TARGET = "schw"
MATLAB_DEFAULT = {4: "hwcs", 3: "hwc"}
H5_DEFAULT = {4: "schw", 3: "chw"}
# Names a k-space variable usually has, when a file holds several complex ones.
USUAL_NAMES = ("kspace", "ksp", "kdata", "k", "raw", "rawdata", "data")
MAT73_MAGIC = b"MATLAB 7.3 MAT-file"
MAT5_MAGIC = b"MATLAB 5.0 MAT-file"


@dataclass
class Converted:
    """Data read from a source, in the fastMRI layout (before writing).

    Attributes
    ----------
    kspace : complex64 ndarray ``[S, C, H, W]``
    source_format : {'ismrmrd', 'matlab', 'h5'}
    variable : str or None
        The dataset / MATLAB variable read.
    layout : str or None
        The source layout used, in the source's own axis order (MATLAB: ``size()`` order).
    header : str or None
        ISMRMRD header XML.
    rss : ndarray or None
        ``reconstruction_rss`` kept from an h5 source.
    attrs : dict
        File attributes to write.
    notes : list of str
        What the conversion dropped or assumed.
    """

    kspace: np.ndarray
    source_format: str
    variable: str | None = None
    layout: str | None = None
    header: str | None = None
    rss: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ConvertReport:
    """What :func:`convert` wrote and checked."""

    output: Path
    source_format: str
    variable: str | None
    layout: str | None
    shape: tuple[int, ...]
    checks: CheckReport
    notes: list[str]


# --- format and layout -----------------------------------------------------------------------


def detect_format(path: Path, shown: str) -> str:
    """``'ismrmrd'``, ``'matlab'`` (v7.3) or ``'h5'``; a :class:`DataError` for anything else."""
    if not path.is_file():
        raise DataError(shown, "file", "does not exist")
    with open(path, "rb") as f:
        head = f.read(128)
    if head.startswith(MAT5_MAGIC) or (head.startswith(b"MATLAB") and b"7.3" not in head[:32]):
        raise DataError(
            shown,
            "file",
            "a MATLAB v5/v7 MAT-file (not HDF5); save it as v7.3 in MATLAB "
            "(save('out.mat', 'kspace', '-v7.3')) and convert that",
        )
    try:
        with h5py.File(path, "r") as f:
            ds = f.get("dataset")
            if isinstance(ds, h5py.Group) and "data" in ds:
                return "ismrmrd"
            if head.startswith(MAT73_MAGIC) or any(
                "MATLAB_class" in obj.attrs for obj in f.values()
            ):
                return "matlab"
    except OSError as err:
        raise DataError(
            shown, "file", f"not HDF5 (ISMRMRD raw data, MATLAB v7.3 or h5 expected): {err}"
        ) from err
    return "h5"


def parse_layout(text: str, ndim: int, shown: str, field_name: str) -> str:
    """A layout string checked against an array of ``ndim`` axes (see the module docstring)."""
    lay = text.strip().lower().replace(",", "").replace(" ", "")
    letters = "".join(AXES)
    problems = []
    if len(lay) != ndim:
        problems.append(f"has {len(lay)} axes, the data {ndim}")
    if set(lay) - set(letters) or len(set(lay)) != len(lay):
        problems.append(f"use each of the letters {letters} at most once")
    missing = [a for a in "chw" if a not in lay]
    if missing:
        problems.append(f"needs {', '.join(AXES[a] for a in missing)}")
    if problems:
        legend = ", ".join(f"{k}={v}" for k, v in AXES.items())
        raise DataError(
            shown, field_name, f"bad --layout {text!r}: {'; '.join(problems)} ({legend})"
        )
    return lay


def apply_layout(
    arr: np.ndarray, layout: str, shown: str, field_name: str, matlab: bool = False
) -> np.ndarray:
    """``arr`` (complex, compound or real with an ``r`` axis) with its axes named by ``layout``
    (numpy order; MATLAB ``size()`` order if ``matlab``) -> complex64 ``[S, C, H, W]``.

    Refuses a result whose coil axis looks misplaced
    (:func:`recon.data.checks.coil_axis_reason`), with the layout that would read it.
    """
    lay = layout[::-1] if matlab else layout  # numpy order
    kind = complex_kind(arr.dtype, arr.shape, pairs_ndim=-1)
    if "r" in lay:
        if kind is not None:
            raise DataError(shown, field_name, f"layout has 'r' but the data are {arr.dtype}")
        if arr.dtype.kind not in "fiu":
            raise DataError(shown, field_name, f"expected {COMPLEX_FORMS}, got {arr.dtype}")
        r_axis = lay.index("r")
        if arr.shape[r_axis] != 2:
            raise DataError(
                shown, field_name, f"the 'r' axis has length {arr.shape[r_axis]}, expected 2"
            )
        k = to_complex(np.moveaxis(arr, r_axis, -1), "pairs")
        lay = lay.replace("r", "")
    elif kind is None:
        raise DataError(
            shown,
            field_name,
            f"expected complex values ({COMPLEX_FORMS}; real floats with a real/imag axis of 2 "
            f"need 'r' in --layout), got {arr.dtype} {arr.shape}",
        )
    else:
        k = to_complex(arr, kind)
    if "s" not in lay:
        k, lay = k[None], "s" + lay
    k = np.ascontiguousarray(np.transpose(k, [lay.index(a) for a in TARGET]))
    why = coil_axis_reason(k.shape)
    if why is not None:
        sizes = tuple(reversed(arr.shape)) if matlab else tuple(arr.shape)
        better = suggest_layout(layout, sizes)
        order = "MATLAB size() order" if matlab else "numpy order"
        raise DataError(
            shown, field_name, why + (f": pass --layout {better} ({order})" if better else "")
        )
    return k


def _is_complex_like(obj: Any) -> bool:
    return isinstance(obj, h5py.Dataset) and complex_kind(obj.dtype, obj.shape, -1) is not None


def _describe(f: h5py.File) -> str:
    """``name (type shape)`` of every variable (MATLAB's internal ``#refs#`` left out)."""
    parts = []
    for key, obj in f.items():
        if isinstance(obj, h5py.Dataset) and not key.startswith("#"):
            kind = complex_kind(obj.dtype, obj.shape, -1)
            what = "complex" if kind is not None else str(obj.dtype)
            parts.append(f"{key} ({what} {obj.shape})")
    return ", ".join(parts) or "none"


def pick_variable(f: h5py.File, var: str | None, shown: str, default: str | None) -> str:
    """The dataset to read: ``var``, else ``default`` if present, else the only complex one."""
    if var is not None:
        obj = f.get(var)
        if not isinstance(obj, h5py.Dataset):
            raise DataError(shown, var, f"no such variable (variables: {_describe(f)})")
        return var
    if default is not None and isinstance(f.get(default), h5py.Dataset):
        return default
    found = [k for k, obj in f.items() if not k.startswith("#") and _is_complex_like(obj)]
    if len(found) == 1:
        return found[0]
    for name in USUAL_NAMES:
        hits = [k for k in found if k.lower() == name]
        if len(hits) == 1:
            return hits[0]
    what = "several complex variables" if found else "no complex variable"
    raise DataError(
        shown,
        "var",
        f"{what} (variables: {_describe(f)}); choose one with --var NAME (real/imag stored as "
        f"an axis of 2: add --layout with 'r')",
    )


# --- readers ---------------------------------------------------------------------------------


def read_matlab(path: Path, shown: str, var: str | None, layout: str | None) -> Converted:
    """A MATLAB v7.3 variable (``layout`` in MATLAB ``size()`` order, default ``hwcs``)."""
    with h5py.File(path, "r") as f:
        name = pick_variable(f, var, shown, None)
        ds = f[name]
        if ds.attrs.get("MATLAB_class") in (b"cell", b"struct") or not isinstance(ds, h5py.Dataset):
            raise DataError(shown, name, "a cell or struct, expected a numeric array")
        matlab_shape = tuple(reversed(ds.shape))
        if layout is None:
            if compound_fields(ds.dtype) is None and ds.dtype.kind != "c":
                raise DataError(
                    shown,
                    name,
                    f"real {ds.dtype} of size {list(matlab_shape)}: if it holds real and "
                    "imaginary parts, say where with --layout (MATLAB size() order, e.g. hwcsr)",
                )
            layout = MATLAB_DEFAULT.get(ds.ndim)
            if layout is None:
                raise DataError(
                    shown,
                    name,
                    f"size {list(matlab_shape)}: give its axes with --layout in MATLAB size() "
                    "order, e.g. hwcs for kspace(kx, ky, coil, slice)",
                )
        lay = parse_layout(layout, ds.ndim, shown, name)
        arr = ds[()]
    k = apply_layout(arr, lay, shown, name, matlab=True)
    note = (
        f"MATLAB variable '{name}' of size {list(matlab_shape)} read as {lay} "
        f"(MATLAB size() order; {', '.join(AXES[a] for a in lay)})"
    )
    return Converted(k, "matlab", name, lay, notes=[note])


def read_h5(path: Path, shown: str, var: str | None, layout: str | None) -> Converted:
    """A dataset of any h5 file (``layout`` in numpy order, default ``schw``)."""
    with h5py.File(path, "r") as f:
        name = pick_variable(f, var, shown, KSPACE)
        ds = f[name]
        if layout is None:
            pairs = ds.dtype.kind == "f" and ds.ndim in (4, 5) and ds.shape[-1] == 2
            base = H5_DEFAULT.get(ds.ndim - 1 if pairs else ds.ndim)
            layout = None if base is None else base + ("r" if pairs else "")
            if layout is None:
                raise DataError(
                    shown,
                    name,
                    f"shape {ds.shape}: give its axes with --layout (numpy order, e.g. schw)",
                )
        lay = parse_layout(layout, ds.ndim, shown, name)
        arr = ds[()]
        rss = None
        if RSS in f and isinstance(f[RSS], h5py.Dataset) and f[RSS].ndim == 3:
            rss = np.asarray(f[RSS][()], dtype=np.float32)
        header = None
        if HEADER in f:
            raw = f[HEADER][()]
            header = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        attrs = {k: v for k, v in f.attrs.items()}
    k = apply_layout(arr, lay, shown, name)
    if rss is not None and rss.shape[0] != k.shape[0]:
        rss = None
    return Converted(k, "h5", name, lay, header=header, rss=rss, attrs=attrs)


# Acquisitions that are not imaging data (ismrmrd.constants flag numbers).
_SKIP_FLAGS = (
    "ACQ_IS_NOISE_MEASUREMENT",
    "ACQ_IS_NAVIGATION_DATA",
    "ACQ_IS_PHASECORR_DATA",
    "ACQ_IS_HPFEEDBACK_DATA",
    "ACQ_IS_DUMMYSCAN_DATA",
    "ACQ_IS_RTFEEDBACK_DATA",
    "ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA",
    "ACQ_IS_PHASE_STABILIZATION_REFERENCE",
    "ACQ_IS_PHASE_STABILIZATION",
)
_KEPT_FIRST = ("contrast", "phase", "repetition", "set")


def _xml_int(root: ET.Element | None, *path: str) -> int | None:
    """An integer element under ``root`` by local names (any namespace), or None."""
    node = root
    for name in path:
        if node is None:
            return None
        node = next((c for c in node if c.tag.rsplit("}", 1)[-1] == name), None)
    if node is None or node.text is None:
        return None
    try:
        return int(float(node.text))
    except ValueError:
        return None


def _header_geometry(xml: str) -> tuple[int | None, int | None, int | None, float | None]:
    """(matrix x, matrix y, phase-encode centre, field strength) of encoding 0, where given."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None, None, None
    enc = next((c for c in root if c.tag.rsplit("}", 1)[-1] == "encoding"), None)
    x = _xml_int(enc, "encodedSpace", "matrixSize", "x")
    y = _xml_int(enc, "encodedSpace", "matrixSize", "y")
    centre = _xml_int(enc, "encodingLimits", "kspace_encoding_step_1", "center")
    sysinfo = next(
        (c for c in root if c.tag.rsplit("}", 1)[-1] == "acquisitionSystemInformation"), None
    )
    b0 = None
    if sysinfo is not None:
        node = next(
            (c for c in sysinfo if c.tag.rsplit("}", 1)[-1] == "systemFieldStrength_T"), None
        )
        if node is not None and node.text:
            try:
                b0 = float(node.text)
            except ValueError:
                b0 = None
    return x, y, centre, b0


def read_ismrmrd(path: Path, shown: str) -> Converted:
    """Cartesian 2D multi-slice ISMRMRD raw data -> zero-filled ``[S, C, H, W]``."""
    import ismrmrd

    flags = {name: getattr(ismrmrd, name) for name in (*_SKIP_FLAGS, "ACQ_IS_REVERSE")}
    try:
        dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False, mode="r")
    except (OSError, LookupError) as err:
        raise DataError(shown, "dataset", f"not readable as ISMRMRD raw data ({err})") from err
    with dset:
        try:
            raw_xml = dset.read_xml_header()
        except LookupError:
            raw_xml = b""
        xml = raw_xml.decode("utf-8", "replace") if isinstance(raw_xml, bytes) else str(raw_xml)
        n_acq = dset.number_of_acquisitions()
        acqs = [dset.read_acquisition(i) for i in range(n_acq)]
    mx, my, centre, b0 = _header_geometry(xml) if xml else (None, None, None, None)
    lines = []
    dropped: dict[str, set[int]] = {name: set() for name in _KEPT_FIRST}
    skipped = 0
    for acq in acqs:
        if any(acq.is_flag_set(flags[name]) for name in _SKIP_FLAGS):
            skipped += 1
            continue
        if acq.trajectory_dimensions > 0:
            raise DataError(
                shown, "data", "non-Cartesian acquisition (trajectory given): not supported"
            )
        if acq.idx.kspace_encode_step_2 > 0:
            raise DataError(
                shown,
                "data",
                "3D acquisition (kspace_encode_step_2 > 0): fedunroll takes 2D multi-slice "
                "k-space; inverse-FFT the partition axis into slices first",
            )
        if any(getattr(acq.idx, name) != 0 for name in _KEPT_FIRST):
            for name in _KEPT_FIRST:
                if getattr(acq.idx, name) != 0:
                    dropped[name].add(int(getattr(acq.idx, name)))
            continue
        lines.append(acq)
    if not lines:
        raise DataError(
            shown, "data", f"no imaging acquisitions ({n_acq} in the file, {skipped} non-imaging)"
        )
    coils = {int(a.active_channels) for a in lines}
    if len(coils) != 1:
        raise DataError(shown, "data", f"acquisitions have different coil counts {sorted(coils)}")
    c = coils.pop()
    h = mx or max(int(a.number_of_samples) for a in lines)
    w = my or max(int(a.idx.kspace_encode_step_1) for a in lines) + 1
    e1_shift = 0 if centre is None or centre == 0 else w // 2 - centre
    n_slices = max(int(a.idx.slice) for a in lines) + 1
    k = np.zeros((n_slices, c, h, w), np.complex64)
    counts = np.zeros((n_slices, w), np.int32)
    outside = 0
    for a in lines:
        data = np.asarray(a.data, dtype=np.complex64)  # [C, samples]
        if a.is_flag_set(flags["ACQ_IS_REVERSE"]):
            data = data[:, ::-1]
        n = data.shape[1]
        start = h // 2 - (int(a.center_sample) or n // 2)
        col = int(a.idx.kspace_encode_step_1) + e1_shift
        lo, hi = max(0, start), min(h, start + n)
        if not 0 <= col < w or lo >= hi:
            outside += 1
            continue
        s = int(a.idx.slice)
        k[s, :, lo:hi, col] += data[:, lo - start : hi - start]
        counts[s, col] += 1
    averaged = counts > 1
    k[:, :, :, :] /= np.maximum(counts, 1)[:, None, None, :]
    notes = [
        f"ISMRMRD: {len(lines)} of {n_acq} acquisitions placed into {n_slices} slice(s) of "
        f"{c} coils x {h} x {w} ({skipped} non-imaging skipped)"
    ]
    if averaged.any():
        notes.append(f"{int(averaged.sum())} line(s) acquired more than once were averaged")
    if outside:
        notes.append(f"{outside} acquisition(s) outside the {h}x{w} matrix were dropped")
    for name, values in dropped.items():
        if values:
            notes.append(f"kept {name} 0 only; dropped {name} {sorted(values)}")
    attrs: dict[str, Any] = {}
    if b0 is not None:
        attrs["field_strength"] = b0
    return Converted(
        k, "ismrmrd", "dataset/data", None, header=xml or None, attrs=attrs, notes=notes
    )


def read_source(
    path: str | os.PathLike[str],
    var: str | None = None,
    layout: str | None = None,
    name: str | None = None,
) -> Converted:
    """Read ``path`` (ISMRMRD, MATLAB v7.3 or h5, detected) into the fastMRI layout."""
    p = Path(path)
    shown = name if name is not None else p.name
    fmt = detect_format(p, shown)
    if fmt == "ismrmrd":
        if var is not None or layout is not None:
            raise DataError(
                shown, "file", "ISMRMRD raw data: --var and --layout do not apply (counters do)"
            )
        return read_ismrmrd(p, shown)
    if fmt == "matlab":
        return read_matlab(p, shown, var, layout)
    return read_h5(p, shown, var, layout)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    var: str | None = None,
    layout: str | None = None,
    fftshift: bool = False,
    overwrite: bool = False,
) -> ConvertReport:
    """Convert ``src`` to a fastMRI-layout ``dst`` (``.h5``), checked before it is written.

    Parameters
    ----------
    src : path-like
        ISMRMRD raw data, MATLAB v7.3 ``.mat`` or h5.
    dst : path-like
        Output ``*.h5`` (sites read ``*.h5``); written atomically.
    var : str, optional
        Variable / dataset holding k-space (MATLAB, h5); default the only complex one.
    layout : str, optional
        Axes of ``var`` (letters ``s c h w r``; MATLAB ``size()`` order for ``.mat``).
    fftshift : bool
        Centre k-space that was stored uncentred (``numpy.fft.fftshift`` over H and W).
    overwrite : bool
        Replace an existing ``dst``.

    Raises
    ------
    DataError
        Naming the input (or output) file, the field and what to do.
    """
    out = Path(dst)
    shown = Path(src).name
    if out.suffix != ".h5":
        raise DataError(out.name, "file", "the output must end in .h5 (sites read *.h5)")
    if out.exists() and not overwrite:
        raise DataError(out.name, "file", "exists; choose another name or pass --overwrite")
    conv = read_source(src, var, layout)
    k = conv.kspace
    if fftshift:
        k = np.ascontiguousarray(np.fft.fftshift(k, axes=(-2, -1)))
        conv.notes.append("k-space fftshift-ed over H and W")
    field_name = conv.variable or KSPACE
    report = check_kspace(k, shown, expect_full=True, field_name=field_name)
    attrs = dict(conv.attrs)
    attrs.update({"source_format": conv.source_format, "source": shown})
    write_volume(out, k, rss=conv.rss, attrs=attrs, header=conv.header)
    return ConvertReport(
        output=out,
        source_format=conv.source_format,
        variable=conv.variable,
        layout=conv.layout,
        shape=tuple(int(n) for n in k.shape),
        checks=CheckReport(["layout", *report.ran], report.findings, report.sampling),
        notes=conv.notes,
    )

"""Input checks: what k-space must look like before any work is done on it.

Real scanner data reaches a site converted by hand, and the usual slips produce numbers that look
plausible but are wrong: k-space that was never ``fftshift``-ed (ESPIRiT maps come out all NaN),
an undersampled scan presented as fully sampled (the "reference" is itself aliased), a coil-last
array read as dozens of tiny coils. Each check here turns one such slip into a message that names
the file, the field and what to do, before coil maps, training or reconstruction start.

Conventions checked (README "Bring your own data"): ``kspace`` is ``[slices, coils, H, W]`` with
``H`` the readout (frequency-encode) axis and ``W`` the phase-encode axis; files whose readout runs
along ``W`` say so with the attribute ``readout="horizontal"``. Complex values may be stored as
HDF5 complex (h5py / fastMRI), as a compound of ``r``/``i`` or ``real``/``imag`` floats (MATLAB
v7.3), or as floats with a trailing axis of 2 (``[slices, coils, H, W, 2]``: real, imaginary).

Errors are :class:`DataError` (``"<file>: field '<field>': <reason>"``); suspicious but usable
input gives :class:`Finding` objects (emitted as :class:`DataWarning`). Reasons never contain a
directory path, and :meth:`DataError.redacted` strips an error down to the file's name, for
messages that leave a federated site.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KSPACE = "kspace"

# A coil axis this many times smaller than both image axes is not an image axis.
COIL_LAST_RATIO = 4
# The energy peak of centred k-space lies within this fraction of a side from the centre
# (an asymmetric echo moves it by ~1/8); a forgotten fftshift puts it at a corner (1/2).
CENTRE_TOLERANCE = 0.25
# Peak / median of the energy profile above which k-space has a peak at all (white noise ~1).
PEAK_DOMINANCE = 5.0
# Fully sampled k-space has no all-zero lines between its first and last acquired one (edge
# zero-padding and partial Fourier are contiguous); undersampled k-space has mostly such lines.
MAX_INTERIOR_ZERO_LINES = 0.2
# ... and fills its acquired box (an elliptical shutter leaves 1 - pi/4 = 21% of it empty).
MIN_BOX_FILL = 0.5

# What each check verifies, as ``fedunroll prepare`` reports it.
CHECK_NAMES = {
    "layout": "layout [slices, coils, H, W]",
    "finite": "finite values",
    "centred": "k-space centred",
    "sampling": "fully sampled",
    "accel": "acceleration <= coils",
    "maps": "coil maps finite",
}

# A token that may be a path (quotes, brackets, commas and "=" end it).
_TOKEN = re.compile(r"[^\s'\"(),;=\[\]]+")
_EXTENSION = re.compile(r"\.\w+$")


def _shorten(match: re.Match[str]) -> str:
    token = match.group(0)
    body = token.rstrip(":.")
    tail = token[len(body) :]
    parts = re.split(r"[\\/]", body)
    if len(parts) < 2:
        return token
    absolute = body[:1] in "/\\~" or re.match(r"[A-Za-z]:[\\/]", body) is not None
    if absolute or _EXTENSION.search(parts[-1]):
        return parts[-1] + tail
    return token  # "real/imag", "r/i": not a path


def redact_paths(text: str) -> str:
    """``text`` with every directory path shortened to its last component (the file's name):
    absolute paths, and relative ones that end in a file name with an extension."""
    return _TOKEN.sub(_shorten, text)


class DataError(Exception):
    """Bad input data; the message always reads ``"<file>: field '<field>': <reason>"``.

    Attributes
    ----------
    file : str
        The file (or folder) at fault, as shown to the user.
    field : str
        The h5 key / attribute / pseudo-field (``'file'``, ``'split'``) at fault.
    reason : str
        What is wrong, and what to do.
    """

    def __init__(self, file: str | os.PathLike[str], field: str, reason: str) -> None:
        self.file = str(file)
        self.field = field
        self.reason = reason
        super().__init__(f"{self.file}: field '{field}': {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (DataError, (self.file, self.field, self.reason))

    def redacted(self) -> DataError:
        """The same error naming only the file's name: no folder (a site's folders may name a
        patient or a study), also none inside the reason (e.g. from an h5py error)."""
        return DataError(Path(self.file).name, self.field, redact_paths(self.reason))


class DataWarning(UserWarning):
    """Suspicious input that is still used (an undersampled file, acceleration above coils)."""


@dataclass(frozen=True)
class Finding:
    """One check's warning about a file (usable, but the user should look)."""

    check: str
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: field '{self.field}': {self.message}"

    def error(self) -> DataError:
        """The finding as an error (where the caller cannot use such input)."""
        return DataError(self.file, self.field, self.message)


@dataclass
class CheckReport:
    """What :func:`check_kspace` ran and found (errors are raised, not collected)."""

    ran: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    sampling: Sampling | None = None


# --- complex storage -------------------------------------------------------------------------

_COMPOUND_NAMES = (("r", "i"), ("real", "imag"))


def compound_fields(dtype: np.dtype[Any]) -> tuple[str, str] | None:
    """The (real, imaginary) field names of a compound complex dtype (h5py ``r``/``i``, MATLAB
    v7.3 ``real``/``imag``), else None."""
    names = dtype.names
    if not names or len(names) != 2:
        return None
    for re_name, im_name in _COMPOUND_NAMES:
        if set(names) == {re_name, im_name}:
            kinds = {dtype.fields[n][0].kind for n in names} if dtype.fields else set()
            return (re_name, im_name) if kinds <= {"f", "i", "u"} else None
    return None


def complex_kind(dtype: np.dtype[Any], shape: tuple[int, ...], pairs_ndim: int = 5) -> str | None:
    """How an array stores complex values: ``"complex"``, ``"compound"`` (real/imag fields),
    ``"pairs"`` (real floats with a trailing axis of 2 and rank ``pairs_ndim``) or None."""
    if dtype.kind == "c":
        return "complex"
    if compound_fields(dtype) is not None:
        return "compound"
    if dtype.kind == "f" and len(shape) == pairs_ndim and shape[-1] == 2:
        return "pairs"
    return None


def to_complex(arr: np.ndarray, kind: str) -> np.ndarray:
    """complex64 values of an array stored as :func:`complex_kind` says (``pairs`` drops the
    trailing axis of 2)."""
    if kind == "complex":
        return np.asarray(arr, dtype=np.complex64)
    if kind == "compound":
        names = compound_fields(arr.dtype)
        assert names is not None
        out = np.empty(arr.shape, dtype=np.complex64)
        out.real = arr[names[0]]
        out.imag = arr[names[1]]
        return out
    if kind == "pairs":
        out = np.empty(arr.shape[:-1], dtype=np.complex64)
        out.real = arr[..., 0]
        out.imag = arr[..., 1]
        return out
    raise ValueError(f"unknown complex storage {kind!r}")


COMPLEX_FORMS = "complex, a compound of r/i or real/imag floats, or floats [slices, coils, H, W, 2]"


# --- layout ----------------------------------------------------------------------------------


def coil_axis_reason(shape: tuple[int, ...], convert_hint: str = "") -> str | None:
    """Why a ``[slices, coils, H, W]`` shape has its coil axis in the wrong place, else None.

    The coils are the smallest of the three axes; an ``H`` or ``W`` axis at least
    :data:`COIL_LAST_RATIO` times smaller than the two others is the coil axis misplaced (read as
    stored, e.g. 96 "coils" of 96x16). The usual case is coil-last ``[slices, H, W, coils]``.
    """
    if len(shape) != 4:
        return None
    _, c, h, w = (int(n) for n in shape)
    if w >= 1 and COIL_LAST_RATIO * w <= min(c, h):
        looks, coils, image = "[slices, H, W, coils]", w, (c, h)
    elif h >= 1 and COIL_LAST_RATIO * h <= min(c, w):
        looks, coils, image = "[slices, H, coils, W]", h, (c, w)
    else:
        return None
    return (
        f"shape {tuple(shape)} looks like {looks} ({coils} coils of {image[0]}x{image[1]}), not "
        f"[slices, coils, H, W] ({c} coils of {h}x{w}); transpose to [slices, coils, H, W]"
        f"{convert_hint}"
    )


def suggest_layout(layout: str, sizes: tuple[int, ...]) -> str | None:
    """A layout that puts the coils on the smallest of the ``c``/``h``/``w`` axes, if ``layout``
    does not (``H`` kept before ``W`` in the order written), else None.

    E.g. ``suggest_layout("schw", (2, 96, 96, 16)) == "shwc"``; for MATLAB's order,
    ``suggest_layout("hwcs", (3, 40, 32, 2)) == "chws"``.
    """
    pos = [i for i, a in enumerate(layout) if a in "chw"]
    if len(pos) != 3:
        return None
    small = min(pos, key=lambda i: sizes[i])
    if layout[small] == "c":
        return None
    out = list(layout)
    out[small] = "c"
    for i, a in zip([i for i in pos if i != small], "hw"):
        out[i] = a
    return "".join(out)


# --- content ---------------------------------------------------------------------------------


def _frames(kspace: np.ndarray, chunk: int = 16) -> Any:
    """``kspace [..., H, W]`` as blocks of at most ``chunk`` 2D frames (bounded memory)."""
    h, w = kspace.shape[-2:]
    flat = kspace.reshape(-1, h, w)
    for i in range(0, flat.shape[0], chunk):
        yield flat[i : i + chunk]


def energy_profiles(kspace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energy of every k-space row (along ``H``) and column (along ``W``), summed over all
    slices and coils: ``([H], [W])``."""
    h, w = kspace.shape[-2:]
    rows, cols = np.zeros(h), np.zeros(w)
    for block in _frames(kspace):
        e = np.abs(block) ** 2  # [n, H, W]
        rows += e.sum(axis=(0, 2))
        cols += e.sum(axis=(0, 1))
    return rows, cols


FFTSHIFT_FIX = (
    "apply numpy.fft.fftshift(kspace, axes={axes}) before writing the file, or convert it "
    "with `fedunroll convert IN OUT.h5 --fftshift`"
)


def centring_reason(kspace: np.ndarray) -> str | None:
    """Why ``kspace [..., H, W]`` does not look centred (its energy peak far from the centre
    ``(H // 2, W // 2)`` along an axis), else None.

    Only a dominant peak counts (peak > :data:`PEAK_DOMINANCE` times the median of the
    profile): noise-like data has none and is left to other checks.
    """
    rows, cols = energy_profiles(kspace)
    off: list[str] = []
    where: list[str] = []
    for axis, prof in (("H", rows), ("W", cols)):
        n = prof.size
        med = float(np.median(prof))
        peak = int(np.argmax(prof))
        if prof[peak] <= PEAK_DOMINANCE * max(med, np.finfo(float).tiny):
            return None  # no dominant peak: not k-space-like, nothing to say about centring
        where.append(f"{axis} {peak}")
        if abs(peak - n // 2) > CENTRE_TOLERANCE * n:
            off.append(f"{axis} (peak at {peak} of {n}, centre {n // 2})")
    if not off:
        return None
    axes = "(-2, -1)" if len(off) == 2 else ("-2" if off[0].startswith("H") else "-1")
    return (
        f"k-space is not centred: its energy peak is far from the centre along "
        f"{' and '.join(off)} (a forgotten fftshift?); {FFTSHIFT_FIX.format(axes=axes)}"
    )


@dataclass(frozen=True)
class Sampling:
    """How much of k-space is filled (per slice, the most undersampled slice reported).

    Attributes
    ----------
    filled : float
        Fraction of the ``H x W`` samples that are non-zero (in any coil).
    zero_lines : float
        Fraction of all-zero lines between the first and the last acquired line, along the
        axis with most of them (``axis``): ~0 for fully sampled k-space.
    axis : str
        ``"W"`` (lines along ``H``, i.e. phase-encode lines in the standard orientation) or
        ``"H"``.
    lines : int
        Acquired (non-zero) lines along ``axis``, of ``size``.
    size : int
    slice : int
        Index of the slice these numbers come from.
    undersampled : bool
    """

    filled: float
    zero_lines: float
    axis: str
    lines: int
    size: int
    slice: int
    undersampled: bool

    @property
    def accel(self) -> float:
        """Acceleration of the acquired lines, ``size / lines``."""
        return self.size / max(self.lines, 1)


def _interior_zero_fraction(acquired: np.ndarray) -> float:
    idx = np.flatnonzero(acquired)
    if idx.size == 0:
        return 0.0
    span = acquired[idx[0] : idx[-1] + 1]
    return float(1.0 - span.mean())


def sampling(kspace: np.ndarray) -> Sampling | None:
    """Measure how fully ``kspace [S, C, H, W]`` (or ``[C, H, W]``) is sampled; None if it is
    all zero (left to the signal checks)."""
    k = kspace if kspace.ndim == 4 else kspace[None]
    worst: Sampling | None = None
    for s in range(k.shape[0]):
        nz = np.any(k[s] != 0, axis=0)  # [H, W] acquired samples
        if not nz.any():
            continue
        cols, rows = nz.any(axis=0), nz.any(axis=1)  # [W] lines along H, [H] lines along W
        zw, zh = _interior_zero_fraction(cols), _interior_zero_fraction(rows)
        axis, zero, acquired = ("W", zw, cols) if zw >= zh else ("H", zh, rows)
        box = nz[np.ix_(rows, cols)]
        under = zero > MAX_INTERIOR_ZERO_LINES or float(box.mean()) < MIN_BOX_FILL
        cur = Sampling(
            filled=float(nz.mean()),
            zero_lines=zero,
            axis=axis,
            lines=int(acquired.sum()),
            size=int(acquired.size),
            slice=s,
            undersampled=under,
        )
        if worst is None or (cur.undersampled, -cur.filled) > (worst.undersampled, -worst.filled):
            worst = cur
    return worst


def undersampled_reason(info: Sampling) -> str:
    """The message for k-space that is already undersampled but meant as fully sampled."""
    return (
        f"k-space is already undersampled (slice {info.slice}: {info.filled:.1%} of k-space "
        f"filled, {info.zero_lines:.1%} of the lines along {info.axis} between the first and "
        f"last acquired one are all zero, {info.lines} of {info.size} lines acquired, "
        f"R ~ {info.accel:.1f}); training and retrospective evaluation need fully sampled "
        f"k-space: use fully sampled scans here, and reconstruct undersampled ones "
        f"prospectively (README 'Prospective reconstruction', fedunroll recon)"
    )


def accel_reason(accel: float, coils: int, measured: bool = False) -> str | None:
    """Why acceleration ``accel`` with ``coils`` coils is doubtful, else None."""
    if accel <= coils:
        return None
    what = "the measured acceleration" if measured else "acceleration"
    fix = (
        "expect poor reconstructions"
        if measured
        else f"use R <= {coils} (data.accel) or data with more coils"
    )
    return (
        f"{what} R={accel:.3g} is above the coil count {coils}: parallel imaging cannot unfold "
        f"more aliased copies than there are coils; {fix}"
    )


def calib_energy(kspace: np.ndarray, width: int) -> float:
    """Energy of the central ``width x width`` box of ``[..., H, W]`` k-space."""
    h, w = kspace.shape[-2:]
    r0, c0 = max(0, h // 2 - width // 2), max(0, w // 2 - width // 2)
    return float(np.sum(np.abs(kspace[..., r0 : r0 + width, c0 : c0 + width]) ** 2))


def maps_reason(
    maps: np.ndarray, kspace: np.ndarray, method: str, calib: int, slice_index: int
) -> str | None:
    """Why the coil maps ``[C, H, W]`` of one slice (from ``kspace [C, H, W]``) are unusable
    (non-finite values), with the likely cause and what to do; None if they are finite.

    E.g. ``"ESPIRiT maps are NaN at slice 3 (...): k-space not centred? ..."``.
    """
    bad = ~np.isfinite(maps)
    if not bad.any():
        return None
    what = "NaN" if np.isnan(maps).any() else "Inf"
    label = {"espirit": "ESPIRiT", "jsense": "JSENSE"}.get(method, method)
    off = centring_reason(kspace)
    if off is not None:
        cause = "k-space not centred? " + off.split(": ", 1)[1]
    elif calib_energy(kspace, calib) == 0:
        cause = (
            f"the central {calib}x{calib} calibration box of k-space is all zero; check that "
            "the k-space centre was acquired and is at (H // 2, W // 2)"
        )
    else:
        cause = (
            "the calibration failed on this slice; try the other estimator (--method jsense) "
            "or another calibration width (--calib)"
        )
    return (
        f"{label} maps are {what} at slice {slice_index} ({int(bad.sum())} of {bad.size} "
        f"values; not cached): {cause}"
    )


def check_kspace(
    kspace: np.ndarray,
    shown: str,
    *,
    expect_full: bool = True,
    accel: float | None = None,
    field_name: str = KSPACE,
) -> CheckReport:
    """Run the content checks on complex ``kspace [S, C, H, W]`` before any work.

    Raises :class:`DataError` for input that is wrong whatever the use (NaN/Inf, k-space not
    centred); returns the checks it ran and the findings for input that is only wrong for some
    uses: already undersampled k-space where ``expect_full`` (training and retrospective
    evaluation need fully sampled k-space), acceleration above the coil count.

    Parameters
    ----------
    kspace : complex ndarray ``[S, C, H, W]``
    shown : str
        How to name the file in messages.
    expect_full : bool
        The input is meant to be fully sampled (False: prospective, undersampled data).
    accel : float, optional
        The acceleration the data will be used at (``data.accel``).
    """
    rep = CheckReport()
    bad = int(np.count_nonzero(~np.isfinite(kspace)))
    rep.ran.append("finite")
    if bad:
        raise DataError(shown, field_name, f"contains {bad} NaN/Inf values")
    rep.ran.append("centred")
    off = centring_reason(kspace)
    if off is not None:
        raise DataError(shown, field_name, off)
    info = sampling(kspace)
    rep.sampling = info
    coils = int(kspace.shape[-3])
    if expect_full:
        rep.ran.append("sampling")
        if info is not None and info.undersampled:
            rep.findings.append(Finding("sampling", shown, field_name, undersampled_reason(info)))
    measured = info.accel if info is not None and info.undersampled else None
    if accel is not None or measured is not None:
        rep.ran.append("accel")
        for r, is_measured in ((accel, False), (measured, True)):
            why = accel_reason(r, coils, is_measured) if r is not None else None
            if why is not None:
                rep.findings.append(Finding("accel", shown, field_name, why))
    return rep


def describe(ran: list[str]) -> str:
    """Check names as ``fedunroll prepare`` prints them (``layout [slices, coils, H, W], ...``)."""
    return ", ".join(CHECK_NAMES.get(name, name) for name in dict.fromkeys(ran))

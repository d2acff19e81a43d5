"""Undersampling masks ``P`` for multi-coil k-space ``[C, H, W]`` (``W`` = phase encode).

All masks are float32 numpy arrays ``[H, W]`` of 0/1, deterministic for a seed. The default is
the paper's pattern (Levac et al. 2023, Sec. 3.1): R = 4, random phase-encode lines with a fully
sampled centre of 8% of the lines. Seed the mask of a slice with :func:`slice_seed` so that the
slice keeps its mask across epochs and federated rounds.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MASK_KINDS = ("random1d", "equispaced1d", "poisson2d")


def _hw(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"mask shape needs at least 2 dims [.., H, W], got {tuple(shape)}")
    h, w = int(shape[-2]), int(shape[-1])
    if h < 1 or w < 1:
        raise ValueError(f"mask shape must be positive, got {(h, w)}")
    return h, w


def _check_accel(accel: float) -> None:
    if not accel >= 1:
        raise ValueError(f"acceleration must be >= 1, got {accel}")


def num_acs_lines(n: int, acs_frac: float) -> int:
    """Number of fully sampled central lines: ``round(acs_frac * n)``, clipped to ``[1, n]``."""
    if not 0 <= acs_frac <= 1:
        raise ValueError(f"acs_frac must be in [0, 1], got {acs_frac}")
    return int(min(n, max(1, round(acs_frac * n))))


def acs_slice(n: int, acs_frac: float) -> slice:
    """Index range of the ``num_acs_lines(n, acs_frac)`` central lines of an axis of length ``n``.

    The block is centred on the DC index ``n // 2`` of a centered FFT (fastMRI convention).
    """
    n_acs = num_acs_lines(n, acs_frac)
    start = n // 2 - n_acs // 2
    return slice(start, start + n_acs)


def _lines_to_mask(h: int, cols: np.ndarray) -> np.ndarray:
    mask = np.zeros((h, cols.size), dtype=np.float32)
    mask[:, cols] = 1.0
    return mask


def random_1d_mask(
    shape: Sequence[int], accel: float = 4, acs_frac: float = 0.08, seed: int = 0
) -> np.ndarray:
    """Random phase-encode lines with a fully sampled centre (Levac et al. 2023, Sec. 3.1).

    ``round(W / accel)`` lines in total: the ``round(acs_frac * W)`` central ones plus lines drawn
    uniformly without replacement from the rest.

    Parameters
    ----------
    shape : sequence of int
        ``[..., H, W]``; only the last two are used.
    accel : float
        Acceleration ``R`` (``W / lines``).
    acs_frac : float
        Fraction of ``W`` that is fully sampled around the centre.
    seed : int
        Seed of the random line choice.

    Returns
    -------
    float32 ndarray ``[H, W]`` of 0/1, constant along ``H``.
    """
    h, w = _hw(shape)
    _check_accel(accel)
    acs = acs_slice(w, acs_frac)
    cols = np.zeros(w, dtype=bool)
    cols[acs] = True
    n_total = max(int(round(w / accel)), int(cols.sum()))
    rest = np.flatnonzero(~cols)
    rng = np.random.default_rng(seed)
    n_extra = min(n_total - int(cols.sum()), rest.size)
    cols[rng.choice(rest, size=n_extra, replace=False)] = True
    return _lines_to_mask(h, cols)


def equispaced_1d_mask(
    shape: Sequence[int], accel: float = 4, acs_frac: float = 0.08, seed: int = 0
) -> np.ndarray:
    """Equispaced phase-encode lines (random offset) plus a fully sampled centre.

    ``round(W / accel)`` lines in total: the ACS block plus lines equispaced over the other
    lines (so the spacing is stretched to make up for the ACS, as fastMRI's
    ``EquispacedMaskFractionFunc``).

    Returns
    -------
    float32 ndarray ``[H, W]`` of 0/1.
    """
    h, w = _hw(shape)
    _check_accel(accel)
    acs = acs_slice(w, acs_frac)
    n_acs = acs.stop - acs.start
    cols = np.zeros(w, dtype=bool)
    cols[acs] = True
    n_out = max(int(round(w / accel)) - n_acs, 0)  # lines wanted outside the ACS block
    rest = np.flatnonzero(~cols)
    if n_out > 0 and rest.size:
        n_out = min(n_out, rest.size)
        spacing = rest.size / n_out  # equispaced over the non-ACS lines, so exactly n_out
        offset = np.random.default_rng(seed).uniform(0, spacing)
        cols[rest[np.floor(offset + spacing * np.arange(n_out)).astype(int)]] = True
    return _lines_to_mask(h, cols)


def poisson_2d_mask(
    shape: Sequence[int],
    accel: float = 4,
    calib: tuple[int, int] | None = None,
    seed: int = 0,
    acs_frac: float = 0.08,
) -> np.ndarray:
    """Variable-density Poisson-disc 2D mask via ``sigpy.mri.poisson`` (for 3D-like sampling).

    ``sigpy.mri.poisson`` sometimes cannot meet the acceleration tolerance and raises
    ``ValueError``; we retry with seeds derived from ``seed`` (still deterministic). Its first
    call compiles a numba kernel (about 1-2 s).

    Parameters
    ----------
    calib : (int, int), optional
        Fully sampled central box; default ``acs_frac`` of each axis.

    Returns
    -------
    float32 ndarray ``[H, W]`` of 0/1.
    """
    import sigpy.mri

    h, w = _hw(shape)
    if not accel > 1:
        raise ValueError(f"poisson2d needs acceleration > 1, got {accel}")
    if calib is None:
        calib = (num_acs_lines(h, acs_frac), num_acs_lines(w, acs_frac))
    last: ValueError | None = None
    for attempt in range(10):
        s = seed if attempt == 0 else zlib.crc32(f"{seed}:retry{attempt}".encode())
        try:
            mask = sigpy.mri.poisson((h, w), accel, calib=calib, dtype=np.float32, seed=s)
        except ValueError as err:  # tolerance not met for this seed
            last = err
            continue
        return np.asarray(mask, dtype=np.float32)
    raise ValueError(f"poisson2d: no mask for shape {(h, w)} accel={accel} after 10 seeds: {last}")


_MAKERS: dict[str, Callable[..., np.ndarray]] = {
    "random1d": random_1d_mask,
    "equispaced1d": equispaced_1d_mask,
}


def make_mask(
    kind: str,
    shape: Sequence[int],
    accel: float = 4,
    acs_frac: float = 0.08,
    seed: int = 0,
) -> np.ndarray:
    """Build a mask by name: ``'random1d'`` (the paper's), ``'equispaced1d'`` or ``'poisson2d'``.

    Returns
    -------
    float32 ndarray ``[H, W]`` of 0/1.
    """
    if kind == "poisson2d":
        return poisson_2d_mask(shape, accel, seed=seed, acs_frac=acs_frac)
    try:
        maker = _MAKERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}"
        ) from None
    return maker(shape, accel=accel, acs_frac=acs_frac, seed=seed)


def slice_seed(file_name: str, slice_idx: int, base_seed: int = 0) -> int:
    """Stable per-slice seed (CRC32 of ``file_name``, ``slice_idx`` and ``base_seed``).

    Unlike ``hash()``, it is the same in every process, so a slice keeps its mask across epochs,
    rounds, workers and restarts.
    """
    return zlib.crc32(f"{file_name}\x00{int(slice_idx)}\x00{int(base_seed)}".encode())


def acceleration(mask: np.ndarray) -> float:
    """Effective acceleration ``H * W / (number of sampled points)``."""
    n = float(np.count_nonzero(mask))
    return float(mask.size / n) if n else float("inf")


def acs_width(mask: np.ndarray) -> int:
    """Width of the contiguous block of fully sampled columns around the centre ``W // 2``."""
    m = np.asarray(mask)
    full = np.all(m != 0, axis=tuple(range(m.ndim - 1))) if m.ndim > 1 else m != 0
    c = full.size // 2
    if not full[c]:
        return 0
    lo = c
    while lo > 0 and full[lo - 1]:
        lo -= 1
    hi = c
    while hi + 1 < full.size and full[hi + 1]:
        hi += 1
    return hi - lo + 1


# Calibration lines below which SigPy's ESPIRiT (square box, kernel of half its width) gives
# maps too poor to use: at 32 px (tests/test_commands.py's sites) SENSE with maps from 4 lines
# scores below zero-filled (PSNR 14.5 vs 18.2 dB), from 8 lines above it (18.6 dB); from 3
# lines the maps are noise (SENSE NRMSE 0.99-1.12 on the four synthetic presets).
# Retrospectively the box is widened to this many lines of the fully sampled data; prospective
# data calibrate from what was acquired (at least ESPIRIT_MIN_LINES), with a warning.
MIN_CALIB_LINES = 8
ESPIRIT_MIN_LINES = 4


def nominal_acs_lines(kind: str, shape: Sequence[int], acs_frac: float) -> int:
    """Side of the fully sampled central box that :func:`make_mask` always keeps: the
    ``num_acs_lines(W, acs_frac)`` ACS lines (at most ``H``) of a 1D mask, the ``calib`` box of
    a Poisson-disc one."""
    h, w = _hw(shape)
    if kind == "poisson2d":
        return min(num_acs_lines(h, acs_frac), num_acs_lines(w, acs_frac))
    return min(num_acs_lines(w, acs_frac), h)


def calibration_width(
    shape: Sequence[int], acs_lines: int, min_calib: int = MIN_CALIB_LINES
) -> int:
    """Side of the coil-map calibration box: the ACS lines a scanner acquired, at least
    ``min_calib`` (:data:`MIN_CALIB_LINES`), at most the matrix."""
    h, w = _hw(shape)
    return int(min(max(int(acs_lines), int(min_calib)), h, w))


def default_calibration_width(shape: Sequence[int], acs_frac: float = 0.08) -> int:
    """The calibration width of the default mask (1D, ``acs_frac`` of ``W``) on a ``[.., H, W]``
    matrix (what ``fedunroll prepare`` precomputes)."""
    return calibration_width(shape, nominal_acs_lines("random1d", shape, acs_frac))


def acs_box_width(mask: np.ndarray) -> int:
    """Side of the largest fully sampled square centred on the DC point ``(H // 2, W // 2)``.

    The calibration region a scanner really has: for a 1D phase-encode mask it is the width of
    the contiguous central block of acquired lines (capped at ``H``), for a 2D mask the central
    box. The square uses the centring of :func:`acs_slice` and ``sigpy.resize`` (start
    ``n // 2 - k // 2``), which is the box ESPIRiT calibrates from. 0 if the centre is missing.
    """
    m = np.asarray(mask) != 0
    h, w = _hw(m.shape)
    m = m.reshape(-1, h, w).all(axis=0)  # [H, W]: sampled in every leading index
    best = 0
    for k in range(1, min(h, w) + 1):
        r0, c0 = h // 2 - k // 2, w // 2 - k // 2
        if m[r0 : r0 + k, c0 : c0 + k].all():
            best = k
    return best


def sampled_mask(kspace: np.ndarray) -> np.ndarray:
    """The sampling pattern of k-space undersampled at acquisition: 1 where any coil has data.

    ``kspace`` is ``[..., C, H, W]``; the result is float32 ``[..., H, W]`` of 0/1 (exact
    zeros are the lines the scanner skipped, as written by fastMRI and ISMRMRD converters).
    """
    k = np.asarray(kspace)
    if k.ndim < 3:
        raise ValueError(f"expected k-space [..., C, H, W], got shape {k.shape}")
    return np.any(k != 0, axis=-3).astype(np.float32)


def unsampled_line_fraction(kspace: np.ndarray) -> float:
    """Fraction of phase-encode lines (``W``) that are exactly zero in every coil, readout point
    and slice of ``[..., C, H, W]``: about ``1 - 1/R`` for data undersampled at acquisition, 0
    for fully sampled data."""
    k = np.asarray(kspace)
    lines = np.any(k != 0, axis=tuple(range(k.ndim - 1)))  # [W]
    return float(1.0 - lines.mean())


@dataclass(frozen=True)
class SamplingSummary:
    """How a set of slices was sampled, for every printed line and JSON report.

    Attributes
    ----------
    mask : str
        ``random1d`` / ``equispaced1d`` / ``poisson2d`` (retrospective, from the mask keys),
        ``file`` (a mask file) or ``acquired`` (read from the zero lines of the data).
    accel : float or None
        Nominal acceleration R of generated masks; it counts the ACS lines among the sampled
        lines (R=4 on 64 lines: 16 lines, ACS included).
    acs_lines : int
        Fully sampled central lines common to every slice (:func:`acs_box_width`).
    seed : int or None
        Base seed of generated masks.
    effective_accel : float
        Mean over slices of total / sampled points (total / sampled lines for 1D masks).
    sampled_lines : float
        Mean number of acquired phase-encode lines per slice.
    total_lines : int
        Phase-encode lines of the matrix (``W``).
    """

    mask: str
    accel: float | None
    acs_lines: int
    seed: int | None
    effective_accel: float
    sampled_lines: float
    total_lines: int

    @classmethod
    def of(
        cls,
        masks: np.ndarray,
        kind: str,
        accel: float | None = None,
        seed: int | None = None,
        acs_lines: int | None = None,
    ) -> SamplingSummary:
        """The summary of masks ``[S, H, W]`` (or ``[H, W]``); ``acs_lines`` default
        :func:`acs_box_width` of all of them (generated masks: pass the nominal ACS lines,
        since random lines next to the ACS block would widen it by chance)."""
        m = np.asarray(masks) != 0
        m = m.reshape(-1, *m.shape[-2:])  # [S, H, W]
        lines = m.any(axis=1).sum(axis=-1)  # [S] acquired phase-encode lines
        return cls(
            mask=kind,
            accel=None if accel is None else float(accel),
            acs_lines=acs_box_width(m) if acs_lines is None else int(acs_lines),
            seed=seed,
            effective_accel=round(float(np.mean([acceleration(s) for s in m])), 3),
            sampled_lines=round(float(lines.mean()), 2),
            total_lines=int(m.shape[-1]),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """``random1d R=4 (effective 4.00: 16 of 64 lines, ACS included), 5 ACS lines, seed 0``."""
        r = "" if self.accel is None else f" R={self.accel:g}"
        seed = "" if self.seed is None else f", seed {self.seed}"
        return (
            f"{self.mask}{r} (effective {self.effective_accel:.2f}: {self.sampled_lines:g} of "
            f"{self.total_lines} lines, ACS included), {self.acs_lines} ACS lines{seed}"
        )

"""Coil sensitivity maps ``S`` from the calibration (centre) region of k-space, with SigPy.

The paper estimates maps with ESPIRiT (Levac et al. 2023, Sec. 3.1, its ref. [46]; Uecker et al.,
MRM
2014). Both estimators here look only at a central ``calib_width`` box of k-space: on fully
sampled training data that is the ACS region. Also numpy twins of the centered FFT / RSS for the
data pipeline (same convention as :mod:`recon.physics.fft` and ``sigpy.fft``).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from recon.physics.fft import center_crop

_AXES = (-2, -1)


def np_fft2c(x: np.ndarray) -> np.ndarray:
    """Centered orthonormal 2D FFT over the last two axes (numpy twin of ``fft2c``)."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=_AXES), norm="ortho"), axes=_AXES)


def np_ifft2c(k: np.ndarray) -> np.ndarray:
    """Centered orthonormal inverse 2D FFT over the last two axes (numpy twin of ``ifft2c``)."""
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=_AXES), norm="ortho"), axes=_AXES)


def np_crop_kspace(kspace: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """K-space ``[..., H0, W0]`` of the centre ``shape`` of its image: ``F(crop(F^-1 k))``.

    Removes readout oversampling (fastMRI: 640x368 k-space for a 320x320 image) while keeping
    the coil images' scale (orthonormal FFTs).
    """
    out = np_fft2c(center_crop(np_ifft2c(kspace), shape))
    return out.astype(np.result_type(kspace.dtype, np.complex64), copy=False)


def np_rss(coil_images: np.ndarray, coil_axis: int = -3) -> np.ndarray:
    """Root-sum-of-squares over the coil axis (``[..., C, H, W] -> [..., H, W]``)."""
    return np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=coil_axis))


def default_calib_width(shape: tuple[int, ...]) -> int:
    """BART/SigPy's 24, shrunk to half the smaller image side for small matrices (min 8)."""
    return int(max(8, min(24, min(shape[-2:]) // 2)))


def _openblas_setter() -> tuple[Callable[[int], Any], Callable[[], int]] | None:
    """``set_num_threads`` / ``get_num_threads`` of numpy's bundled OpenBLAS, if found."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*.so*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", "_64_", ""):
                try:
                    set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}")
                    get_ = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                except AttributeError:
                    continue
                set_.argtypes, get_.restype = [ctypes.c_int], ctypes.c_int
                return set_, get_
    return None


@contextlib.contextmanager
def single_thread_blas() -> Iterator[None]:
    """Run BLAS single-threaded inside the block (no-op where we cannot control it).

    ESPIRiT does thousands of tiny matrix products; with a multi-threaded BLAS on a busy machine
    (training, other sites) they were 5-50x slower than single-threaded in our measurements.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        handles = _openblas_setter()
        if handles is None:
            yield
            return
        set_, get_ = handles
        before = get_()
        set_(1)
        try:
            yield
        finally:
            set_(before)
    else:
        with threadpool_limits(limits=1, user_api="blas"):
            yield


def _check_kspace(kspace: np.ndarray) -> np.ndarray:
    k = np.asarray(kspace)
    if k.ndim != 3 or min(k.shape) < 1:
        raise ValueError(f"expected k-space [C, H, W], got shape {k.shape}")
    if not np.iscomplexobj(k):
        raise ValueError(f"expected complex k-space, got {k.dtype}")
    return k.astype(np.complex64, copy=False)


def noise_std(kspace: np.ndarray, frac: float = 0.15) -> float:
    """Noise std per complex k-space sample, from the four ``frac`` corners of ``[C, H, W]``.

    The corners of fully sampled k-space are almost pure noise; unsampled (zero) entries are
    ignored, so ACS-only input gives 0 (no estimate).
    """
    h, w = kspace.shape[-2:]
    n, m = max(1, int(frac * h)), max(1, int(frac * w))
    edge = np.concatenate(
        [
            kspace[..., r, c].ravel()
            for r in (slice(0, n), slice(h - n, h))
            for c in (slice(0, m), slice(w - m, w))
        ]
    )
    edge = edge[edge != 0]
    if not edge.size:
        return 0.0
    # |n|^2 of complex Gaussian noise is exponential with median sigma^2 ln 2; the median
    # ignores the sparse signal (edges of the object) that remains in the periphery.
    return float(np.sqrt(np.median(np.abs(edge) ** 2) / np.log(2)))


def noise_threshold(kspace: np.ndarray, calib_width: int, kernel_width: int) -> float:
    """Relative singular-value threshold just above the noise floor of the calibration matrix.

    A complex Gaussian ``M x N`` matrix of std ``sigma`` has largest singular value about
    ``sigma (sqrt(M) + sqrt(N))``; we return 1.2 times that, divided by the largest singular
    value of the calibration matrix (the quantity ESPIRiT's ``thresh`` is relative to).
    """
    import sigpy as sp

    c = kspace.shape[0]
    sigma = noise_std(kspace)
    if sigma == 0:
        return 0.0
    calib = sp.resize(kspace, [c, calib_width, calib_width])
    mat = sp.array_to_blocks(calib, [kernel_width] * 2, [1, 1])  # [C, blocks.., kw, kw]
    mat = (
        mat.reshape([c, -1, kernel_width**2])
        .transpose([1, 0, 2])
        .reshape([-1, c * kernel_width**2])
    )
    s_max = float(np.linalg.norm(mat, 2))
    floor = sigma * (np.sqrt(mat.shape[0]) + np.sqrt(mat.shape[1]))
    return float(1.2 * floor / s_max) if s_max > 0 else 0.0


def espirit_maps(
    kspace: np.ndarray,
    calib_width: int | None = None,
    thresh: float = 0.02,
    crop: float = 0.95,
    kernel_width: int = 6,
    max_iter: int = 100,
    noise_adaptive: bool = True,
) -> np.ndarray:
    """ESPIRiT maps via ``sigpy.mri.app.EspiritCalib`` (first eigenvector set).

    Parameters
    ----------
    kspace : complex ndarray ``[C, H, W]``
        Fully sampled (or ACS-containing) k-space; only the central ``calib_width`` box is used.
    calib_width : int, optional
        Side of the calibration box (default :func:`default_calib_width`).
    thresh : float
        Singular-value threshold of the calibration matrix (relative to the largest).
    crop : float
        Eigenvalue threshold: maps are zero where the eigenvalue is below it (outside the object).
    kernel_width : int
        k-space kernel width; must be smaller than ``calib_width``.
    max_iter : int
        Power iterations.
    noise_adaptive : bool
        Raise ``thresh`` to just above the noise floor of the calibration matrix, estimated
        from the k-space periphery (see :func:`noise_threshold`). With noisy data a fixed
        0.02 keeps noise kernels: the maps degrade and the calibration gets slow.

    Returns
    -------
    complex64 ndarray ``[C, H, W]``; where not cropped, ``sum_c |S_c|^2 = 1``.
    """
    from sigpy.mri.app import EspiritCalib

    k = _check_kspace(kspace)
    cw = default_calib_width(k.shape) if calib_width is None else int(calib_width)
    cw = min(cw, *k.shape[-2:])
    kw = min(kernel_width, max(2, cw // 2))
    with single_thread_blas():
        if noise_adaptive:
            thresh = max(thresh, noise_threshold(k, cw, kw))
        maps = EspiritCalib(
            k,
            calib_width=cw,
            thresh=thresh,
            kernel_width=kw,
            crop=crop,
            max_iter=max_iter,
            show_pbar=False,
        ).run()
    return np.asarray(maps, dtype=np.complex64)


def jsense_maps(
    kspace: np.ndarray,
    calib_width: int | None = None,
    mps_ker_width: int | None = None,
    max_iter: int = 10,
) -> np.ndarray:
    """JSENSE maps via ``sigpy.mri.app.JsenseRecon`` on the central ``calib_width`` box.

    Maps are smooth (truncated Fourier kernel of ``mps_ker_width``) and, unlike ESPIRiT, neither
    cropped nor unit-norm; they are normalised here so that ``max_xy sum_c |S_c|^2 = 1``.

    Returns
    -------
    complex64 ndarray ``[C, H, W]``.
    """
    from sigpy.mri.app import JsenseRecon

    k = _check_kspace(kspace)
    cw = default_calib_width(k.shape) if calib_width is None else int(calib_width)
    cw = min(cw, *k.shape[-2:])
    mw = min(12, max(4, cw // 2)) if mps_ker_width is None else int(mps_ker_width)
    with single_thread_blas():
        app = JsenseRecon(
            k, mps_ker_width=mw, ksp_calib_width=cw, max_iter=max_iter, show_pbar=False
        )
        maps = np.asarray(app.run(), dtype=np.complex64)
    peak = float(np.sqrt(np.max(np.sum(np.abs(maps) ** 2, axis=0))))
    return maps / peak if peak > 0 else maps


def estimate_maps(kspace: np.ndarray, method: str = "espirit", **kwargs: object) -> np.ndarray:
    """Dispatch to :func:`espirit_maps` or :func:`jsense_maps` by name."""
    if method == "espirit":
        return espirit_maps(kspace, **kwargs)  # type: ignore[arg-type]
    if method == "jsense":
        return jsense_maps(kspace, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown coil-map method {method!r}; choose 'espirit' or 'jsense'")

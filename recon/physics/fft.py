"""Centered, orthonormal 2D FFTs on complex torch tensors (the ``F`` of ``A = P F S``).

The last two dimensions are the image / k-space axes; any leading dims are batch or coil axes.
``fft2c(x) = fftshift(fft2(ifftshift(x), norm="ortho"))`` as in fastMRI and SigPy, so that the
k-space centre (DC) sits at index ``(H // 2, W // 2)`` and Parseval holds exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

_DIMS = (-2, -1)
ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


@functools.lru_cache(maxsize=32)
def _modulation(
    h: int, w: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(-1)^(n+m)`` checkerboard and the same times ``(-1)^(h/2 + w/2)``, ``[h, w]``.

    For even ``h, w`` a circular shift by half the length is a modulation in the other domain, so
    ``fftshift(fft2(ifftshift(x))) == post * fft2(pre * x)`` (and the same for ``ifft2``): two
    multiplications instead of four ``roll`` copies, about twice as fast forward and backward.
    """
    n = torch.arange(h, device=device)[:, None] + torch.arange(w, device=device)[None, :]
    pre = (1 - 2 * (n % 2)).to(dtype)
    return pre, pre * (-1) ** (h // 2 + w // 2)


def _centered(x: torch.Tensor, transform: Callable[..., torch.Tensor], name: str) -> torch.Tensor:
    if not x.is_complex():
        raise TypeError(f"{name} expects a complex tensor, got {x.dtype}")
    h, w = x.shape[-2:]
    if h % 2 or w % 2:  # odd sizes: the shifts are not modulations
        x = torch.fft.ifftshift(x, dim=_DIMS)
        x = transform(x, dim=_DIMS, norm="ortho")
        return torch.fft.fftshift(x, dim=_DIMS)
    pre, post = _modulation(h, w, x.real.dtype, x.device)
    return transform(x * pre, dim=_DIMS, norm="ortho") * post


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centered orthonormal 2D FFT over the last two dims of a complex tensor ``[..., H, W]``."""
    return _centered(x, torch.fft.fft2, "fft2c")


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centered orthonormal inverse 2D FFT, the adjoint (and inverse) of :func:`fft2c`."""
    return _centered(k, torch.fft.ifft2, "ifft2c")


def rss(coil_images: torch.Tensor, coil_dim: int = -3) -> torch.Tensor:
    """Root-sum-of-squares magnitude over the coil axis (``[..., C, H, W] -> [..., H, W]``)."""
    return torch.sqrt(torch.sum(coil_images.abs() ** 2, dim=coil_dim))


def center_crop(x: ArrayT, shape: tuple[int, int]) -> ArrayT:
    """Crop the last two dims of ``x`` (a tensor or a numpy array) to ``shape`` around the
    centre; a crop larger than ``x`` is a ``ValueError``."""
    h, w = x.shape[-2:]
    ch, cw = shape
    if ch > h or cw > w:
        raise ValueError(f"crop {tuple(shape)} larger than image {(h, w)}")
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]

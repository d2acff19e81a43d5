"""Centered, orthonormal 2D FFTs on complex torch tensors (the ``F`` of ``A = P F S``).

The last two dimensions are the image / k-space axes; any leading dims are batch or coil axes.
``fft2c(x) = fftshift(fft2(ifftshift(x), norm="ortho"))`` as in fastMRI and SigPy, so that the
k-space centre (DC) sits at index ``(H // 2, W // 2)`` and Parseval holds exactly.
"""

from __future__ import annotations

import torch

_DIMS = (-2, -1)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centered orthonormal 2D FFT over the last two dims of a complex tensor ``[..., H, W]``."""
    if not x.is_complex():
        raise TypeError(f"fft2c expects a complex tensor, got {x.dtype}")
    x = torch.fft.ifftshift(x, dim=_DIMS)
    x = torch.fft.fft2(x, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centered orthonormal inverse 2D FFT, the adjoint (and inverse) of :func:`fft2c`."""
    if not k.is_complex():
        raise TypeError(f"ifft2c expects a complex tensor, got {k.dtype}")
    k = torch.fft.ifftshift(k, dim=_DIMS)
    k = torch.fft.ifft2(k, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(k, dim=_DIMS)


def rss(coil_images: torch.Tensor, coil_dim: int = -3) -> torch.Tensor:
    """Root-sum-of-squares magnitude over the coil axis (``[..., C, H, W] -> [..., H, W]``)."""
    return torch.sqrt(torch.sum(coil_images.abs() ** 2, dim=coil_dim))


def center_crop(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Crop the last two dims of ``x`` to ``shape`` around the centre."""
    h, w = x.shape[-2:]
    ch, cw = shape
    if ch > h or cw > w:
        raise ValueError(f"crop {shape} larger than image {(h, w)}")
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]

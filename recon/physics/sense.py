"""Multi-coil Cartesian SENSE operator ``A = P F S`` (Levac et al. 2023 Eq. 2-3).

``S`` multiplies the image by each coil's sensitivity, ``F`` is the centered orthonormal FFT,
``P`` keeps the sampled k-space locations. The operator is *data*: built per batch from the
sample's maps and mask, passed to the model as ``model(y, physics)``, never part of its weights.
"""

from __future__ import annotations

import torch

from recon.physics.fft import fft2c, ifft2c

RSS_EPS = 1e-12


class LinearOp:
    """A linear operator with ``forward``, ``adjoint`` and ``normal = adjoint o forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        return self.adjoint(self.forward(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


class FFTOp(LinearOp):
    """Single-coil fully sampled ``F`` (the orthonormal centered FFT) on ``[..., H, W]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fft2c(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return ifft2c(y)


class SenseOp(LinearOp):
    """``A = P F S`` for multi-coil Cartesian data, batched.

    Parameters
    ----------
    maps : complex tensor ``[B, C, H, W]`` (or ``[C, H, W]``)
        Coil sensitivities ``S``.
    mask : real tensor ``[B, H, W]``, ``[H, W]`` or ``[B, 1, H, W]``
        Sampling pattern ``P`` (0/1).

    Images are ``[B, H, W]`` complex, k-space ``[B, C, H, W]`` complex.
    """

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor):
        if not maps.is_complex():
            raise TypeError(f"coil maps must be complex, got {maps.dtype}")
        if maps.dim() == 3:
            maps = maps.unsqueeze(0)
        if maps.dim() != 4:
            raise ValueError(f"maps must be [B, C, H, W], got shape {tuple(maps.shape)}")
        self.maps = maps  # [B, C, H, W]
        if mask.dim() == 2:
            mask = mask[None, None]  # [1, 1, H, W]
        elif mask.dim() == 3:
            mask = mask[:, None]  # [B, 1, H, W]
        if mask.shape[-2:] != maps.shape[-2:]:
            raise ValueError(
                f"mask {tuple(mask.shape[-2:])} and maps {tuple(maps.shape[-2:])} differ in H, W"
            )
        self.mask = mask.to(maps.real.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, H, W]`` -> undersampled k-space ``[B, C, H, W]``."""
        Sx = self.maps * x.unsqueeze(-3)  # [B, C, H, W]
        FSx = fft2c(Sx)
        return self.mask * FSx

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """K-space ``[B, C, H, W]`` -> coil-combined image ``[B, H, W]`` (``S^H F^H P^H``)."""
        coil_imgs = ifft2c(self.mask * y)  # [B, C, H, W]
        return torch.sum(self.maps.conj() * coil_imgs, dim=-3)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H A x``; P is a projection so one mask multiply suffices."""
        FSx = fft2c(self.maps * x.unsqueeze(-3))
        return torch.sum(self.maps.conj() * ifft2c(self.mask * FSx), dim=-3)

    def coil_images(self, x: torch.Tensor) -> torch.Tensor:
        """``S x``: the coil images ``[B, C, H, W]`` of an image ``[B, H, W]``."""
        return self.maps * x.unsqueeze(-3)

    def rss(self, x: torch.Tensor) -> torch.Tensor:
        """RSS magnitude of ``S x`` (Levac et al. 2023 Eq. 9's RSS(x)), ``[B, H, W]`` real.

        Where the maps vanish (outside the ESPIRiT support) the sum is 0 and sqrt has an
        infinite derivative; the sum is floored at ``RSS_EPS`` so training gradients stay finite
        (a 1e-6 offset on images normalised to ~1).
        """
        energy = torch.sum((self.maps * x.unsqueeze(-3)).abs() ** 2, dim=-3)
        return torch.sqrt(energy.clamp_min(RSS_EPS))

    def to(self, device: torch.device | str) -> SenseOp:
        return SenseOp(self.maps.to(device), self.mask.to(device))


class ScaledIdentityPlusNormal(LinearOp):
    """``(A^H A + lam I)``: the positive self-adjoint operator of MoDL's DC step (Eq. 8)."""

    def __init__(self, op: LinearOp, lam: torch.Tensor | float):
        self.op = op
        self.lam = lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.normal(x) + self.lam * x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.forward(y)

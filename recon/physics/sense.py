"""Multi-coil Cartesian SENSE operator ``A = P F S`` (Levac et al. 2023 Eq. 2-3).

``S`` multiplies the image by each coil's sensitivity, ``F`` is the centered orthonormal FFT,
``P`` keeps the sampled k-space locations. The operator is *data*: built per batch from the
sample's maps and mask, passed to the model as ``model(y, physics)``, never part of its weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from recon.physics.fft import _modulation, fft2c, ifft2c

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


def _interleave(r: torch.Tensor) -> torch.Tensor:
    """A real ``[..., H, W]`` as ``[..., H, 2W]``, every value twice: the layout of a complex
    ``[..., H, W]`` read as real numbers (:func:`_rmul_`)."""
    return r.repeat_interleave(2, dim=-1).contiguous()


def _rmul_(z: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``z *= r`` in place for a contiguous complex ``z`` and a real ``r`` given interleaved
    (``r2 = _interleave(r)``, broadcast), as one real product over ``z``'s numbers: torch would
    otherwise promote ``r`` to a complex copy, and broadcasting ``r`` over the real/imaginary
    pair (``view_as_real(z) * r[..., None]``) runs 6-13x slower than this contiguous product."""
    if not z.is_contiguous():
        raise ValueError("_rmul_ needs a contiguous complex tensor")
    torch.view_as_real(z).flatten(-2).mul_(r2)
    return z


def _rmul(z: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``z * r`` for a complex ``z`` and a real ``r`` given interleaved (:func:`_rmul_`)."""
    pairs = torch.view_as_real(z.resolve_conj().contiguous()).flatten(-2) * r2
    return torch.view_as_complex(pairs.unflatten(-1, (-1, 2)))


class _Modulated:
    """``A = P F S`` with the FFT shifts folded into the operator's data (even ``H, W``).

    With ``fft2c(z) = post * F(pre * z)``, ``ifft2c(k) = post * F^-1(pre * k)``, ``pre`` the
    real ``(-1)^(n+m)`` checkerboard and ``post = c pre`` (``c = (-1)^(H/2 + W/2)``, see
    :func:`recon.physics.fft._modulation`), and ``pre^2 = 1``:

    - ``A x = (c pre P) F (pre S) x``,
    - ``A^H y = sum_c conj(pre S) F^-1 ((c pre P) y)``,
    - ``A^H A x = sum_c conj(pre S) F^-1 P F (pre S) x`` (no modulation at all).

    Multiplying by +-1 is exact, so these equal the shifted forms up to the FFT's own rounding.
    ``Sm = pre S`` and its conjugate are built once per operator (i.e. once per batch).
    """

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor):
        h, w = maps.shape[-2:]
        pre, post = _modulation(h, w, maps.real.dtype, maps.device)
        self.sm = maps * pre  # [B, C, H, W]: pre S
        self.sm_conj = torch.conj_physical(self.sm)  # [B, C, H, W]: conj(pre S), materialised
        self.mask = _interleave(mask)  # [B|1, 1, H, 2W]: P, interleaved for _rmul_
        self.mask_mod = _interleave(mask * post)  # [B|1, 1, H, 2W]: c pre P (post = c pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.fft.fft2(self.sm * x.unsqueeze(-3), norm="ortho")  # [B, C, H, W]
        return _rmul_(k, self.mask_mod)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        coil_imgs = torch.fft.ifft2(_rmul(y, self.mask_mod), norm="ortho")  # [B, C, H, W]
        return torch.sum(coil_imgs.mul_(self.sm_conj), dim=-3)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.fft.fft2(self.sm * x.unsqueeze(-3), norm="ortho")  # [B, C, H, W]
        coil_imgs = torch.fft.ifft2(_rmul_(k, self.mask), norm="ortho")
        return torch.sum(coil_imgs.mul_(self.sm_conj), dim=-3)


class _Linear(torch.autograd.Function):
    """A linear map with a hand-written vector-Jacobian product: ``f(x) = L x`` has the
    gradient ``L^H g`` (PyTorch's convention for holomorphic maps). Nothing of the forward is
    saved for the backward (autograd would keep the ``[B, C, H, W]`` coil images of every
    call), and the backward is the operator itself rather than a replay of its elementwise
    steps. Only ``x`` may require a gradient (coil maps and masks are data)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        apply: Callable[[torch.Tensor], torch.Tensor],
        apply_h: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        ctx.apply_h = apply_h
        return apply(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return ctx.apply_h(grad.resolve_conj().contiguous()), None, None


class SenseOp(LinearOp):
    """``A = P F S`` for multi-coil Cartesian data, batched.

    Parameters
    ----------
    maps : complex tensor ``[B, C, H, W]`` (or ``[C, H, W]``)
        Coil sensitivities ``S``.
    mask : real tensor ``[B, H, W]``, ``[H, W]`` or ``[B, 1, H, W]``
        Sampling pattern ``P`` (0/1).

    Images are ``[B, H, W]`` complex, k-space ``[B, C, H, W]`` complex.

    For even ``H, W`` (every fastMRI and synthetic matrix) ``forward``, ``adjoint`` and
    ``normal`` run on maps with the FFT shifts folded in (:class:`_Modulated`) and differentiate
    by their adjoints (:class:`_Linear`); ``A^H y`` of the last ``y`` is kept, so the MoDL
    right-hand side of every unroll reuses ``x0 = A^H y``. Odd sizes take the plain path.
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
        self._fast: _Modulated | None = None
        self._energy: torch.Tensor | None = None
        self._aty: tuple[torch.Tensor, int, torch.Tensor, int] | None = None

    def _modulated(self) -> _Modulated | None:
        """The folded operator, built on first use; None for odd sizes or differentiable data."""
        h, w = self.maps.shape[-2:]
        if h % 2 or w % 2 or self.maps.requires_grad or self.mask.requires_grad:
            return None
        if self._fast is None or self._fast.sm.device != self.maps.device:
            with torch.no_grad():
                self._fast = _Modulated(self.maps, self.mask)
        return self._fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, H, W]`` -> undersampled k-space ``[B, C, H, W]``."""
        fast = self._modulated()
        if fast is not None and x.is_complex():
            return _Linear.apply(x.contiguous(), fast.forward, fast.adjoint)
        Sx = self.maps * x.unsqueeze(-3)  # [B, C, H, W]
        FSx = fft2c(Sx)
        return self.mask * FSx

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """K-space ``[B, C, H, W]`` -> coil-combined image ``[B, H, W]`` (``S^H F^H P^H``)."""
        fast = self._modulated()
        if fast is not None and y.is_complex():
            if y.requires_grad:
                return _Linear.apply(y.contiguous(), fast.adjoint, fast.forward)
            cached = self._aty  # the measurements' A^H y, asked once per unroll by MoDL
            if cached is not None and cached[0] is y and cached[1] == y._version:
                if cached[2]._version == cached[3]:  # nobody wrote into it since
                    return cached[2]
            with torch.no_grad():
                out = fast.adjoint(y.contiguous())
            self._aty = (y, y._version, out, out._version)
            return out
        coil_imgs = ifft2c(self.mask * y)  # [B, C, H, W]
        return torch.sum(self.maps.conj() * coil_imgs, dim=-3)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H A x``; P is a projection so one mask multiply suffices."""
        fast = self._modulated()
        if fast is not None and x.is_complex():
            return _Linear.apply(x.contiguous(), fast.normal, fast.normal)  # self-adjoint
        FSx = fft2c(self.maps * x.unsqueeze(-3))
        return torch.sum(self.maps.conj() * ifft2c(self.mask * FSx), dim=-3)

    def coil_images(self, x: torch.Tensor) -> torch.Tensor:
        """``S x``: the coil images ``[B, C, H, W]`` of an image ``[B, H, W]``."""
        return self.maps * x.unsqueeze(-3)

    def rss(self, x: torch.Tensor) -> torch.Tensor:
        """RSS magnitude of ``S x`` (Levac et al. 2023 Eq. 9's RSS(x)), ``[B, H, W]`` real.

        ``sum_c |S_c x|^2 = |x|^2 sum_c |S_c|^2``: the maps' energy is summed once per operator,
        so no coil image is formed. Where the maps vanish (outside the ESPIRiT support) the sum
        is 0 and sqrt has an infinite derivative; the sum is floored at ``RSS_EPS`` so training
        gradients stay finite (a 1e-6 offset on images normalised to ~1).
        """
        if self.maps.requires_grad:
            energy = torch.sum((self.maps * x.unsqueeze(-3)).abs() ** 2, dim=-3)
            return torch.sqrt(energy.clamp_min(RSS_EPS))
        if self._energy is None or self._energy.device != self.maps.device:
            with torch.no_grad():
                self._energy = torch.sum(torch.view_as_real(self.maps).square(), dim=(-4, -1))
        x2 = torch.view_as_real(x.contiguous()).square().sum(-1)  # |x|^2, [B, H, W]
        return torch.sqrt((x2 * self._energy).clamp_min(RSS_EPS))

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

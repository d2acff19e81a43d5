"""Unrolled reconstruction networks: MoDL (Levac et al. 2023 Eq. 5-8) and unrolled PGD (GLEAM Eq.
3-5).

Both are called as ``model(y, physics)``: the measurements ``y`` ``[B, C, H, W]`` and the operator
``physics`` (a :class:`~recon.physics.sense.SenseOp`) are arguments, so masks and coil maps never
enter ``state_dict()``. Both expose ``step(i, x, y, physics)`` (one unroll), which the greedy
GLEAM trainer drives module by module, and accept ``num_unrolls`` at call time for early-exit
inference (GLEAM Sec. VII: run only the first ``N_inf`` unrolls).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recon.models.denoisers import ComplexDenoiser, channels_to_complex, complex_to_channels
from recon.physics.cg import conjugate_gradient
from recon.physics.sense import ScaledIdentityPlusNormal, SenseOp


def set_denoiser_autocast(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Run ``model``'s denoisers under ``torch.autocast`` with ``dtype`` (``torch.bfloat16``
    on a GPU), or in full precision again with ``None``. Only the CNN changes precision: its
    output is cast back to float32 before it becomes complex, so FFTs, CG and the loss stay
    in float32 (the data-consistency solve needs it). A run-time setting, not a weight."""
    for m in model.modules():
        if isinstance(m, Unrolled):
            m.denoiser_autocast = dtype


def denoise(
    denoiser: nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None
) -> torch.Tensor:
    """``denoiser(x)``, with the CNN of a :class:`ComplexDenoiser` under ``autocast``."""
    if autocast is None or not isinstance(denoiser, ComplexDenoiser):
        return denoiser(x)
    with torch.autocast(x.device.type, dtype=autocast):
        out = denoiser.net(complex_to_channels(x))
    z = channels_to_complex(out.float())
    return x + z if denoiser.residual else z


class Unrolled(nn.Module):
    """Common driver: ``x0 = A^H y``, then ``num_unrolls`` calls of :meth:`step`."""

    num_unrolls: int
    denoiser_autocast: torch.dtype | None = None  # see set_denoiser_autocast

    def init(self, y: torch.Tensor, physics: SenseOp) -> torch.Tensor:
        """The zero-filled SENSE image ``x0 = A^H y`` ``[B, H, W]``."""
        return physics.adjoint(y)

    def step(self, i: int, x: torch.Tensor, y: torch.Tensor, physics: SenseOp) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        y: torch.Tensor,
        physics: SenseOp,
        num_unrolls: int | None = None,
        return_all: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Reconstruct ``[B, H, W]`` complex images from ``y``.

        ``num_unrolls`` (``N_inf``) stops early; ``return_all`` returns every unroll's output.
        """
        n = self.num_unrolls if num_unrolls is None else num_unrolls
        if not 0 <= n <= self.num_unrolls:
            raise ValueError(f"num_unrolls must be in [0, {self.num_unrolls}], got {n}")
        x = self.init(y, physics)
        outs = []
        for i in range(n):
            x = self.step(i, x, y, physics)
            outs.append(x)
        return outs if return_all else x


class MoDL(Unrolled):
    """MoDL: alternate the learned denoiser and CG data consistency (Levac et al. 2023 Eq. 6-8).

    Each unroll computes ``z = D(x)`` then ``x = (A^H A + lam I)^{-1} (A^H y + lam z)`` with
    ``cg_iters`` CG steps, so the output is data-consistent (the ordering of Aggarwal et al. and of
    GLEAM Eq. 7-8). ``lam`` is learned (stored as ``log_lam`` to stay positive).

    Parameters
    ----------
    denoiser : ComplexDenoiser or list of them
        One shared denoiser (Levac et al. 2023: a single U-Net reused by every unroll) or one per
        unroll
        (``shared=False`` in :func:`build_model`, as GLEAM's per-module weights).
    num_unrolls, cg_iters : int
        ``Nu`` and ``NCG`` (Levac et al. 2023 defaults: 6 and 6).
    lam_init : float
        Initial data-consistency weight ``lam``.
    """

    def __init__(
        self,
        denoiser: ComplexDenoiser | list[ComplexDenoiser],
        num_unrolls: int = 6,
        cg_iters: int = 6,
        lam_init: float = 0.05,
        learn_lam: bool = True,
    ):
        super().__init__()
        self.num_unrolls = num_unrolls
        self.cg_iters = cg_iters
        self.shared = not isinstance(denoiser, list)
        if isinstance(denoiser, list):
            if len(denoiser) != num_unrolls:
                raise ValueError(f"{len(denoiser)} denoisers for {num_unrolls} unrolls")
            self.denoisers = nn.ModuleList(denoiser)
        else:
            self.denoisers = nn.ModuleList([denoiser])
        log_lam = torch.tensor(math.log(lam_init), dtype=torch.float32)
        if learn_lam:
            self.log_lam = nn.Parameter(log_lam)
        else:
            self.register_buffer("log_lam", log_lam)

    @property
    def lam(self) -> torch.Tensor:
        return self.log_lam.exp()

    def denoiser(self, i: int) -> ComplexDenoiser:
        return self.denoisers[0 if self.shared else i]  # type: ignore[return-value]

    def data_consistency(
        self, z: torch.Tensor, y: torch.Tensor, physics: SenseOp, x0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Eq. 8: ``(A^H A + lam I)^{-1} (A^H y + lam z)`` by ``cg_iters`` CG steps.

        ``A^H y`` is the same in every unroll: :class:`~recon.physics.sense.SenseOp` keeps the
        last one (``x0`` of :meth:`init`), so it is computed once per forward."""
        lam = self.lam
        normal = ScaledIdentityPlusNormal(physics, lam)  # A^H A + lam I
        rhs = physics.adjoint(y) + lam * z
        return conjugate_gradient(normal, rhs, x0=x0, max_iter=self.cg_iters)

    def step(self, i: int, x: torch.Tensor, y: torch.Tensor, physics: SenseOp) -> torch.Tensor:
        z = denoise(self.denoiser(i), x, self.denoiser_autocast)
        return self.data_consistency(z, y, physics)


class UnrolledPGD(Unrolled):
    """Unrolled proximal gradient descent (GLEAM Eq. 3-5), one denoiser per iteration.

    ``x+ = x - 2 t_i A^H (A x - y)`` (Eq. 3), then ``x = f_theta_i(x+)`` (Eq. 5); the step sizes
    ``t_i`` are learned (stored as ``log_step``).
    """

    def __init__(
        self,
        denoisers: list[ComplexDenoiser],
        step_init: float = 0.5,
        learn_step: bool = True,
    ):
        super().__init__()
        self.num_unrolls = len(denoisers)
        self.denoisers = nn.ModuleList(denoisers)
        log_step = torch.full((self.num_unrolls,), math.log(step_init), dtype=torch.float32)
        if learn_step:
            self.log_step = nn.Parameter(log_step)
        else:
            self.register_buffer("log_step", log_step)

    def step(self, i: int, x: torch.Tensor, y: torch.Tensor, physics: SenseOp) -> torch.Tensor:
        t = self.log_step[i].exp()
        x_plus = x - 2 * t * physics.adjoint(physics.forward(x) - y)
        return denoise(self.denoisers[i], x_plus, self.denoiser_autocast)

"""Batched, differentiable conjugate gradient for MoDL's data consistency (Levac et al. 2023 Eq. 8).

Solves ``(A^H A + lam I) x = b`` per batch item. Gradients flow through the iterations by plain
autograd (the unrolled CG is part of the network, as in MoDL), so ``lam`` can be learned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-batch-item inner product ``<a, b> = sum conj(a) b`` over all but the first dim."""
    return torch.sum((a.conj() * b).flatten(1), dim=1)


def _dot_re(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Re <a, b>`` per batch item, ``[B]``: the real and imaginary parts' products summed as
    real arithmetic (CG needs only real inner products: ``|r|^2`` and ``<p, M p>`` of a
    Hermitian ``M``), with no conjugate copy and no complex product."""
    if not a.is_complex():
        return torch.sum((a * b).flatten(1), dim=1)
    ra, rb = torch.view_as_real(a.resolve_conj()), torch.view_as_real(b.resolve_conj())
    return torch.sum((ra * rb).flatten(1), dim=1)


def conjugate_gradient(
    normal: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    max_iter: int = 6,
    tol: float = 0.0,
) -> torch.Tensor:
    """Solve ``M x = b`` for a Hermitian positive-definite ``M`` given as a callable.

    Parameters
    ----------
    normal : callable
        ``x -> M x`` for a batch ``[B, ...]`` (e.g. ``x -> A^H A x + lam x``).
    b : tensor ``[B, ...]``
        Right-hand side (e.g. ``A^H y + lam z``).
    x0 : tensor, optional
        Initial guess (defaults to zeros).
    max_iter : int
        Iteration cap (MoDL's ``NCG``; Levac et al. 2023 uses 6).
    tol : float
        Stop early once every item's relative residual ``|r| / |b|`` is below ``tol``
        (0 runs exactly ``max_iter`` iterations, which keeps the unrolled graph fixed).
    """
    # x0 = None starts from 0: x = 0 and r = b are not materialised (x = alpha p after the
    # first step, exactly 0 + alpha p); every update below is out of place, so r may alias b.
    x = x0
    r = b - normal(x0) if x0 is not None else b
    p = r
    rr = _dot_re(r, r)  # [B]
    b_norm = torch.sqrt(_dot_re(b, b)).clamp_min(torch.finfo(rr.dtype).tiny)
    shape = (-1,) + (1,) * (b.dim() - 1)
    for _ in range(max_iter):
        if tol > 0 and bool(torch.all(torch.sqrt(rr) / b_norm < tol)):
            break
        Mp = normal(p)
        pMp = _dot_re(p, Mp)  # real for Hermitian M
        # Guard the items that already converged exactly (rr == 0) against 0/0.
        alpha = torch.where(pMp > 0, rr / pMp.clamp_min(torch.finfo(rr.dtype).tiny), 0.0)
        step = alpha.view(shape) * p
        x = step if x is None else x + step
        r = r - alpha.view(shape) * Mp
        rr_new = _dot_re(r, r)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(torch.finfo(rr.dtype).tiny), 0.0)
        p = r + beta.view(shape) * p
        rr = rr_new
    return torch.zeros_like(b) if x is None else x

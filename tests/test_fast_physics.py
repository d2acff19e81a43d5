"""The folded-shift SENSE operator, its hand-written gradients, the A^H y cache and the
denoiser's bf16 autocast agree with the plain formulas (tests/test_physics.py pins the rest)."""

from __future__ import annotations

import pytest
import torch

from recon.models import build_model
from recon.models.unrolled import set_denoiser_autocast
from recon.physics import SenseOp, fft2c, ifft2c
from recon.physics.cg import conjugate_gradient
from recon.physics.sense import ScaledIdentityPlusNormal


def _data(h: int, w: int, coils: int = 3, dtype: torch.dtype = torch.complex64):
    g = torch.Generator().manual_seed(h * 100 + w)
    maps = torch.randn(2, coils, h, w, dtype=dtype, generator=g)
    mask = (torch.rand(2, h, w, generator=g) < 0.4).to(maps.real.dtype)
    x = torch.randn(2, h, w, dtype=dtype, generator=g)
    y = torch.randn(2, coils, h, w, dtype=dtype, generator=g)
    return maps, mask, x, y


def _plain(maps, mask):
    m = mask[:, None]
    fwd = lambda x: m * fft2c(maps * x[:, None])  # noqa: E731
    adj = lambda y: torch.sum(maps.conj() * ifft2c(m * y), dim=1)  # noqa: E731
    return fwd, adj


@pytest.mark.parametrize("shape", [(16, 12), (15, 12)])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_sense_values_and_gradients_match_the_plain_formulas(shape, dtype) -> None:
    maps, mask, x, y = _data(*shape, dtype=dtype)
    op, (fwd, adj) = SenseOp(maps, mask), _plain(maps, mask)
    tol = 1e-5 if dtype == torch.complex64 else 1e-12
    for got, want in (
        (op.forward(x), fwd(x)),
        (op.adjoint(y), adj(y)),
        (op.normal(x), adj(fwd(x))),
        (op.rss(x), torch.sqrt(torch.sum((maps * x[:, None]).abs() ** 2, 1).clamp_min(1e-12))),
    ):
        assert torch.allclose(got, want, atol=tol * want.abs().max(), rtol=0)
    for f_fast, f_plain, inp in (
        (op.forward, fwd, x),
        (op.adjoint, adj, y),
        (op.normal, lambda v: adj(fwd(v)), x),
        (op.rss, lambda v: torch.sum((maps * v[:, None]).abs() ** 2, 1).sqrt(), x),
    ):
        a = inp.clone().requires_grad_()
        b = inp.clone().requires_grad_()
        w = torch.randn_like(f_plain(inp).real)
        (f_fast(a).abs() * w).sum().backward()
        (f_plain(b).abs() * w).sum().backward()
        assert torch.allclose(a.grad, b.grad, atol=10 * tol * b.grad.abs().max(), rtol=0)


def test_adjoint_of_y_is_kept_and_never_stale() -> None:
    maps, mask, _, y = _data(16, 16)
    op = SenseOp(maps, mask)
    first = op.adjoint(y)
    assert op.adjoint(y) is first  # MoDL's rhs of every unroll reuses x0 = A^H y
    first.mul_(2)  # a caller wrote into it: recomputed
    assert torch.allclose(op.adjoint(y), _plain(maps, mask)[1](y), atol=1e-5)
    y.mul_(3)  # the measurements changed: recomputed
    assert torch.allclose(op.adjoint(y), _plain(maps, mask)[1](y), atol=1e-4)


def test_cg_from_zero_matches_the_textbook_loop() -> None:
    maps, mask, x, _ = _data(16, 16, dtype=torch.complex128)
    op = SenseOp(maps, mask)
    M = ScaledIdentityPlusNormal(op, 0.1)
    b = op.adjoint(op.forward(x))
    got = conjugate_gradient(M, b, max_iter=4)
    xk, r = torch.zeros_like(b), b.clone()
    p, rs = r.clone(), (r.conj() * r).flatten(1).sum(1).real
    for _ in range(4):
        Mp = M(p)
        alpha = (rs / (p.conj() * Mp).flatten(1).sum(1).real).view(-1, 1, 1)
        xk, r = xk + alpha * p, r - alpha * Mp
        rs_new = (r.conj() * r).flatten(1).sum(1).real
        p = r + (rs_new / rs).view(-1, 1, 1) * p
        rs = rs_new
    assert torch.allclose(got, xk, atol=1e-10)


def test_bf16_autocast_of_the_denoiser_keeps_physics_in_float32() -> None:
    torch.manual_seed(0)
    maps, mask, x, _ = _data(32, 32)
    op = SenseOp(maps[:1], mask[:1])
    y = op.forward(x[:1]).detach()
    model = build_model(num_unrolls=2, cg_iters=2)
    ref = model(y, op)
    set_denoiser_autocast(model, torch.bfloat16)
    out = model(y, op)
    assert out.dtype == torch.complex64 and torch.isfinite(torch.view_as_real(out)).all()
    assert float((out - ref).detach().abs().max() / ref.detach().abs().max()) < 0.05
    out.abs().sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    set_denoiser_autocast(model, None)
    assert torch.allclose(model(y, op), ref)

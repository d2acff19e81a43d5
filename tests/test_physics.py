"""Numerical tests of the physics: FFT vs numpy, the operator contract, CG vs direct solves."""

from __future__ import annotations

import numpy as np
import pytest
import sigpy
import sigpy.mri
import torch

from recon.physics import (
    FFTOp,
    ScaledIdentityPlusNormal,
    SenseOp,
    conjugate_gradient,
    fft2c,
    ifft2c,
)

DTYPES = [torch.complex64, torch.complex128]
TOL = {torch.complex64: 1e-5, torch.complex128: 1e-12}


def crandn(*shape: int, dtype: torch.dtype = torch.complex64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(*shape, generator=g, dtype=torch.float64)
    imag = torch.randn(*shape, generator=g, dtype=torch.float64)
    return torch.complex(real, imag).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(12, 10), (16, 14), (9, 7), (12, 9), (7, 10)])
def test_fft2c_matches_numpy_ortho_with_shifts(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """Even sizes take the modulation path, odd ones the shifts: both equal numpy's."""
    x = crandn(3, 2, *shape, dtype=dtype)
    for ours, theirs in ((fft2c, np.fft.fft2), (ifft2c, np.fft.ifft2)):
        ref = np.fft.fftshift(
            theirs(np.fft.ifftshift(x.numpy(), axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
        )
        np.testing.assert_allclose(ours(x).numpy(), ref, rtol=0, atol=50 * TOL[dtype])
    np.testing.assert_allclose(ifft2c(fft2c(x)).numpy(), x.numpy(), atol=50 * TOL[dtype])
    # Parseval: the orthonormal transform keeps energy.
    assert torch.allclose(fft2c(x).abs().pow(2).sum(), x.abs().pow(2).sum(), rtol=1e-5)


def test_fft2c_matches_sigpy() -> None:
    x = crandn(9, 8, dtype=torch.complex128).numpy()
    np.testing.assert_allclose(fft2c(torch.from_numpy(x)).numpy(), sigpy.fft(x), atol=1e-12)


def test_fft2c_rejects_real_input() -> None:
    with pytest.raises(TypeError, match="complex"):
        fft2c(torch.zeros(4, 4))


def _operators(dtype: torch.dtype) -> dict[str, tuple[object, tuple[int, ...], tuple[int, ...]]]:
    """Every operator of the package, with its input and output shapes."""
    b, c, h, w = 2, 3, 10, 8
    maps = crandn(b, c, h, w, dtype=dtype, seed=1)
    mask = (torch.rand(b, h, w, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    sense = SenseOp(maps, mask)
    return {
        "fft": (FFTOp(), (b, c, h, w), (b, c, h, w)),
        "sense": (sense, (b, h, w), (b, c, h, w)),
        "sense-2d-mask": (SenseOp(maps, mask[0]), (b, h, w), (b, c, h, w)),
        "sense-1coil": (SenseOp(maps[:, :1], mask), (b, h, w), (b, 1, h, w)),
        "modl-normal": (ScaledIdentityPlusNormal(sense, 0.3), (b, h, w), (b, h, w)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(_operators(torch.complex64)))
def test_operator_contract(name: str, dtype: torch.dtype) -> None:
    """Dot-product adjoint test, linearity, and normal == adjoint(forward) for every operator."""
    op, in_shape, out_shape = _operators(dtype)[name]
    x, x2 = crandn(*in_shape, dtype=dtype, seed=3), crandn(*in_shape, dtype=dtype, seed=4)
    y = crandn(*out_shape, dtype=dtype, seed=5)
    Ax, AHy = op.forward(x), op.adjoint(y)  # type: ignore[attr-defined]
    lhs, rhs = torch.vdot(Ax.flatten(), y.flatten()), torch.vdot(x.flatten(), AHy.flatten())
    rel = abs(lhs - rhs) / (Ax.norm() * y.norm())
    assert rel < TOL[dtype], f"{name}: adjoint test {rel}"
    a, b = 0.7 - 0.2j, -1.3 + 0.5j
    lin = op.forward(a * x + b * x2) - (a * op.forward(x) + b * op.forward(x2))  # type: ignore[attr-defined]
    assert lin.norm() / Ax.norm() < 10 * TOL[dtype]
    normal = op.normal(x) - op.adjoint(op.forward(x))  # type: ignore[attr-defined]
    assert normal.norm() / op.normal(x).norm() < 10 * TOL[dtype]  # type: ignore[attr-defined]


def test_sense_matches_sigpy_linop() -> None:
    c, h, w = 3, 8, 6
    maps = crandn(c, h, w, dtype=torch.complex128, seed=6)
    mask = (torch.rand(h, w, generator=torch.Generator().manual_seed(7)) > 0.4).double()
    x = crandn(h, w, dtype=torch.complex128, seed=8)
    ref = sigpy.mri.linop.Sense(maps.numpy(), weights=mask.numpy())(x.numpy())
    ours = SenseOp(maps, mask).forward(x[None])[0]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cg_matches_direct_solve(dtype: torch.dtype) -> None:
    b, c, h, w = 2, 2, 6, 5
    maps = crandn(b, c, h, w, dtype=dtype, seed=9)
    mask = (torch.rand(b, h, w, generator=torch.Generator().manual_seed(10)) > 0.5).float()
    op, lam = SenseOp(maps, mask), 0.1
    rhs = crandn(b, h, w, dtype=dtype, seed=11)
    x = conjugate_gradient(lambda v: op.normal(v) + lam * v, rhs, max_iter=200, tol=1e-12)
    for i in range(b):  # dense (A^H A + lam I) per batch item from the operator's columns
        eye = torch.eye(h * w, dtype=dtype).reshape(h * w, h, w)
        single = SenseOp(maps[i : i + 1], mask[i])
        cols = torch.stack([single.normal(e[None])[0].flatten() for e in eye], dim=1)
        dense = cols + lam * torch.eye(h * w, dtype=dtype)
        ref = torch.linalg.solve(dense, rhs[i].flatten())
        err = (x[i].flatten() - ref).norm() / ref.norm()
        assert err < (1e-4 if dtype == torch.complex64 else 1e-9)


def test_cg_matches_sigpy_conjugate_gradient() -> None:
    c, h, w = 3, 8, 8
    maps = crandn(1, c, h, w, dtype=torch.complex128, seed=12)
    mask = (torch.rand(h, w, generator=torch.Generator().manual_seed(13)) > 0.6).double()
    op, lam = SenseOp(maps, mask), 0.05
    rhs = crandn(1, h, w, dtype=torch.complex128, seed=14)
    ours = conjugate_gradient(lambda v: op.normal(v) + lam * v, rhs, max_iter=6)
    A = sigpy.mri.linop.Sense(maps[0].numpy(), weights=mask.numpy())
    M = A.N + lam * sigpy.linop.Identity(A.ishape)
    xs = np.zeros(A.ishape, dtype=np.complex128)
    alg = sigpy.alg.ConjugateGradient(M, rhs[0].numpy(), xs, max_iter=6)
    while not alg.done():
        alg.update()
    np.testing.assert_allclose(ours[0].numpy(), xs, rtol=1e-8, atol=1e-10)


def test_cg_is_differentiable_in_lambda_and_rhs() -> None:
    maps = crandn(1, 2, 6, 6, dtype=torch.complex128, seed=15)
    mask = (torch.rand(6, 6, generator=torch.Generator().manual_seed(16)) > 0.5).double()
    op = SenseOp(maps, mask)
    lam = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    rhs = crandn(1, 6, 6, dtype=torch.complex128, seed=17).requires_grad_()

    def f(lam: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        x = conjugate_gradient(lambda v: op.normal(v) + lam * v, rhs, max_iter=8)
        return x.abs().pow(2).sum()

    assert torch.autograd.gradcheck(f, (lam, rhs), eps=1e-6, atol=1e-5)


def test_cg_early_stop_and_zero_rhs() -> None:
    maps = crandn(2, 2, 6, 6, dtype=torch.complex128, seed=18)
    op = SenseOp(maps, torch.ones(6, 6, dtype=torch.float64))
    rhs = crandn(2, 6, 6, dtype=torch.complex128, seed=19)
    rhs[1] = 0  # an all-zero item must give zeros, not NaN
    x = conjugate_gradient(lambda v: op.normal(v) + v, rhs, max_iter=50, tol=1e-10)
    assert torch.isfinite(x).all() and x[1].abs().max() == 0
    resid = op.normal(x) + x - rhs
    assert resid[0].norm() / rhs[0].norm() < 1e-9

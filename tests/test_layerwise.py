"""Convex two-layer blocks (Ozturkler et al., ISMRM 2021) and their layer-wise training, on 32 px
problems."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from recon.data.sample import Sample, collate
from recon.models.convex import ConvexBlock, build_convex_denoiser
from recon.models.denoisers import build_denoiser
from recon.models.unrolled import MoDL
from recon.physics import SenseOp, fft2c
from recon.train import TrainConfig, TrainHooks, evaluate
from recon.train.layerwise import denoiser_input, train_layerwise


def tiny_samples(n: int, size: int = 32, coils: int = 2, seed: int = 0) -> list[Sample]:
    """Smooth complex images x, smooth normalised maps, 1D random masks (as in test_gleam)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        z = F.interpolate(torch.randn(1, 2 + 2 * coils, 6, 6, generator=g), size=(size, size))
        x = torch.complex(z[0, 0], z[0, 1])
        maps = torch.complex(z[0, 2 : 2 + coils], z[0, 2 + coils :]) + 1.5
        maps = maps / maps.abs().pow(2).sum(0, keepdim=True).sqrt()
        cols = torch.rand(size, generator=g) < 0.25
        cols[size // 2 - 2 : size // 2 + 2] = True
        mask = cols.float().expand(size, size).clone()
        target = (maps * x).abs().pow(2).sum(0).sqrt()
        out.append(Sample(mask * fft2c(maps * x), mask, maps, target, {}, image=x))
    return out


DATA = tiny_samples(4)


def test_convex_block_is_identity_at_init_and_keeps_shape() -> None:
    block = ConvexBlock(hidden=8, kernel_size=7)
    x = torch.randn(2, 2, 17, 32)
    torch.testing.assert_close(block(x), x)
    with pytest.raises(ValueError, match="odd"):
        ConvexBlock(kernel_size=4)
    den = build_convex_denoiser(num_blocks=3, hidden=8, kernel_size=5)
    z = torch.randn(2, 17, 32, dtype=torch.complex64)
    assert den(z).shape == z.shape and den(z).dtype == torch.complex64


def test_convex_denoiser_inside_modl_has_plain_weights() -> None:
    model = MoDL(build_convex_denoiser(num_blocks=2, hidden=4, kernel_size=3), 2, cg_iters=2)
    keys = set(model.state_dict())
    assert keys == {"log_lam"} | {
        f"denoisers.0.net.blocks.{b}.{layer}.{w}"
        for b in (0, 1)
        for layer in ("g", "f")
        for w in ("weight", "bias")
    }
    s = collate(DATA[:2])
    op = SenseOp(s.maps, s.mask)
    torch.testing.assert_close(denoiser_input(model, 0, s.kspace, op), op.adjoint(s.kspace))


def test_layerwise_trains_one_block_at_a_time_with_earlier_frozen() -> None:
    torch.manual_seed(0)
    model = MoDL(build_convex_denoiser(num_blocks=3, hidden=8, kernel_size=3), 2, cg_iters=2)
    blocks = model.denoisers[0].net.blocks  # type: ignore[union-attr]
    snapshots = []

    def after(m: torch.nn.Module) -> None:
        # Only the active block has gradients; remember the weights of all blocks.
        snapshots.append([copy.deepcopy(b.state_dict()) for b in blocks])

    res = train_layerwise(
        model, DATA, TrainConfig(lr=1e-2, steps=15), hooks=TrainHooks(None, after)
    )
    assert res.stages == [(0, 0), (0, 1), (0, 2)] and res.steps_per_stage == 5
    assert len(res.losses) == 15
    # During stage b, blocks < b never change (frozen) and blocks > b are still the identity.
    for stage in range(3):
        first, last = snapshots[5 * stage], snapshots[5 * stage + 4]
        for b in range(3):
            same = all(torch.equal(first[b][k], last[b][k]) for k in first[b])
            assert same == (b != stage), (stage, b)
        for b in range(stage + 1, 3):
            assert torch.all(first[b]["f.weight"] == 0)
    assert all(torch.any(b.f.weight != 0) for b in blocks)  # type: ignore[union-attr]
    assert res.losses[-1] < res.losses[0]


def test_layerwise_per_unroll_denoisers_and_better_than_zero_filled() -> None:
    torch.manual_seed(0)
    dens = [build_convex_denoiser(num_blocks=2, hidden=8, kernel_size=3) for _ in range(2)]
    model = MoDL(dens, num_unrolls=2, cg_iters=3, lam_init=0.1)
    lam = model.log_lam.detach().clone()
    res = train_layerwise(model, DATA, TrainConfig(lr=1e-2, steps=40))
    assert res.stages == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert torch.equal(model.log_lam, lam)
    assert evaluate(model, DATA)["psnr"] > evaluate(None, DATA)["psnr"]  # type: ignore[operator]


def test_layerwise_refuses_other_denoisers() -> None:
    model = MoDL(build_denoiser("resnet", features=4, num_layers=3), 2, cg_iters=2)
    with pytest.raises(TypeError, match="convex"):
        train_layerwise(model, DATA, TrainConfig(steps=2))


def test_layerwise_default_l2_falls_back_to_rss_without_complex_reference() -> None:
    torch.manual_seed(0)
    model = MoDL(build_convex_denoiser(num_blocks=1, hidden=4, kernel_size=3), 2, cg_iters=2)
    rss_only = [Sample(s.kspace, s.mask, s.maps, s.target, {}) for s in DATA]
    res = train_layerwise(model, rss_only, TrainConfig(lr=1e-2, steps=4))
    assert len(res.losses) == 4
    with pytest.raises(ValueError, match="Sample.image"):
        train_layerwise(model, rss_only, TrainConfig(steps=1), loss="l2")

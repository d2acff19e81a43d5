"""Model shapes, the exact shipped key set, weight counts, early exit."""

from __future__ import annotations

import pytest
import torch

from recon.models import ModelConfig, build_model, count_parameters
from recon.physics import SenseOp


def _problem(b: int = 1, c: int = 2, h: int = 32, w: int = 32) -> tuple[torch.Tensor, SenseOp]:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(b, c, h, w, dtype=torch.complex64, generator=g)
    maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = (torch.rand(b, h, w, generator=g) > 0.6).float()
    op = SenseOp(maps, mask)
    x = torch.randn(b, h, w, dtype=torch.complex64, generator=g)
    return op.forward(x), op


def test_default_modl_matches_seed000_size() -> None:
    model = build_model()
    # Levac et al. 2023 Sec. 3.1: Nu=6, NCG=6, a U-Net of 481,092 weights; ours 481,090 + lambda.
    assert model.num_unrolls == 6 and model.cg_iters == 6  # type: ignore[attr-defined]
    assert abs(count_parameters(model) - 481_092) < 100


def test_shipped_key_set_has_no_masks_or_maps() -> None:
    """The exact state_dict keys a small MoDL ships: weights and lambda, nothing of the data."""
    model = build_model(num_unrolls=2, cg_iters=2, unet_chans=4, unet_pools=1)
    y, op = _problem()
    model(y, op)  # a forward pass must not register data buffers
    keys = set(model.state_dict())
    expected = {"log_lam"} | {
        f"denoisers.0.net.{part}"
        for part in [
            "down.0.layers.0.weight",
            "down.0.layers.3.weight",
            "bottleneck.layers.0.weight",
            "bottleneck.layers.3.weight",
            "up_conv.0.layers.0.weight",
            "up_block.0.layers.0.weight",
            "up_block.0.layers.3.weight",
            "head.weight",
            "head.bias",
        ]
    }
    assert keys == expected
    assert all(t.shape[-2:] != (32, 32) for t in model.state_dict().values())


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(num_unrolls=2, cg_iters=2, unet_chans=4, unet_pools=2),
        ModelConfig(num_unrolls=2, cg_iters=2, denoiser="resnet", resnet_features=8, shared=False),
        ModelConfig(arch="pgd", num_unrolls=3, denoiser="resnet", resnet_features=8),
    ],
)
def test_forward_shapes_and_gradients(cfg: ModelConfig, device: str) -> None:
    model = build_model(cfg).to(device)
    y, op = _problem(b=2, h=30, w=28)  # odd sizes exercise U-Net padding
    out = model(y.to(device), op.to(device))
    assert out.shape == (2, 30, 28) and out.dtype == torch.complex64
    out.abs().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_early_exit_runs_first_unrolls_only() -> None:
    model = build_model(num_unrolls=3, cg_iters=2, unet_chans=4, unet_pools=1).eval()
    y, op = _problem()
    with torch.no_grad():
        outs = model(y, op, return_all=True)
        two = model(y, op, num_unrolls=2)
        zero = model(y, op, num_unrolls=0)
    assert len(outs) == 3
    torch.testing.assert_close(two, outs[1])
    torch.testing.assert_close(zero, op.adjoint(y))
    with pytest.raises(ValueError, match="num_unrolls"):
        model(y, op, num_unrolls=4)


def test_unknown_config_keys_and_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_unroll"):
        ModelConfig(num_unroll=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="denoiser"):
        ModelConfig(denoiser="transformer")  # type: ignore[arg-type]


def test_unet_normalisation_is_instance_norm_in_values_and_gradients() -> None:
    """The U-Net's norm layers compute ``nn.InstanceNorm2d`` (no affine, no running stats), so a
    checkpoint means what it meant with the textbook layer: same outputs and gradients, per image
    of a batch, on a size the U-Net pads."""
    import copy

    from torch import nn

    from recon.models.denoisers import InstanceNorm, UNet

    torch.manual_seed(0)
    net = UNet()
    textbook = copy.deepcopy(net)
    swapped = 0
    for seq in textbook.modules():
        if isinstance(seq, nn.Sequential):
            for i, layer in enumerate(seq):
                if isinstance(layer, InstanceNorm):
                    seq[i] = nn.InstanceNorm2d(layer.num_features)
                    swapped += 1
    assert swapped == 17  # 7 conv blocks with 2 each, 3 upsampling blocks with 1
    assert net.state_dict().keys() == textbook.state_dict().keys()
    x = torch.randn(3, 2, 37, 44) * torch.tensor([1.0, 5.0, 0.1]).view(3, 1, 1, 1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = net(xa), textbook(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    # float rounding differs (a different reduction order), so compare gradients as vectors
    pairs = [(xa.grad, xb.grad)] + [
        (a.grad, b.grad) for a, b in zip(net.parameters(), textbook.parameters(), strict=True)
    ]
    for ga, gb in pairs:
        assert ga is not None and gb is not None
        assert float((ga - gb).norm() / gb.norm()) < 1e-5

"""Learned priors ``D(x; Theta)`` used inside the unrolled networks.

All denoisers here are real-valued CNNs on 2 channels (real, imaginary); :class:`ComplexDenoiser`
wraps one so that it maps a complex image ``[B, H, W]`` to a complex image ``[B, H, W]``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def complex_to_channels(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` complex -> ``[B, 2, H, W]`` real (real, imaginary)."""
    return torch.stack([x.real, x.imag], dim=1)


def channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """``[B, 2, H, W]`` real -> ``[B, H, W]`` complex."""
    return torch.complex(x[:, 0], x[:, 1])


class InstanceNorm(nn.Module):
    """Instance norm with ``nn.InstanceNorm2d``'s defaults (no affine, no running statistics).

    Computed as group norm with one group per channel, the same normalisation over each image's
    ``H x W`` per channel. ``F.instance_norm`` reshapes to a batch norm and hands back a view, and
    the in-place LeakyReLU that follows then costs autograd a copy of it: this form makes a U-Net
    forward + backward 12-20% faster on CPU (``benchmarks/bench_modl.py``). It holds no state,
    so checkpoints are unchanged.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_features, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class _ConvBlock(nn.Module):
    """Two 3x3 convs, each followed by instance norm and LeakyReLU (fastMRI U-Net block)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            InstanceNorm(out_ch),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            InstanceNorm(out_ch),
            nn.LeakyReLU(0.2, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _UpBlock(nn.Module):
    """2x2 transposed conv upsampling, instance norm, LeakyReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2, bias=False),
            InstanceNorm(out_ch),
            nn.LeakyReLU(0.2, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class UNet(nn.Module):
    """U-Net (fastMRI layout) on 2-channel images.

    The defaults (``chans=16``, ``num_pools=3``) give 481,090 weights, the size of the MoDL
    denoiser of Levac et al. 2023 Sec. 3.1 (481,092). Inputs of any size work: they are padded to a
    multiple of ``2**num_pools`` and cropped back.
    """

    def __init__(self, in_chans: int = 2, out_chans: int = 2, chans: int = 16, num_pools: int = 3):
        super().__init__()
        self.num_pools = num_pools
        self.down = nn.ModuleList([_ConvBlock(in_chans, chans)])
        ch = chans
        for _ in range(num_pools - 1):
            self.down.append(_ConvBlock(ch, ch * 2))
            ch *= 2
        self.bottleneck = _ConvBlock(ch, ch * 2)
        self.up_conv = nn.ModuleList()
        self.up_block = nn.ModuleList()
        for _ in range(num_pools):
            self.up_conv.append(_UpBlock(ch * 2, ch))
            self.up_block.append(_ConvBlock(ch * 2, ch))
            ch //= 2
        self.head = nn.Conv2d(chans, out_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.num_pools
        ph, pw = (-h) % m, (-w) % m
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.avg_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, block in zip(self.up_conv, self.up_block):
            x = up(x)
            x = block(torch.cat([x, skips.pop()], dim=1))
        x = self.head(x)
        return x[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]


class ResNet5(nn.Module):
    """Residual CNN: 5 conv layers with ReLU, one skip, no normalisation (GLEAM Sec. V, MoDL)."""

    def __init__(self, in_chans: int = 2, features: int = 64, num_layers: int = 5):
        super().__init__()
        if num_layers < 2:
            raise ValueError("ResNet5 needs at least 2 conv layers")
        layers: list[nn.Module] = [nn.Conv2d(in_chans, features, 3, padding=1), nn.ReLU()]
        for _ in range(num_layers - 2):
            layers += [nn.Conv2d(features, features, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(features, in_chans, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ComplexDenoiser(nn.Module):
    """Apply a 2-channel real CNN to a complex image ``[B, H, W]`` (optionally residual)."""

    def __init__(self, net: nn.Module, residual: bool = False):
        super().__init__()
        self.net = net
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channels_to_complex(self.net(complex_to_channels(x)))
        return x + out if self.residual else out


def build_denoiser(kind: str, **kwargs: int) -> ComplexDenoiser:
    """Denoiser by name: ``unet`` (chans, num_pools) or ``resnet`` (features, num_layers)."""
    if kind == "unet":
        unet = UNet(chans=kwargs.get("chans", 16), num_pools=kwargs.get("num_pools", 3))
        return ComplexDenoiser(unet, residual=True)
    if kind == "resnet":
        res = ResNet5(features=kwargs.get("features", 64), num_layers=kwargs.get("num_layers", 5))
        return ComplexDenoiser(res, residual=False)  # ResNet5 carries its own skip
    raise ValueError(f"unknown denoiser {kind!r}; choose one of 'unet', 'resnet'")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable weights."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""Convex-trainable denoiser: a stack of two-layer blocks (Ozturkler et al. 2021, after Sahiner et
al. [8]).

Each block is the two-layer fully-convolutional network of Ozturkler et al. 2021,
``x_{i+1} = f_i((g_i(x_i))_+) + x_i``: a ``k x k`` convolution ``g_i``, a ReLU, a ``1 x 1``
convolution ``f_i`` and a skip. With the earlier blocks frozen, fitting block ``i`` is the
two-layer problem that [8] shows to be convex, so the stack is trained one block at a time
(:func:`recon.train.layerwise.train_layerwise`).

Design choice: every block maps the 2-channel image to a 2-channel image, so the skip is the
image itself and a partially trained stack is already a denoiser. Ozturkler et al. 2021 drops
``f_i`` after
block ``i`` is trained and feeds the hidden features on; we keep ``f_i``, which makes each stage a
standalone two-layer net on a fixed input (the setting of [8]) and lets the stack sit inside MoDL
unchanged. ``f_i`` starts at zero, so an untrained block is the identity and a stack whose first
``b`` blocks are trained is exactly the ``b``-block network.
"""

from __future__ import annotations

import torch
from torch import nn

from recon.models.denoisers import ComplexDenoiser


class ConvexBlock(nn.Module):
    """Two-layer block ``x + f((g x)_+)`` (Ozturkler et al., ISMRM 2021): ``k x k`` conv, ReLU, ``1
    x 1`` conv, skip."""

    def __init__(self, chans: int = 2, hidden: int = 64, kernel_size: int = 7):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the image size, got {kernel_size}")
        self.g = nn.Conv2d(chans, hidden, kernel_size, padding=kernel_size // 2)
        self.f = nn.Conv2d(hidden, chans, 1)
        nn.init.zeros_(self.f.weight)  # identity at init: an untrained block changes nothing
        nn.init.zeros_(self.f.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(torch.relu(self.g(x)))


class ConvexNet(nn.Module):
    """``num_blocks`` :class:`ConvexBlock` applied in sequence on ``[B, 2, H, W]`` images."""

    def __init__(self, num_blocks: int = 4, hidden: int = 64, kernel_size: int = 7, chans: int = 2):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = nn.ModuleList(
            [ConvexBlock(chans, hidden, kernel_size) for _ in range(num_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build_convex_denoiser(
    num_blocks: int = 4, hidden: int = 64, kernel_size: int = 7
) -> ComplexDenoiser:
    """A :class:`ConvexNet` wrapped for complex images, ready to be MoDL's / PGD's denoiser.

    Ozturkler et al. 2021 uses 7x7 kernels and 256 hidden channels over 5 layers; the default width
    is smaller
    to suit CPU sites. The net carries its own skips, so the wrapper is not residual.
    """
    return ComplexDenoiser(ConvexNet(num_blocks, hidden, kernel_size), residual=False)


def convex_net(denoiser: nn.Module) -> ConvexNet:
    """The :class:`ConvexNet` inside a denoiser, or a clear error when it is another kind."""
    net = getattr(denoiser, "net", denoiser)
    if not isinstance(net, ConvexNet):
        raise TypeError(
            f"layer-wise training needs convex denoisers (build_convex_denoiser / "
            f"denoiser='convex'), got {type(net).__name__}"
        )
    return net

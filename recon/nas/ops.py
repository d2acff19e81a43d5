"""Candidate operations of the search space and the mixed operation.

The 8 candidates of GAutoMRI Sec. III.B.2 (FedAutoMRI Sec. 2.2): standard convolutions 3x3/5x5/7x7,
depthwise separable convolutions 3x3/5x5/7x7 and dilated 3x3 convolutions (dilation 2 and 3).
Every candidate maps ``[B, C, H, W]`` to ``[B, C, H, W]`` (stride 1, "same" zero padding).

Neither paper spells out the layer order inside an operation. We follow the authors' public
code (GAutoMRI ``darts/search_operations.py``): conv (with bias) then ReLU, no normalisation.
That also suits federated training: BatchNorm statistics are site-specific (FedBN), and an
unrolled denoiser must not rescale its input. The dilated candidates are plain (dense) dilated
convolutions: "enlarging receptive field and reducing the number of parameters" compared with
the 5x5 and 7x7 kernels whose receptive field they match.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PRIMITIVES: tuple[str, ...] = (
    "std_conv_3x3",
    "std_conv_5x5",
    "std_conv_7x7",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "sep_conv_7x7",
    "dil_2_conv_3x3",
    "dil_3_conv_3x3",
)


class StdConv(nn.Sequential):
    """``k x k`` convolution then ReLU."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2),
            nn.ReLU(),
        )


class SepConv(nn.Sequential):
    """Depthwise ``k x k`` convolution, pointwise ``1 x 1`` convolution, then ReLU."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels),
            nn.Conv2d(channels, channels, 1),
            nn.ReLU(),
        )


class DilConv(nn.Sequential):
    """``3 x 3`` convolution with dilation ``d`` (receptive field ``2d + 1``), then ReLU."""

    def __init__(self, channels: int, dilation: int):
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation),
            nn.ReLU(),
        )


OPS: dict[str, Callable[[int], nn.Module]] = {
    "std_conv_3x3": lambda c: StdConv(c, 3),
    "std_conv_5x5": lambda c: StdConv(c, 5),
    "std_conv_7x7": lambda c: StdConv(c, 7),
    "sep_conv_3x3": lambda c: SepConv(c, 3),
    "sep_conv_5x5": lambda c: SepConv(c, 5),
    "sep_conv_7x7": lambda c: SepConv(c, 7),
    "dil_2_conv_3x3": lambda c: DilConv(c, 2),
    "dil_3_conv_3x3": lambda c: DilConv(c, 3),
}


def make_op(name: str, channels: int) -> nn.Module:
    """The candidate operation ``name`` on ``channels`` feature maps."""
    try:
        factory = OPS[name]
    except KeyError:
        raise ValueError(f"unknown operation {name!r}; choose one of {list(PRIMITIVES)}") from None
    return factory(channels)


class MixedOp(nn.Module):
    r"""Continuous relaxation of one edge (GAutoMRI Eq. 6, FedAutoMRI Eq. 5).

    :math:`\bar\phi^{(i,j)}(x) = \sum_o \mathrm{softmax}(\alpha^{(i,j)})_o\, \phi_o(x)`, with
    one instance of every candidate in :data:`PRIMITIVES` order. The softmax is taken by the
    caller (once per forward for the whole cell stack) and passed as ``weights``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.ops = nn.ModuleList([make_op(name, channels) for name in PRIMITIVES])

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C, H, W]``; ``weights`` ``[len(PRIMITIVES)]`` (softmax of the edge's α)."""
        if weights.shape != (len(self.ops),):
            raise ValueError(f"expected {len(self.ops)} op weights, got {tuple(weights.shape)}")
        out = weights[0] * self.ops[0](x)
        for w, op in zip(weights[1:], self.ops[1:]):
            out = out + w * op(x)
        return out

"""Model size and compute: weights and convolution multiply-accumulates (MACs).

GAutoMRI Table IV / FedAutoMRI Table 2 report "FLOPs" as counted by the usual profilers (thop),
which count one multiply-accumulate per kernel tap; we report the same MACs (FLOPs ~ 2 x MACs).
Only convolutions are counted (they are >99% of the work); for an unrolled model the denoiser
runs once per unroll and the CG data consistency (FFTs) is not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recon.models.denoisers import ComplexDenoiser, count_parameters


def count_conv_macs(module: nn.Module, *inputs: Any) -> int:
    """MACs of every ``Conv2d`` / ``ConvTranspose2d`` in one forward of ``module(*inputs)``.

    ``Conv2d``: ``out.numel() * C_in / groups * kh * kw``; ``ConvTranspose2d``:
    ``in.numel() * C_out / groups * kh * kw``.
    """
    total = 0

    def conv_hook(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Conv2d)
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def tconv_hook(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.ConvTranspose2d)
        kh, kw = m.kernel_size
        total += args[0].numel() * (m.out_channels // m.groups) * kh * kw

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.ConvTranspose2d):
            handles.append(m.register_forward_hook(tconv_hook))
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


def denoiser_cost(denoiser: nn.Module, image_size: int | tuple[int, int]) -> dict[str, int]:
    """``{"params", "macs"}`` of one denoiser call on one ``H x W`` image.

    A :class:`~recon.models.denoisers.ComplexDenoiser` gets a complex ``[1, H, W]`` input, any
    other net a real ``[1, 2, H, W]`` one.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    p = next(denoiser.parameters())
    if isinstance(denoiser, ComplexDenoiser):
        x = torch.zeros(1, h, w, dtype=torch.complex64, device=p.device)
    else:
        x = torch.zeros(1, 2, h, w, dtype=p.dtype, device=p.device)
    return {"params": count_parameters(denoiser), "macs": count_conv_macs(denoiser, x)}


def unrolled_cost(model: nn.Module, image_size: int | tuple[int, int]) -> dict[str, int]:
    """``{"params", "denoiser_params", "denoiser_macs", "macs"}`` of an unrolled model.

    ``macs`` = the denoiser MACs summed over the ``num_unrolls`` denoiser calls of one forward
    (MoDL with a shared denoiser runs it ``num_unrolls`` times).
    """
    denoisers = list(model.denoisers)  # type: ignore[arg-type]
    costs = [denoiser_cost(d, image_size) for d in denoisers]
    num_unrolls = int(model.num_unrolls)  # type: ignore[arg-type]
    if len(denoisers) == 1:
        macs = costs[0]["macs"] * num_unrolls
    else:
        macs = sum(c["macs"] for c in costs)
    return {
        "params": count_parameters(model),
        "denoiser_params": sum(c["params"] for c in costs),
        "denoiser_macs": costs[0]["macs"],
        "macs": macs,
    }

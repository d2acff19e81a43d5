"""Convex layer-wise training of the denoiser (Ozturkler et al., ISMRM 2021): one two-layer block
at a time.

Stage ``b`` fits the first ``b + 1`` blocks' output to the reference with an ``l2`` loss; blocks
``< b`` are frozen (run without a graph) and later blocks are not used, so each stage is the
two-layer problem of Ozturkler et al. 2021 / [8] on a fixed input and needs the memory of one block.

The denoiser's input is what it sees inside the unrolled network:

* a shared denoiser (MoDL ``shared=True``) learns from the zero-filled SENSE image
  ``x0 = A^H y`` (Ozturkler et al. 2021: "the inputs to the network are zero-filled images obtained
  with SENSE");
* with one denoiser per unroll, denoiser ``k`` learns from the input it receives at unroll ``k``
  of the current network (earlier unrolls already trained, run without a graph), i.e. the
  greedy schedule of GLEAM with blocks as modules.

Data-consistency parameters (``lam``, ``t_i``) are not trained here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from recon.data.sample import Sample, Slices
from recon.models.convex import ConvexNet, convex_net
from recon.models.denoisers import channels_to_complex, complex_to_channels
from recon.models.unrolled import Unrolled
from recon.physics.sense import SenseOp
from recon.train.losses import get_loss, l2_loss
from recon.train.trainer import (
    TrainConfig,
    TrainHooks,
    TrainResult,
    _progress,
    iterate_batches,
    optimizer_step,
)


@dataclass
class LayerwiseResult(TrainResult):
    """``stages[j] = (denoiser index, block index)`` trained for ``steps_per_stage`` steps each."""

    stages: list[tuple[int, int]] = field(default_factory=list)
    steps_per_stage: int = 0


class _Captured(Exception):
    """Raised by a forward pre-hook to stop the forward once the denoiser input is known."""


def denoiser_input(model: Unrolled, k: int, y: torch.Tensor, physics: SenseOp) -> torch.Tensor:
    """The input of the denoiser of unroll ``k`` in the current network (no graph)."""
    dens = model.denoisers
    assert isinstance(dens, nn.ModuleList)
    den = dens[k if len(dens) == model.num_unrolls else 0]
    box: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        box.append(args[0])
        raise _Captured

    with torch.no_grad():
        x = model.init(y, physics)
        for i in range(k):
            x = model.step(i, x, y, physics)
        handle = den.register_forward_pre_hook(grab)
        try:
            model.step(k, x, y, physics)
        except _Captured:
            pass
        finally:
            handle.remove()
    if not box:
        raise RuntimeError(f"unroll {k} of {type(model).__name__} never called its denoiser")
    return box[0]


def _prefix(net: ConvexNet, x: torch.Tensor, b: int) -> torch.Tensor:
    """Blocks ``0..b`` of ``net``; frozen blocks ``< b`` run without a graph."""
    with torch.no_grad():
        for block in net.blocks[:b]:
            x = block(x)
    return net.blocks[b](x)


def train_layerwise(
    model: Unrolled,
    dataset: Slices,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    hooks: TrainHooks | None = None,
    progress: bool | None = None,
    *,
    loss: str | None = None,
    steps_per_block: int | None = None,
    desc: str = "layerwise",
) -> LayerwiseResult:
    """Train the convex denoiser(s) of ``model`` block by block (Ozturkler et al. 2021, Fig. 1).

    Parameters
    ----------
    model : Unrolled
        MoDL / PGD whose denoisers come from :func:`~recon.models.convex.build_convex_denoiser`.
    cfg : TrainConfig
        ``steps`` (or ``epochs``) is the total budget, split evenly over the stages;
        ``lr``, ``batch_size``, ``seed``, ``grad_clip``, ``weight_decay`` apply to every stage.
    loss : str, optional
        Stage loss on the denoiser output, any name of :func:`get_loss`. Default: Ozturkler et al.
        2021's
        ``l2``, against the complex reference ``Sample.image`` when the data carry it, else
        between RSS magnitudes (sites prepared from raw k-space have only the RSS target).
    steps_per_block : int, optional
        Overrides the even split of the budget.
    hooks : TrainHooks, optional
        ``regularizer(model)`` is added to each stage's loss (only the active block gets its
        gradient); ``after_backward(model)`` sees only the active block's gradients.
    """
    torch.manual_seed(cfg.seed)
    hooks = hooks or TrainHooks()
    loss_fn = _default_l2 if loss is None else get_loss(loss)
    model.to(device).train()
    dens = list(model.denoisers)  # type: ignore[arg-type]
    per_unroll = len(dens) == model.num_unrolls and model.num_unrolls > 1
    if not per_unroll:
        dens = dens[:1]
    nets = [convex_net(d) for d in dens]
    stages = [(k, b) for k, net in enumerate(nets) for b in range(len(net.blocks))]
    total = cfg.steps or cfg.epochs * math.ceil(len(dataset) / cfg.batch_size)
    per_stage = steps_per_block or max(1, total // len(stages))
    batches = iterate_batches(dataset, cfg.batch_size, cfg.seed)
    result = LayerwiseResult(
        steps=per_stage * len(stages), stages=stages, steps_per_stage=per_stage
    )
    t0 = time.perf_counter()
    stop = False
    with _progress(result.steps, desc, progress) as bar:
        for k, b in stages:
            if stop:
                break
            block = nets[k].blocks[b]
            params = [p for p in block.parameters() if p.requires_grad]
            opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            for _ in range(per_stage):
                sample = next(batches).to(device)
                physics = sample.physics()
                x_in = denoiser_input(model, k, sample.kspace, physics)
                z = _denoise_prefix(dens[k], nets[k], x_in, b)
                stage_loss = loss_fn(z, sample, physics)
                if hooks.regularizer is not None:
                    stage_loss = stage_loss + hooks.regularizer(model)
                where = f"in layer-wise denoiser {k}, block {b} (slice {sample.meta})"
                optimizer_step(stage_loss, model, params, opt, hooks, cfg.grad_clip, where)
                result.losses.append(float(stage_loss.detach()))
                bar.update(1)
                bar.set_postfix(stage=f"{k}.{b}", loss=f"{result.losses[-1]:.4f}")
                if hooks.after_step is not None and hooks.after_step(len(result.losses)):
                    stop = True  # early stopping ends the whole schedule, not just this block
                    break
    result.steps = len(result.losses)
    result.seconds = time.perf_counter() - t0
    return result


def _default_l2(x: torch.Tensor, sample: Sample, physics: SenseOp) -> torch.Tensor:
    """Ozturkler et al. 2021's l2: complex MSE to ``Sample.image`` if present, else MSE of RSS
    magnitudes."""
    if sample.image is not None:
        return l2_loss(x, sample, physics)
    return ((physics.rss(x) - sample.target) ** 2).mean()


def _denoise_prefix(den: nn.Module, net: ConvexNet, x: torch.Tensor, b: int) -> torch.Tensor:
    """The complex denoiser with only blocks ``0..b`` (the ComplexDenoiser wrapping of ``net``)."""
    out = channels_to_complex(_prefix(net, complex_to_channels(x), b))
    return x + out if getattr(den, "residual", False) else out

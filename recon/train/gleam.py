"""GLEAM greedy training of unrolled networks (GLEAM Alg. 1) and its multi-device form P-GLEAM
(Alg. 2).

The ``N`` unrolls are split into ``M`` modules of ``N / M`` unrolls. Module ``m`` has its own Adam
and its own local loss against the reference, Eq. 10: ``min_theta_m L(f_theta_m(DC(x^(m-1))), x)``.
Its input ``x^(m-1)`` is the *detached* output of module ``m - 1``, so backpropagation never
leaves a module and only one module's activations are alive at a time (memory scales with
``N / M`` unrolls, not ``N``).

P-GLEAM places module ``m`` on ``devices[m % D]`` and runs blocks of ``D`` modules: all ``D``
forwards first (each output detached and moved to the next device), then the ``D`` backward passes
and updates. On CUDA the backward of module ``m`` is queued asynchronously while module ``m + 1``'s
work is queued on its own device, so they overlap. Because modules share no trainable weights
and inputs are detached, the updates are numerically those of GLEAM on one device (Sec. IV-B);
GLEAM itself is the ``D = 1`` case.

Data-consistency parameters (MoDL's ``lam``, PGD's step sizes ``t_i``) are *frozen* during
greedy training: they are shared by all modules, so updating them from every module's local loss
would couple the modules and break the GLEAM == P-GLEAM equivalence. GLEAM likewise keeps
``mu`` (Eq. 7) and ``t`` (Eq. 3) as fixed hyper-parameters. Only the denoisers are learned, which
needs one denoiser per unroll: a shared-weight MoDL (``ModelConfig(shared=True)``) is refused for
``M > 1``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from recon.data.sample import Sample, Slices
from recon.models.unrolled import Unrolled
from recon.train.losses import LossFn, get_loss
from recon.train.trainer import (
    TrainConfig,
    TrainHooks,
    TrainResult,
    _progress,
    check_finite_loss,
    iterate_batches,
    optimizer_step,
)


@dataclass
class GleamResult(TrainResult):
    """:class:`TrainResult` whose ``losses`` are the last module's (the network output's) local
    losses, plus every module's local loss per step (``module_losses[step][m]``)."""

    num_modules: int = 1
    module_losses: list[list[float]] = field(default_factory=list)


def split_modules(num_unrolls: int, num_modules: int) -> list[range]:
    """Unroll indices of each of the ``M`` modules (contiguous, ``N / M`` each)."""
    if not 1 <= num_modules <= num_unrolls or num_unrolls % num_modules:
        raise ValueError(
            f"GLEAM needs num_modules M dividing num_unrolls N = {num_unrolls} "
            f"(1 <= M <= N), got M = {num_modules}"
        )
    size = num_unrolls // num_modules
    return [range(m * size, (m + 1) * size) for m in range(num_modules)]


def unroll_denoisers(model: Unrolled, num_modules: int) -> list[nn.Module]:
    """The denoiser of each unroll; a clear error when unrolls share one and ``M > 1``."""
    dens = getattr(model, "denoisers", None)
    if not isinstance(dens, nn.ModuleList):
        raise TypeError(
            f"GLEAM needs an unrolled model with .denoisers, got {type(model).__name__}"
        )
    if len(dens) == model.num_unrolls:
        return list(dens)
    if num_modules == 1:  # one module = end-to-end with frozen DC: sharing is harmless
        return [dens[0]] * model.num_unrolls
    raise ValueError(
        "GLEAM trains each module's own weights, but this model shares one denoiser across its "
        f"{model.num_unrolls} unrolls; build it with ModelConfig(shared=False) "
        "(build_model(..., shared=False)) or use num_modules=1"
    )


def _per_module(value: object, default: object, num_modules: int, name: str) -> list:
    if value is None:
        return [default] * num_modules
    if isinstance(value, str | int | float):
        return [value] * num_modules
    values = list(value)  # type: ignore[call-overload]
    if len(values) != num_modules:
        raise ValueError(f"{name} has {len(values)} entries for {num_modules} modules")
    return values


@dataclass
class _Modules:
    """GLEAM's ``M`` modules: each one's unrolls, device, weights, optimiser and local loss."""

    groups: list[range]  # unroll indices of module m
    devices: list[torch.device]  # module m runs on devices[m]
    params: list[list[nn.Parameter]]  # module m's trainable weights (disjoint)
    opts: list[torch.optim.Optimizer]
    loss_fns: list[LossFn]
    frozen: list[nn.Parameter]  # data consistency (lam, t_i), shared by all modules
    block_size: int  # D: modules run side by side (P-GLEAM); 1 for GLEAM


def _place_modules(
    model: Unrolled,
    denoisers: list[nn.Module],
    groups: list[range],
    mod_dev: list[torch.device],
) -> tuple[list[list[nn.Parameter]], list[nn.Parameter]]:
    """Move each module's denoisers to its device; return each module's weights and the frozen
    data-consistency parameters (everything else)."""
    model.to(mod_dev[0]).train()
    params: list[list[nn.Parameter]] = []
    seen: set[int] = set()
    for m, group in enumerate(groups):
        ps = []
        for i in group:
            denoisers[i].to(mod_dev[m])
            ps += [p for p in denoisers[i].parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in denoisers[i].parameters())
        params.append(ps)
    frozen = [p for p in model.parameters() if id(p) not in seen and p.requires_grad]
    if len(set(mod_dev)) > 1:
        # Frozen scalars as CPU tensors mix with tensors on any device (lam * z on cuda:1).
        for p in frozen:
            p.data = p.data.cpu()
    return params, frozen


def _build_modules(
    model: Unrolled,
    cfg: TrainConfig,
    device: torch.device | str,
    num_modules: int | None,
    devices: Sequence[torch.device | str] | None,
    lrs: float | Sequence[float] | None,
    losses: str | Sequence[str] | None,
) -> _Modules:
    """Split the unrolls into modules (Eq. 10), place them (Alg. 2) and give each its Adam."""
    n_mod = model.num_unrolls if num_modules is None else num_modules
    groups = split_modules(model.num_unrolls, n_mod)
    denoisers = unroll_denoisers(model, n_mod)
    devs = [torch.device(d) for d in (devices or [device])]
    mod_dev = [devs[m % len(devs)] for m in range(n_mod)]
    loss_fns: list[LossFn] = [get_loss(n) for n in _per_module(losses, cfg.loss, n_mod, "losses")]
    lr_list = [float(v) for v in _per_module(lrs, cfg.lr, n_mod, "lrs")]
    params, frozen = _place_modules(model, denoisers, groups, mod_dev)
    opts: list[torch.optim.Optimizer] = [
        torch.optim.Adam(ps, lr=lr, weight_decay=cfg.weight_decay)
        for ps, lr in zip(params, lr_list)
    ]
    return _Modules(groups, mod_dev, params, opts, loss_fns, frozen, len(devs))


@contextmanager
def _frozen(
    model: Unrolled, frozen: list[nn.Parameter], device: torch.device | str
) -> Iterator[None]:
    """Freeze the data-consistency parameters for the run; afterwards (also on error) unfreeze
    them and move the model to ``device``."""
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.to(device)


def train_gleam(
    model: Unrolled,
    dataset: Slices,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    hooks: TrainHooks | None = None,
    progress: bool | None = None,
    *,
    num_modules: int | None = None,
    devices: Sequence[torch.device | str] | None = None,
    lrs: float | Sequence[float] | None = None,
    losses: str | Sequence[str] | None = None,
    desc: str = "gleam",
) -> GleamResult:
    """Greedy module-wise training, GLEAM Alg. 1 (one device) / Alg. 2 (``devices``).

    Parameters
    ----------
    model : Unrolled
        MoDL with one denoiser per unroll (``shared=False``) or unrolled PGD.
    cfg : TrainConfig
        Steps, batch size, seed, clipping, weight decay; ``lr`` and ``loss`` are the per-module
        defaults.
    device : device
        Where the model lives afterwards and, without ``devices``, where it trains.
    hooks : TrainHooks, optional
        ``regularizer(model)`` is added to every module's local loss (FedProx; only the module's
        weights receive its gradient). ``after_backward(model)`` runs before each module's
        optimiser step and sees only that module's gradients (other ``.grad`` are ``None``), so
        Scaffold's correction applies per module.
    num_modules : int, optional
        ``M`` (default ``N``: one unroll per module); must divide ``N``.
    devices : list of devices, optional
        P-GLEAM: module ``m`` runs on ``devices[m % D]`` (the same device may repeat).
    lrs, losses : scalar / name or one per module, optional
        Per-module learning rates and local losses (names of :func:`get_loss`).
    """
    torch.manual_seed(cfg.seed)
    hooks = hooks or TrainHooks()
    mods = _build_modules(model, cfg, device, num_modules, devices, lrs, losses)
    steps = cfg.steps or cfg.epochs * math.ceil(len(dataset) / cfg.batch_size)
    batches = iterate_batches(dataset, cfg.batch_size, cfg.seed)
    result = GleamResult(steps=steps, num_modules=len(mods.groups))
    t0 = time.perf_counter()
    with _frozen(model, mods.frozen, device), _progress(steps, desc, progress) as bar:
        for step in range(steps):
            step_losses = _gleam_step(model, next(batches), mods, hooks, cfg, step)
            result.module_losses.append(step_losses)
            result.losses.append(step_losses[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{step_losses[-1]:.4f}")
            if hooks.after_step is not None and hooks.after_step(step + 1):
                break
    result.steps = len(result.losses)
    result.seconds = time.perf_counter() - t0
    return result


def _gleam_step(
    model: Unrolled,
    sample: Sample,
    mods: _Modules,
    hooks: TrainHooks,
    cfg: TrainConfig,
    step: int,
) -> list[float]:
    """One mini-batch through all modules in blocks of ``D = mods.block_size`` (Alg. 2 lines 2-14;
    Alg. 1 when ``D = 1``)."""
    groups, mod_dev = mods.groups, mods.devices
    data = {d: sample.to(d) for d in set(mod_dev)}
    ops = {d: s.physics() for d, s in data.items()}
    x = model.init(data[mod_dev[0]].kspace, ops[mod_dev[0]])  # x^(0) = A^H y, no weights
    detached: list[torch.Tensor] = []
    for start in range(0, len(groups), mods.block_size):
        block = range(start, min(start + mods.block_size, len(groups)))
        pending: list[torch.Tensor] = []
        for m in block:  # Alg. 2 lines 3-8: forwards, each output detached and sent on
            d = mod_dev[m]
            x = x.detach().to(d)
            for i in groups[m]:
                x = model.step(i, x, data[d].kspace, ops[d])
            loss = mods.loss_fns[m](x, data[d], ops[d])
            if hooks.regularizer is not None:
                loss = loss + hooks.regularizer(model).to(loss.device)
            pending.append(loss)
            x = x.detach()
        # The block's losses are all checked (a host sync each) before any backward is queued,
        # so the D backward passes are then queued back to back and run side by side on their
        # devices, and a non-finite loss stops the step before any module of the block moved.
        wheres = [f"in GLEAM module {m} at step {step} (slice {sample.meta})" for m in block]
        for loss, where in zip(pending, wheres):
            check_finite_loss(loss, where)
        for m, loss, where in zip(block, pending, wheres):  # lines 9-13: backward and update
            optimizer_step(
                loss, model, mods.params[m], mods.opts[m], hooks, cfg.grad_clip, where, False
            )
            detached.append(loss.detach())
        del pending, loss  # free the finished modules' graphs before the next block
    return [float(v) for v in detached]

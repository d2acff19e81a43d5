"""End-to-end training and evaluation of unrolled networks (Levac et al. 2023 Sec. 3.1: Adam, batch
1).

The same loop serves centralized, single-site and federated training: federated clients pass
:class:`TrainHooks` (FedProx's proximal term, Scaffold's gradient correction) instead of copying
the loop.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator
from torch import nn
from tqdm.auto import tqdm

from recon.data.sample import Sample, Slices, collate
from recon.metrics import METRIC_KEYS, Metrics, nrmse, psnr, ssim
from recon.models.unrolled import Unrolled
from recon.physics.fft import ifft2c, rss
from recon.train.accel import prepare
from recon.train.losses import get_loss


class TrainConfig(BaseModel):
    """Local optimisation settings: the run config's ``[train]`` section (``train.local-steps``).

    ``steps`` (key ``local-steps``: per round in a federation) wins over ``epochs``; ``0`` steps
    (``None`` in Python) trains ``epochs`` passes instead. Defaults: Levac et al. 2023 Sec. 3.1
    (Adam, batch 1, SSIM loss).
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        alias_generator=lambda name: name.replace("_", "-"),
    )

    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    steps: int | None = Field(
        None,
        ge=1,
        alias="local-steps",
        description="optimizer steps per local training, per round in a federation (0 = epochs)",
    )
    epochs: int = Field(1, ge=1, description="passes over the data when local-steps = 0")
    batch_size: int = Field(1, ge=1, description="slices per optimizer step")
    loss: str = Field(
        "ssim", description="loss: ssim | l1 | l2 | rss-l1 (Levac et al. 2023 Eq. 9: SSIM on RSS)"
    )
    seed: int = Field(0, description="seed of the weights' initialisation and the slice order")
    grad_clip: float | None = Field(None, gt=0, description="gradient-norm clip (0 = none)")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay")
    # Which local trainer (recon.train.methods.local_train): end-to-end, end-to-end with one
    # activation checkpoint per unroll (same result, less memory), greedy GLEAM modules or
    # layer-wise convex blocks (Ozturkler et al. 2021, model.denoiser = "convex").
    method: str = Field("e2e", description="local trainer: e2e | checkpoint | gleam | layerwise")
    # Communication budget (Levac et al. 2023 Sec. 3.4): a fixed total of local steps split over
    # the rounds; when > 0 it overrides local-steps with total-steps / num-server-rounds.
    total_steps: int = Field(
        0, ge=0, description="federation: local steps over all rounds (0 = local-steps per round)"
    )
    # How the denoiser CNN runs (recon.train.accel): never the weights or the checkpoint format.
    compile: bool = Field(
        False,
        description="torch.compile the denoiser CNN: faster steps after a one-off compile "
        "(tens of seconds per process and image size); runs eagerly if compiling fails",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="denoiser CNN precision: fp32 | bf16 (autocast; FFT, CG, loss fp32)"
    )

    @field_validator("steps", "grad_clip", mode="before")
    @classmethod
    def _zero_is_none(cls, value: Any) -> Any:
        # TOML has no null: 0 means "no step count" / "no clipping"
        return None if value == 0 and not isinstance(value, bool) else value

    @field_serializer("steps")
    def _no_steps(self, value: int | None) -> int:
        return value or 0

    @field_serializer("grad_clip")
    def _no_clip(self, value: float | None) -> float:
        return value or 0.0

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        get_loss(value)  # unknown names fail naming the choices
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from recon.train.methods import METHODS  # the trainers import this module

        if value not in METHODS:
            raise ValueError(f"unknown train.method {value!r}; choose one of {list(METHODS)}")
        return value


@dataclass
class TrainHooks:
    """Extension points for federated variants (never copies of the loop).

    ``regularizer(model) -> scalar`` is added to the loss (FedProx); ``after_backward(model)``
    edits gradients before the optimiser step (Scaffold's ``- c_k + c``); ``after_step(step)``
    (1-based) runs after each optimiser step and returns True to stop early (validation-based
    early stopping, e.g. personalization's cross-validation). Every method of
    :func:`recon.train.methods.local_train` honours all three.
    """

    regularizer: Callable[[nn.Module], torch.Tensor] | None = None
    after_backward: Callable[[nn.Module], None] | None = None
    after_step: Callable[[int], bool] | None = None


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return float(sum(self.losses) / max(len(self.losses), 1))

    @property
    def final_loss(self) -> float:
        """Mean over the last 10% of steps (a less noisy 'where it ended' than the last step)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return float(sum(tail) / max(len(tail), 1))


def iterate_batches(
    dataset: Slices, batch_size: int, seed: int, shuffle: bool = True
) -> Iterator[Sample]:
    """Endless seeded epochs over ``dataset``; each epoch is a fresh permutation."""
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = (
            torch.randperm(len(dataset), generator=gen) if shuffle else torch.arange(len(dataset))
        )
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size].tolist()
            yield collate([dataset[i] for i in idx])


def _progress(total: int, desc: str, enabled: bool | None) -> tqdm:
    """A progress bar on stderr; in logs (not a terminal) it prints a line every 30 s at most."""
    tty = sys.stderr.isatty()
    show = tty if enabled is None else enabled
    return tqdm(
        total=total,
        desc=desc,
        disable=not show,
        leave=not tty,
        dynamic_ncols=tty,
        mininterval=0.1 if tty else 30.0,
        ascii=not tty,
    )


def optimizer_step(
    loss: torch.Tensor,
    model: nn.Module,
    params: Sequence[torch.Tensor],
    opt: torch.optim.Optimizer,
    hooks: TrainHooks,
    grad_clip: float | None,
    where: str,
    check_finite: bool = True,
) -> None:
    """One update of ``params`` from ``loss``, shared by every trainer.

    Refuses a non-finite loss (``where`` says which step / module / slice; ``check_finite=False``
    when the caller already checked, see :func:`check_finite_loss`), backpropagates into
    ``params`` only, lets ``hooks.after_backward`` edit the gradients (Scaffold), clips, steps.
    """
    if check_finite:
        check_finite_loss(loss, where)
    model.zero_grad(set_to_none=True)  # hooks must see this update's gradients only
    loss.backward(inputs=params)
    if hooks.after_backward is not None:
        hooks.after_backward(model)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def check_finite_loss(loss: torch.Tensor, where: str) -> None:
    """A ``FloatingPointError`` naming ``where`` if ``loss`` is NaN or infinite (a host sync)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite training loss {where}; lower the learning rate or check the data"
        )


def train(
    model: Unrolled,
    dataset: Slices,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    hooks: TrainHooks | None = None,
    progress: bool | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` end to end with Adam for ``cfg.steps`` steps (or ``cfg.epochs`` epochs)."""
    torch.manual_seed(cfg.seed)
    hooks = hooks or TrainHooks()
    loss_fn = get_loss(cfg.loss)
    model.to(device).train()
    prepare(model, cfg.compile, cfg.precision)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.steps or cfg.epochs * math.ceil(len(dataset) / cfg.batch_size)
    batches = iterate_batches(dataset, cfg.batch_size, cfg.seed)
    result = TrainResult(steps=steps)
    t0 = time.perf_counter()
    with _progress(steps, desc, progress) as bar:
        for _ in range(steps):
            sample = next(batches).to(device)
            physics = sample.physics()
            x = model(sample.kspace, physics)
            loss = loss_fn(x, sample, physics)  # type: ignore[arg-type]
            if hooks.regularizer is not None:
                loss = loss + hooks.regularizer(model)
            where = f"at step {len(result.losses)} (slice {sample.meta})"
            optimizer_step(loss, model, params, opt, hooks, cfg.grad_clip, where)
            result.losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            if hooks.after_step is not None and hooks.after_step(len(result.losses)):
                break
    result.steps = len(result.losses)
    result.seconds = time.perf_counter() - t0
    return result


def zero_filled(sample: Sample) -> torch.Tensor:
    """RSS of the inverse FFT of the undersampled k-space ``[B, H, W]`` (the baseline)."""
    return rss(ifft2c(sample.kspace))


@torch.no_grad()
def evaluate(
    model: Unrolled | None,
    dataset: Slices,
    device: torch.device | str = "cpu",
    num_unrolls: int | None = None,
    per_unroll: bool = False,
) -> Metrics:
    """Mean SSIM / NRMSE / PSNR on RSS magnitude over ``dataset``, slice by slice.

    ``model=None`` evaluates the zero-filled reconstruction. ``num_unrolls`` runs early-exit
    inference (``N_inf``); ``per_unroll`` adds the PSNR after every unroll (GLEAM Fig. 9,
    ``Metrics.psnr_per_unroll``). A compiled denoiser (``train.compile``) runs eagerly here:
    a round evaluates a few slices, fewer than compiling a second, no-grad graph pays back.
    """
    if model is not None:
        model.to(device).eval()
    with torch.compiler.set_stance("force_eager"):
        rows, curves = _evaluate_slices(model, dataset, device, num_unrolls, per_unroll)
    if not rows:
        raise ValueError("cannot evaluate on an empty dataset")
    means = {k: sum(r[k] for r in rows) / len(rows) for k in METRIC_KEYS}
    curve = (
        [sum(c[j] for c in curves) / len(curves) for j in range(len(curves[0]))] if curves else None
    )
    if model is not None:
        model.train()
    return Metrics(
        ssim=means["ssim"],
        nrmse=means["nrmse"],
        psnr=means["psnr"],
        n=len(rows),
        per_slice=rows,
        psnr_per_unroll=curve,
    )


def _evaluate_slices(
    model: Unrolled | None,
    dataset: Slices,
    device: torch.device | str,
    num_unrolls: int | None,
    per_unroll: bool,
) -> tuple[list[dict[str, float]], list[list[float]]]:
    """Per-slice metrics and per-unroll PSNR curves of :func:`evaluate`."""
    rows: list[dict[str, float]] = []
    curves: list[list[float]] = []
    for i in range(len(dataset)):
        sample = collate([dataset[i]]).to(device)
        physics = sample.physics()
        if model is None:
            image = zero_filled(sample)
        elif per_unroll:
            outs = model(sample.kspace, physics, num_unrolls=num_unrolls, return_all=True)
            assert isinstance(outs, list)
            curves.append([float(psnr(physics.rss(o), sample.target)[0]) for o in outs])
            image = physics.rss(outs[-1])
        else:
            final = model(sample.kspace, physics, num_unrolls=num_unrolls)
            assert isinstance(final, torch.Tensor)
            image = physics.rss(final)
        t = sample.target
        rows.append(
            {
                "ssim": float(ssim(image, t)[0]),
                "nrmse": float(nrmse(image, t)[0]),
                "psnr": float(psnr(image, t)[0]),
            }
        )
    return rows, curves

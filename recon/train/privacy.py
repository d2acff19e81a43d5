"""Slice-level differential privacy at a site: DP-SGD (Abadi et al. 2016) and its accountant.

What is protected: one training slice of one patient (add/remove one slice from a site's
training set). Each optimizer step

1. draws its batch by **Poisson sampling**: every training slice joins independently with
   probability ``q = train.batch-size / N`` (``N`` the site's training slices), so a step has
   ``B = q N`` slices on average (1 with the default batch size 1) and may have none;
2. computes each sampled slice's gradient on its own (per-sample gradients by a loop over the
   batch: MoDL's conjugate-gradient data consistency is not ``vmap``-friendly), clips the whole
   gradient vector of each to the L2 norm ``C`` (``dp.clip``) and sums them;
3. adds Gaussian noise ``N(0, sigma^2 C^2)`` (``sigma = dp.noise-multiplier``) to every
   coordinate of the sum and divides by the expected batch size ``q N``;
4. adds the gradients of data-independent terms (FedProx's proximal term), lets the hooks edit
   the result (Scaffold's ``- c_k + c``, itself post-processing of earlier private outputs) and
   takes the optimizer step (Adam: post-processing of the noisy gradient).

The accountant is Opacus's RDP accountant (Mironov et al. 2019, the Poisson-subsampled
Gaussian mechanism) or its PRV accountant (Gopi et al. 2021): both assume exactly this Poisson
sampling. The site's epsilon after server round ``r`` is that of ``r x K`` steps (``K`` local
steps per round) at rate ``q`` and noise ``sigma`` for ``dp.delta``: a function of the run
config and the site's slice count only, so the site, the server and an auditor compute the same
number, and a resumed run continues from it. A site that skipped rounds is over-counted (an
upper bound).

The noise and the sampling draw from the operating system's randomness (never from the run
config's seed: whoever knows the seed could subtract the noise), so DP runs are not bit-exact
on resume; tests pass ``noise_seed``.

Methods: ``e2e`` and ``checkpoint`` (the same gradients). GLEAM and layer-wise training are
refused (:data:`REFUSED_METHODS`): they update one module / block at a time with its own loss,
optimizer and step count, with the other parameters frozen, so a step's gradient is not the
whole model's gradient of one loss and the steps of the modules are not one sequence of
identical subsampled Gaussian mechanisms; bounding a slice's influence would need one clip and
one accountant per module and composition over modules, which is not implemented.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from recon.data.sample import Slices, collate
from recon.models.unrolled import Unrolled
from recon.train.losses import get_loss
from recon.train.trainer import (
    TrainConfig,
    TrainHooks,
    TrainResult,
    _progress,
    check_finite_loss,
)

DP_METHODS = ("e2e", "checkpoint")
REFUSED_METHODS = {
    "gleam": (
        "GLEAM trains each module greedily with its own loss and optimizer while the others are "
        "frozen: a step's gradient is not the whole model's gradient, so one per-step clip and "
        "one accountant do not bound a slice's influence on the shipped model"
    ),
    "layerwise": (
        "layer-wise training updates one convex block at a time for steps-per-block steps with "
        "the rest frozen: the per-step accounting of one subsampled Gaussian mechanism does "
        "not apply to its block-wise updates"
    ),
}
ACCOUNTANTS = ("rdp", "prv")


def refusal(method: str) -> str | None:
    """Why DP-SGD refuses ``train.method`` (None if it supports it)."""
    if method in DP_METHODS:
        return None
    why = REFUSED_METHODS.get(method, "only e2e and checkpoint are supported")
    return f'dp.enabled = true needs train.method = "e2e" or "checkpoint" ({method!r}: {why})'


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings of one local training.

    ``sample_rate`` q (Poisson), ``clip`` C, ``noise_multiplier`` sigma; ``noise_seed`` seeds
    the sampling and the noise (tests only: ``None`` draws it from the OS).
    """

    clip: float
    noise_multiplier: float
    sample_rate: float
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"dp.clip must be > 0, got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"dp.noise-multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"the sample rate must be in (0, 1], got {self.sample_rate}")


def sample_rate(batch_size: int, num_slices: int) -> float:
    """Poisson rate ``q = batch-size / N`` (at most 1)."""
    if num_slices <= 0:
        raise ValueError("cannot train on an empty dataset")
    return min(1.0, batch_size / num_slices)


def steps_per_round(cfg: TrainConfig, num_slices: int) -> int:
    """Local steps of one training: ``local-steps``, else ``epochs x ceil(N / batch-size)``."""
    return cfg.steps or cfg.epochs * math.ceil(num_slices / cfg.batch_size)


def epsilon(
    noise_multiplier: float, rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Opacus's epsilon at ``delta`` after ``steps`` Poisson-subsampled Gaussian steps.

    ``inf`` without noise; ``0`` before the first step.
    """
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(float(noise_multiplier), float(rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def noise_for_epsilon(
    target: float, rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier with epsilon <= ``target`` (Opacus's search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant=accountant,
        )
    )


def _clip_into(
    total: Sequence[torch.Tensor], params: Sequence[torch.Tensor], clip: float
) -> tuple[float, float]:
    """Add the current gradients of ``params``, clipped jointly to L2 norm ``clip``, into
    ``total``; returns (norm before, norm after)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    scale = min(1.0, clip / (norm + 1e-12))
    for t, g in zip(total, grads):
        t.add_(g, alpha=scale)
    return norm, norm * scale


def train_dp(
    method: str,
    model: Unrolled,
    dataset: Slices,
    cfg: TrainConfig,
    dp: DPSGD,
    device: torch.device | str = "cpu",
    hooks: TrainHooks | None = None,
    progress: bool | None = None,
    desc: str = "dp-sgd",
) -> TrainResult:
    """DP-SGD training of ``model`` in place (module docstring) with ``method`` (e2e or
    checkpoint); ``cfg.steps`` steps (or ``epochs x ceil(N / batch-size)``) at rate ``dp``."""
    why = refusal(method)
    if why is not None:
        raise ValueError(why)
    if cfg.grad_clip is not None:
        raise ValueError("train.grad-clip does not combine with dp.enabled (dp.clip clips)")
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    torch.manual_seed(cfg.seed)  # weights' randomness only; sampling and noise are secret
    hooks = hooks or TrainHooks()
    loss_fn = get_loss(cfg.loss)
    model.to(device).train()
    net: nn.Module = model
    if method == "checkpoint":
        from recon.train.checkpointing import CheckpointedUnrolled

        net = CheckpointedUnrolled(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = steps_per_round(cfg, len(dataset))
    seed = dp.noise_seed if dp.noise_seed is not None else secrets.randbits(63)
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    expected = dp.sample_rate * len(dataset)
    std = dp.noise_multiplier * dp.clip
    result = TrainResult(steps=steps)
    t0 = time.perf_counter()
    with _progress(steps, desc, progress) as bar:
        for step in range(steps):
            picked = torch.nonzero(torch.rand(len(dataset), generator=gen) < dp.sample_rate)
            total = [torch.zeros_like(p) for p in params]
            losses: list[float] = []
            for i in picked.flatten().tolist():
                sample = collate([dataset[i]]).to(device)
                physics = sample.physics()
                x = net(sample.kspace, physics)
                loss = loss_fn(x, sample, physics)  # type: ignore[arg-type]
                check_finite_loss(loss, f"at step {step} (slice {sample.meta})")
                model.zero_grad(set_to_none=True)
                loss.backward(inputs=params)
                _clip_into(total, params, dp.clip)
                losses.append(float(loss.detach()))
            for t in total:
                if std > 0:
                    noise = torch.randn(t.shape, generator=noise_gen, device=t.device)
                    t.add_(noise.to(t.dtype), alpha=std)
                t.div_(expected)
            model.zero_grad(set_to_none=True)
            if hooks.regularizer is not None:  # data-independent: no clip, no noise needed
                hooks.regularizer(model).backward(inputs=params)
            for p, t in zip(params, total):
                p.grad = t if p.grad is None else p.grad + t
            if hooks.after_backward is not None:
                hooks.after_backward(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            result.losses.append(sum(losses) / len(losses) if losses else math.nan)
            bar.update(1)
            if hooks.after_step is not None and hooks.after_step(step + 1):
                break
    result.steps = len(result.losses)
    done = [v for v in result.losses if not math.isnan(v)]  # steps with no slice have no loss
    result.losses = done or [0.0]
    result.seconds = time.perf_counter() - t0
    return result

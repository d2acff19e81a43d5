"""One entry point for a site's local training, whatever the method (run config ``train.method``).

``e2e`` (Levac et al. 2023, Eq. 9), ``checkpoint`` (end-to-end with one checkpoint per unroll,
GLEAM),
``gleam`` (greedy modules, GLEAM Alg. 1 / 2) and ``layerwise`` (convex blocks, Ozturkler et al.
2021) share
the signature of :func:`recon.train.trainer.train` and the same :class:`TrainHooks`, so FedProx
and Scaffold work with each of them; a site with a small GPU can pick a memory-efficient method
and still join a federation of the same architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch

from recon.data.sample import Slices
from recon.models.unrolled import Unrolled
from recon.train.accel import dp_refusal, prepare
from recon.train.checkpointing import train_checkpointed
from recon.train.gleam import train_gleam
from recon.train.layerwise import train_layerwise
from recon.train.privacy import DPSGD, train_dp
from recon.train.trainer import TrainConfig, TrainHooks, TrainResult, train

Method = Literal["e2e", "gleam", "checkpoint", "layerwise"]
METHODS: tuple[str, ...] = get_args(Method)

# Keyword options each method accepts (anything else is an error naming the key).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "e2e": (),
    "checkpoint": (),
    "gleam": ("num_modules", "devices", "lrs", "losses"),
    "layerwise": ("loss", "steps_per_block"),
}


def check_method(
    method: str, num_unrolls: int, shared: bool, denoiser: str, gleam_modules: int = 0
) -> None:
    """Refuse, before any data is loaded, a method the architecture cannot be trained with.

    ``gleam_modules = 0`` means ``M = N``. Messages name the run-config keys (``train.method``,
    ``gleam.modules``, ``model.shared``, ``model.denoiser``), the same for ``fedunroll train``
    and ``fedunroll simulate``.
    """
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown train.method {method!r}; choose one of {list(METHODS)}")
    if method == "gleam":
        n = num_unrolls
        m = gleam_modules or n
        if n % m:
            raise ValueError(f"gleam.modules ({gleam_modules}) must divide model.num-unrolls ({n})")
        if m > 1 and shared:
            raise ValueError(
                f'train.method = "gleam" with gleam.modules = {gleam_modules} '
                f"({m} modules) needs one denoiser per unroll: set model.shared = false "
                "(or gleam.modules = 1)"
            )
    if method == "layerwise" and denoiser != "convex":
        raise ValueError(
            f'train.method = "layerwise" trains convex blocks: set model.denoiser = "convex" '
            f"(got {denoiser!r})"
        )


def method_options(
    method: str,
    *,
    gleam_modules: int = 0,
    gleam_devices: Sequence[str] = (),
    gleam_lrs: Sequence[float] | None = None,
    gleam_losses: Sequence[str] | None = None,
    steps_per_block: int = 0,
) -> dict[str, Any]:
    """The keyword options of :func:`local_train` for ``method`` from config values (``0`` /
    empty = the method's default); options of other methods are left out."""
    if method == "gleam":
        opts: dict[str, Any] = {"num_modules": gleam_modules or None}
        if gleam_devices:
            opts["devices"] = list(gleam_devices)
        if gleam_lrs:
            opts["lrs"] = list(gleam_lrs)
        if gleam_losses:
            opts["losses"] = list(gleam_losses)
        return opts
    if method == "layerwise":
        return {"steps_per_block": steps_per_block or None}
    return {}


def local_train(
    method: str,
    model: Unrolled,
    dataset: Slices,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    hooks: TrainHooks | None = None,
    progress: bool | None = None,
    dp: DPSGD | None = None,
    **method_kwargs: Any,
) -> TrainResult:
    """Train ``model`` in place with ``method`` and return its :class:`TrainResult`.

    ``method_kwargs`` are the method's own options (:data:`METHOD_OPTIONS`), e.g.
    ``local_train("gleam", model, ds, cfg, num_modules=3)``. ``dp`` trains with DP-SGD
    (:mod:`recon.train.privacy`; refuses gleam and layerwise, naming why).
    """
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown training method {method!r}; choose one of {list(METHODS)}")
    unknown = sorted(set(method_kwargs) - set(METHOD_OPTIONS[method]))
    if unknown:
        allowed = list(METHOD_OPTIONS[method]) or "none"
        raise TypeError(
            f"training method {method!r} got unknown options {unknown}; allowed: {allowed}"
        )
    if dp is not None and (why := dp_refusal(cfg.compile, cfg.precision)) is not None:
        raise ValueError(why)
    prepare(model, cfg.compile, cfg.precision)  # train.compile / train.precision, every method
    if dp is not None:  # slice-level DP-SGD (recon.train.privacy): e2e and checkpoint only
        return train_dp(method, model, dataset, cfg, dp, device, hooks, progress)
    if method == "e2e":
        return train(model, dataset, cfg, device, hooks, progress)
    if method == "checkpoint":
        return train_checkpointed(model, dataset, cfg, device, hooks, progress)
    if method == "gleam":
        return train_gleam(model, dataset, cfg, device, hooks, progress, **method_kwargs)
    return train_layerwise(model, dataset, cfg, device, hooks, progress, **method_kwargs)

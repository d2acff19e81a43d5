"""Non-federated baselines for the same sites: zero-filled, local-only and centralized training.

A federated run is judged against three references evaluated on each site's own test split:

* **zero-filled**: the RSS of the inverse FFT of the undersampled k-space (no learning);
* **local-only**: each site trains alone, from the same initial weights as the federation, for
  the same number of local optimiser steps it takes in the federation (rounds x local steps);
* **centralized**: one model trained on the union of all sites' training slices (the
  data-pooling upper reference), by default for the federation's total number of local steps
  summed over sites, i.e. the same number of gradient computations.

Everything reuses :func:`recon.train.train` and :func:`recon.train.evaluate`; nothing here copies
the loop. Results are ``{site: {"ssim", "nrmse", "psnr"}}``, the shape of ``results.json``'s
``final`` section.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from recon.data.dataset import SiteDataset
from recon.data.sample import Sample
from recon.models import ModelConfig, Unrolled, build_model
from recon.train.trainer import TrainConfig, evaluate, train

SiteMetrics = dict[str, float]  # ssim, nrmse, psnr of one site (as_dict of recon.metrics.Metrics)
SiteDirs = Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]]
METHODS = ("zero_filled", "local_only", "centralized")


def site_map(site_dirs: SiteDirs) -> dict[str, Path]:
    """``{site id: folder}``; a plain list of folders is keyed by folder name (``site0``, ...)."""
    if isinstance(site_dirs, Mapping):
        sites = {str(k): Path(v) for k, v in site_dirs.items()}
    else:
        sites = {}
        for d in site_dirs:
            name = Path(d).name
            if name in sites:
                raise ValueError(f"two site folders share the name {name!r}; pass a mapping")
            sites[name] = Path(d)
    if not sites:
        raise ValueError("no sites given")
    return sites


def initial_model(
    model_cfg: ModelConfig, seed: int = 0, init_state: Mapping[str, torch.Tensor] | None = None
) -> Unrolled:
    """The shared starting point: ``init_state`` if given, else weights drawn under ``seed``."""
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    if init_state is not None:
        model.load_state_dict(dict(init_state))
    return model


class SiteSlices:
    """The sites' splits as lists of samples, each loaded once; pass one instead of ``site_dirs``
    to share the loading between baselines (as :func:`run_baselines` does)."""

    def __init__(
        self,
        site_dirs: SiteDirs,
        data_kwargs: Mapping[str, Any] | None = None,
        max_train_slices: int | None = None,
    ) -> None:
        self.sites = site_map(site_dirs)
        self.kwargs = dict(data_kwargs or {})
        self.max_train_slices = max_train_slices
        self._cache: dict[tuple[str, str], list[Sample]] = {}

    def get(self, site: str, split: str) -> list[Sample]:
        if (site, split) not in self._cache:
            kwargs = dict(self.kwargs)
            if split == "train" and self.max_train_slices is not None:
                kwargs["max_slices"] = self.max_train_slices
            ds = SiteDataset(self.sites[site], split=split, **kwargs)
            self._cache[site, split] = [ds[i] for i in range(len(ds))]
        return self._cache[site, split]


def _as_slices(
    site_dirs: SiteDirs | SiteSlices,
    data_kwargs: Mapping[str, Any] | None,
    max_train_slices: int | None = None,
) -> SiteSlices:
    if isinstance(site_dirs, SiteSlices):
        return site_dirs
    return SiteSlices(site_dirs, data_kwargs, max_train_slices)


def _evaluate_sites(
    model: Unrolled | None, data: SiteSlices, split: str, device: torch.device | str
) -> dict[str, SiteMetrics]:
    return {s: evaluate(model, data.get(s, split), device).as_dict() for s in data.sites}


def _sites_bar(items: Iterable[str], desc: str, progress: bool | None) -> Iterable[str]:
    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(list(items), desc=desc, leave=False, disable=not show, dynamic_ncols=True)


def zero_filled_metrics(
    site_dirs: SiteDirs | SiteSlices,
    device: torch.device | str = "cpu",
    data_kwargs: Mapping[str, Any] | None = None,
    split: str = "test",
) -> dict[str, SiteMetrics]:
    """SSIM / NRMSE / PSNR of the zero-filled reconstruction on each site's ``split``."""
    data = _as_slices(site_dirs, data_kwargs)
    return _evaluate_sites(None, data, split, device)


def local_only(
    site_dirs: SiteDirs | SiteSlices,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    total_steps: int,
    device: torch.device | str = "cpu",
    data_kwargs: Mapping[str, Any] | None = None,
    *,
    init_state: Mapping[str, torch.Tensor] | None = None,
    max_train_slices: int | None = None,
    split: str = "test",
    progress: bool | None = None,
) -> dict[str, SiteMetrics]:
    """Train one model per site on that site alone; evaluate each on its own ``split``.

    Parameters
    ----------
    site_dirs : list of folders, or ``{site id: folder}``
    model_cfg, train_cfg : the federation's model and local-training settings
        (``train_cfg.steps`` is replaced by ``total_steps``).
    total_steps : int
        Local steps the site takes over the whole federation (rounds x local steps per round).
    init_state : state dict, optional
        The federation's initial global weights; default: weights drawn under ``train_cfg.seed``.
    data_kwargs : dict, optional
        Passed to :class:`~recon.data.dataset.SiteDataset` (mask, acceleration, seed, ...).
    max_train_slices : int, optional
        Cap on each site's training slices (``data.max-train-slices``); evaluation uses all.
    split : str
        The evaluation split.
    progress : bool, optional
        Progress bars (default: when stderr is a terminal).

    Returns
    -------
    dict
        ``{site: {"ssim", "nrmse", "psnr"}}``.
    """
    data = _as_slices(site_dirs, data_kwargs, max_train_slices)
    cfg = train_cfg.model_copy(update={"steps": int(total_steps)})
    start = initial_model(model_cfg, train_cfg.seed, init_state).state_dict()
    out: dict[str, SiteMetrics] = {}
    for site in _sites_bar(data.sites, "local-only", progress):
        model = build_model(model_cfg)
        model.load_state_dict(start)
        train(model, data.get(site, "train"), cfg, device, progress=progress, desc=site)
        out[site] = evaluate(model, data.get(site, split), device).as_dict()
    return out


def centralized(
    site_dirs: SiteDirs | SiteSlices,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    total_steps: int,
    device: torch.device | str = "cpu",
    data_kwargs: Mapping[str, Any] | None = None,
    *,
    steps: int | None = None,
    init_state: Mapping[str, torch.Tensor] | None = None,
    max_train_slices: int | None = None,
    split: str = "test",
    progress: bool | None = None,
) -> dict[str, SiteMetrics]:
    """Train one model on the union of all sites' training slices; evaluate it on every site.

    ``total_steps`` has the meaning of :func:`local_only` (per-site local steps in the
    federation); the pooled model takes ``total_steps * len(sites)`` steps, the federation's
    total gradient computations, unless ``steps`` sets the count exactly. Slices of different
    sizes mix freely with ``train_cfg.batch_size == 1`` (the paper's setting). Other
    parameters as in :func:`local_only`.
    """
    data = _as_slices(site_dirs, data_kwargs, max_train_slices)
    n_steps = int(steps) if steps is not None else int(total_steps) * len(data.sites)
    cfg = train_cfg.model_copy(update={"steps": n_steps})
    pooled = [s for site in data.sites for s in data.get(site, "train")]
    model = initial_model(model_cfg, train_cfg.seed, init_state)
    train(model, pooled, cfg, device, progress=progress, desc="centralized")
    return _evaluate_sites(model, data, split, device)


def run_baselines(
    site_dirs: SiteDirs,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    total_steps: int,
    device: torch.device | str = "cpu",
    data_kwargs: Mapping[str, Any] | None = None,
    methods: Sequence[str] = METHODS,
    *,
    init_state: Mapping[str, torch.Tensor] | None = None,
    max_train_slices: int | None = None,
    progress: bool | None = None,
) -> dict[str, dict[str, SiteMetrics]]:
    """The chosen baselines as ``{method: {site: metrics}}``, ready for ``results["final"]``."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {list(METHODS)}")
    data = SiteSlices(site_dirs, data_kwargs, max_train_slices)  # each split loaded once
    out: dict[str, dict[str, SiteMetrics]] = {}
    if "zero_filled" in methods:
        out["zero_filled"] = zero_filled_metrics(data, device)
    common: dict[str, Any] = {"init_state": init_state, "progress": progress}
    if "local_only" in methods:
        out["local_only"] = local_only(data, model_cfg, train_cfg, total_steps, device, **common)
    if "centralized" in methods:
        out["centralized"] = centralized(data, model_cfg, train_cfg, total_steps, device, **common)
    return out

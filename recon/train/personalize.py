"""Client-side personalization: fine-tuning with k-fold CV hyper-parameters (Levac et al. 2023 Sec.
3.4).

After federated training, a site fine-tunes the global model on its own slices with the training
SSIM loss (Eq. 9). The two hyper-parameters, the learning rate ``r_fine`` and the number of
epochs ``N_fine``, are chosen by k-fold cross-validation on the site's own training slices
(k=5 in the paper; Table 4 found 1e-5 / 170 for a seen site and 1e-4 / 200 for unseen ones):

* for every learning rate of the grid and every fold, the global model is fine-tuned on the
  other folds for up to ``max_epochs`` epochs, with the validation SSIM on the held-out fold
  measured after every epoch (epoch 0 is the global model itself); a fold stops early once its
  validation SSIM has not improved for ``patience`` epochs;
* the mean validation curve over folds gives, for each learning rate, the best epoch; the pair
  (``r_fine``, ``N_fine``) with the highest mean validation SSIM wins;
* low-data guard: if the best pair does not beat the un-tuned global model (epoch 0) by
  ``min_gain`` (default 0.005 SSIM), fine-tuning is judged not to help and the global model is
  kept (Levac et al. 2023 saw this for well-represented sites; on the synthetic sites a CV gain of
  0.0035
  turned into a small test loss, hence a margin above 0);
* otherwise the global model is fine-tuned on all local training slices with the chosen values.

Folds are grouped by file (volume) when the site has at least ``folds`` files, so slices of one
volume never sit on both sides of a split.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from recon.data.sample import Sample, Slices
from recon.models.unrolled import Unrolled
from recon.train.trainer import TrainConfig, TrainHooks, evaluate, train


class PersonalizeConfig(BaseModel):
    """The CV grid. Paper-scale values (``max_epochs=200``, ``lrs=(1e-5, 1e-4)``) need a GPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lrs: tuple[float, ...] = (1e-4, 1e-3)
    max_epochs: int = Field(10, ge=1)
    folds: int = Field(5, ge=2)
    patience: int = Field(3, ge=1)
    min_gain: float = Field(0.005, ge=0)  # CV SSIM gain needed to fine-tune
    loss: str = "ssim"
    seed: int = 0


def make_folds(dataset: Slices, k: int, seed: int = 0) -> list[list[int]]:
    """``k`` disjoint index lists covering ``dataset``, grouped by ``meta['file']`` if possible."""
    if len(dataset) < k:
        raise ValueError(f"{k}-fold cross-validation needs at least {k} slices, got {len(dataset)}")
    rng = np.random.default_rng(seed)
    files = [str(dataset[i].meta.get("file", i)) for i in range(len(dataset))]
    groups = sorted(set(files))
    folds: list[list[int]] = [[] for _ in range(k)]
    if len(groups) >= k:
        order = rng.permutation(len(groups))
        fold_of = {groups[g]: j % k for j, g in enumerate(order)}
        for i, f in enumerate(files):
            folds[fold_of[f]].append(i)
    else:
        for j, i in enumerate(rng.permutation(len(dataset))):
            folds[j % k].append(int(i))
    return folds


def _ssim(model: Unrolled, data: Slices, device: str) -> float:
    return evaluate(model, data, device).ssim


def _fine_tune_curve(
    global_model: Unrolled,
    train_set: Slices,
    val_set: Slices,
    lr: float,
    cfg: PersonalizeConfig,
    device: str,
) -> list[float]:
    """Validation SSIM after epochs 0..max_epochs (early-stopped; the tail repeats the last)."""
    model = copy.deepcopy(global_model)
    curve = [_ssim(model, val_set, device)]
    steps_per_epoch = len(train_set)
    best, since_best = curve[0], 0

    def after_step(step: int) -> bool:
        nonlocal best, since_best
        if step % steps_per_epoch:
            return False
        curve.append(_ssim(model, val_set, device))
        if curve[-1] > best:
            best, since_best = curve[-1], 0
        else:
            since_best += 1
        return since_best >= cfg.patience

    tcfg = TrainConfig(lr=lr, epochs=cfg.max_epochs, loss=cfg.loss, seed=cfg.seed)
    train(model, train_set, tcfg, device, TrainHooks(after_step=after_step), progress=False)
    curve += [curve[-1]] * (cfg.max_epochs + 1 - len(curve))
    return curve


def personalize(
    global_model: Unrolled,
    train_set: Slices,
    cfg: PersonalizeConfig | None = None,
    device: str = "cpu",
    test_set: Slices | None = None,
    progress: bool | None = None,
) -> tuple[Unrolled, dict[str, Any]]:
    """Choose (r_fine, N_fine) by k-fold CV, then fine-tune on all of ``train_set``.

    Returns the personalized model (the global model itself when fine-tuning does not help) and a
    JSON-ready report: grid, per-fold curves, mean curves, choice, decision, and test metrics
    before and after when ``test_set`` is given. ``global_model`` is never modified.
    """
    cfg = cfg or PersonalizeConfig()
    t0 = time.perf_counter()
    folds = make_folds(train_set, cfg.folds, cfg.seed)
    all_idx = set(range(len(train_set)))
    source = cast("Dataset[Sample]", train_set)  # torch types a Subset's source as a Dataset
    curves: dict[str, list[list[float]]] = {}
    total = len(cfg.lrs) * cfg.folds
    with tqdm(total=total, desc="personalize CV", disable=progress is False, leave=False) as bar:
        for lr in cfg.lrs:
            curves[repr(lr)] = []
            for held_out in folds:
                fit = Subset(source, sorted(all_idx - set(held_out)))
                val = Subset(source, held_out)
                curves[repr(lr)].append(_fine_tune_curve(global_model, fit, val, lr, cfg, device))
                bar.update(1)
    mean_curves = {lr: np.mean(c, axis=0).tolist() for lr, c in curves.items()}
    baseline = float(np.mean([c[0] for cs in curves.values() for c in cs]))
    best_lr: str | None = None
    best_epoch, best_score = 0, -math.inf
    for key, curve in mean_curves.items():
        e = int(np.argmax(curve))
        if curve[e] > best_score:
            best_lr, best_epoch, best_score = key, e, float(curve[e])
    helps = best_epoch > 0 and best_score > baseline + cfg.min_gain
    report: dict[str, Any] = {
        "grid": {"lrs": list(cfg.lrs), "max_epochs": cfg.max_epochs, "folds": cfg.folds},
        "cv_curves": curves,
        "cv_mean_curves": mean_curves,
        "cv_ssim_global": baseline,
        "cv_ssim_best": best_score,
        "fine_tune": helps,
    }
    if helps:
        assert best_lr is not None
        r_fine = float(best_lr)
        model = copy.deepcopy(global_model)
        tcfg = TrainConfig(lr=r_fine, epochs=best_epoch, loss=cfg.loss, seed=cfg.seed)
        train(model, train_set, tcfg, device, progress=progress)
        report.update(r_fine=r_fine, n_fine=best_epoch)
        report["decision"] = (
            f"fine-tuned with r_fine={r_fine:g} for N_fine={best_epoch} epochs "
            f"(CV SSIM {baseline:.4f} -> {best_score:.4f})"
        )
    else:
        model = global_model
        report.update(r_fine=None, n_fine=0)
        report["decision"] = (
            f"kept the global model: cross-validation found no gain from fine-tuning "
            f"(CV SSIM {baseline:.4f}, best fine-tuned {best_score:.4f})"
        )
    if test_set is not None:
        report["before"] = _metrics(global_model, test_set, device)
        report["after"] = _metrics(model, test_set, device)
    report["seconds"] = time.perf_counter() - t0
    return model, report


def _metrics(model: Unrolled, data: Slices, device: str) -> dict[str, float]:
    return evaluate(model, data, device).as_dict()

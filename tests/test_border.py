"""The top and bottom rows of knee slices, where the leg runs through the field of view.

Coronal knee slices are cut by the FOV along the readout. Coil maps from ESPIRiT are periodic
over the FOV, so a coil whose sensitivity differs between the top and the bottom row cannot be
represented there, and the model's output ``RSS(S x)`` misses what the maps miss. The first
synthetic knee coil put loops in the image plane at the top and bottom edges of the FOV, which
made the border rows the brightest and the worst explained: the federated model's largest
errors sat there, worse than zero-filled. The coil model now puts the loops on a cylinder around
the leg (:func:`recon.data.synth.coil_maps`), as a knee coil is built.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from recon.data import SiteDataset
from recon.data.sample import collate
from recon.data.synth import generate_sites, get_preset, synth_volume
from recon.models import build_model
from recon.physics.coils import espirit_maps, np_ifft2c
from recon.physics.masks import default_calibration_width
from recon.train import TrainConfig, train
from recon.train.trainer import zero_filled

BAND = 4  # border rows at the top and at the bottom


def _bands(h: int) -> tuple[np.ndarray, np.ndarray]:
    """Row masks: the ``BAND`` rows at either edge, and the central half of the rows."""
    border = np.zeros(h, bool)
    border[:BAND] = border[-BAND:] = True
    interior = np.zeros(h, bool)
    interior[h // 4 : 3 * h // 4] = True
    return border, interior


@pytest.mark.parametrize("name", ["knee_pd_15t", "knee_pdfs_3t"])
def test_coil_maps_explain_the_border_rows(name: str) -> None:
    """Coil-image energy outside the span of the ESPIRiT maps (noise-free data): per border row
    no more than per interior row."""
    p = replace(get_preset(name), noise=1e-7, gain=1.0)
    kspace, _, _ = synth_volume(p, 2, np.random.default_rng(3))
    border, interior = _bands(kspace.shape[-2])
    for k in kspace:
        img = np_ifft2c(k)  # [C, H, W]
        maps = espirit_maps(k, calib_width=default_calibration_width(k.shape))
        missed = np.abs(img - maps * np.sum(maps.conj() * img, axis=0)) ** 2
        per_row = missed.sum(axis=(0, 2))  # [H]
        assert per_row[border].mean() <= per_row[interior].mean(), (name, per_row)


@pytest.fixture(scope="module")
def knee_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 10x less noise than the preset: the RSS noise floor of the reference (which zero-filled
    # keeps and RSS(S x) does not) would otherwise dominate the dim border rows.
    preset = replace(get_preset("knee_pdfs_3t"), noise=0.002, size=1.0)
    root = tmp_path_factory.mktemp("knee")
    generate_sites(root, n_sites=1, n_slices=24, seed=0, presets=[preset])
    return root / "site0"


def test_trained_model_has_no_border_artifact(knee_site: Path) -> None:
    """A small MoDL trained on a knee site: its error in the border rows is no larger than in
    the interior rows, and no larger than zero-filled's there (10% tolerance)."""
    torch.manual_seed(0)
    model = build_model(num_unrolls=3, cg_iters=3, unet_chans=8, unet_pools=2)
    train(model, SiteDataset(knee_site, "train"), TrainConfig(steps=150, lr=2e-3), progress=False)
    model.eval()
    test_set = SiteDataset(knee_site, "test")
    ours, zf = [], []
    with torch.no_grad():
        for i in range(len(test_set)):
            sample = collate([test_set[i]])
            physics = sample.physics()
            image = physics.rss(model(sample.kspace, physics))
            ours.append(((image - sample.target) ** 2)[0].numpy())
            zf.append(((zero_filled(sample) - sample.target) ** 2)[0].numpy())
    err, err_zf = np.mean(ours, axis=0), np.mean(zf, axis=0)  # [H, W]
    border, interior = _bands(err.shape[0])
    print(
        f"MSE border {err[border].mean():.5f} (zero-filled {err_zf[border].mean():.5f}), "
        f"interior {err[interior].mean():.5f} (zero-filled {err_zf[interior].mean():.5f})"
    )
    assert err[interior].mean() < err_zf[interior].mean()  # it learned
    assert err[border].mean() <= err[interior].mean()
    assert err[border].mean() <= 1.1 * err_zf[border].mean()

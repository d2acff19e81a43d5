"""Learning smoke tests: a small MoDL trained briefly on synthetic data beats zero-filled.

These run the real pipeline (synthetic fastMRI-layout h5 -> ESPIRiT maps -> seeded masks ->
MoDL with CG -> SSIM loss) on tiny sites, so a regression anywhere in it shows up as a model
that stops learning.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recon.data import SiteDataset, generate_sites
from recon.models import build_model
from recon.train import TrainConfig, evaluate, train

# Observed on 2 CPU cores: +2.1 dB PSNR after 200 steps (20.30 vs 18.22 dB) on the brain T1 site
# (textured tissues, 8 coils); the test demands 1.5 dB.
PSNR_MARGIN_DB = 1.5
HETEROGENEITY_DB = 0.6  # own-site model over the other site's model, at each site


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_sites(root, n_sites=2, n_slices=30, seed=0, matrix=32)
    return root


@pytest.fixture(scope="module")
def site0_model(sites: Path):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_model(num_unrolls=3, cg_iters=3, unet_chans=8, unet_pools=2)
    train_set = SiteDataset(sites / "site0", split="train")
    result = train(model, train_set, TrainConfig(steps=200, lr=2e-3, seed=0), progress=False)
    return model, result


def test_modl_beats_zero_filled_on_held_out_slices(sites: Path, site0_model) -> None:  # type: ignore[no-untyped-def]
    model, result = site0_model
    test_set = SiteDataset(sites / "site0", split="test")
    assert result.final_loss < result.losses[0]
    ours, zf = evaluate(model, test_set), evaluate(None, test_set)
    print(f"held-out PSNR: model {ours['psnr']:.2f} dB vs zero-filled {zf['psnr']:.2f} dB")
    assert ours["psnr"] > zf["psnr"] + PSNR_MARGIN_DB  # type: ignore[operator]
    assert ours["ssim"] > zf["ssim"]  # type: ignore[operator]


def test_sites_are_heterogeneous_enough_to_matter(sites: Path, site0_model) -> None:  # type: ignore[no-untyped-def]
    """A model trained at one synthetic site does clearly worse at another than that site's own
    model, both ways (brain <-> knee): what makes federation across such sites non-trivial.

    Gains over zero-filled are compared at the same test site (the two sites' zero-filled
    baselines differ, so a gain at one site says nothing about the other)."""
    model0, _ = site0_model
    torch.manual_seed(0)
    model1 = build_model(num_unrolls=3, cg_iters=3, unet_chans=8, unet_pools=2)
    train(
        model1,
        SiteDataset(sites / "site1", split="train"),
        TrainConfig(steps=200, lr=2e-3, seed=0),
        progress=False,
    )
    psnr = {}
    for name in ("site0", "site1"):
        test_set = SiteDataset(sites / name, split="test")
        psnr[name] = {
            m: evaluate(model, test_set)["psnr"]
            for m, model in (("site0", model0), ("site1", model1))
        }
    print(f"test PSNR by test site, then training site: {psnr}")
    # Observed on 2 CPU cores: +0.93 dB at site0, +1.18 dB at site1 for the own site's model.
    assert psnr["site0"]["site0"] > psnr["site0"]["site1"] + HETEROGENEITY_DB  # type: ignore[operator]
    assert psnr["site1"]["site1"] > psnr["site1"]["site0"] + HETEROGENEITY_DB  # type: ignore[operator]


def test_training_is_reproducible_with_a_seed(sites: Path) -> None:
    ds = SiteDataset(sites / "site1", split="train")
    states = []
    for _ in range(2):
        model = build_model(num_unrolls=2, cg_iters=2, unet_chans=4, unet_pools=1)
        torch.manual_seed(123)  # the init is seeded by the caller; the loop by cfg.seed
        model = build_model(num_unrolls=2, cg_iters=2, unet_chans=4, unet_pools=1)
        train(model, ds, TrainConfig(steps=5, seed=7), progress=False)
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key])


def test_pgd_resnet_learns(sites: Path) -> None:
    ds = SiteDataset(sites / "site0", split="train")
    model = build_model(arch="pgd", denoiser="resnet", num_unrolls=3, resnet_features=16)
    before = evaluate(model, ds)
    train(model, ds, TrainConfig(steps=80, lr=1e-3), progress=False)
    after = evaluate(model, ds)
    assert after["psnr"] > before["psnr"]  # type: ignore[operator]

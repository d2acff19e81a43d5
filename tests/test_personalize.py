"""Personalization: k-fold CV picks (r_fine, N_fine); an unseen shifted site improves; a
well-represented site is not made worse."""

from __future__ import annotations

import pytest
import torch

from recon.data import SiteDataset, generate_sites
from recon.models import build_model
from recon.train import TrainConfig, evaluate, train
from recon.train.personalize import PersonalizeConfig, make_folds, personalize


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("synth")
    generate_sites(root, n_sites=2, n_slices=30, seed=3, matrix=32)  # site0 brain, site1 knee
    torch.manual_seed(0)
    model = build_model(num_unrolls=2, cg_iters=3, unet_chans=8, unet_pools=2)
    train(
        model, SiteDataset(root / "site0", "train"), TrainConfig(steps=150, lr=2e-3), progress=False
    )
    return root, model


def test_folds_are_disjoint_cover_and_group_by_file(trained) -> None:  # type: ignore[no-untyped-def]
    root, _ = trained
    ds = SiteDataset(root / "site0", "train")
    folds = make_folds(ds, 3, seed=0)
    flat = sorted(i for f in folds for i in f)
    assert flat == list(range(len(ds)))
    for f in folds:  # no volume on both sides of a split
        files = {ds[i].meta["file"] for i in f}
        others = {ds[i].meta["file"] for g in folds if g is not f for i in g}
        assert not files & others
    with pytest.raises(ValueError, match="at least"):
        make_folds(ds, len(ds) + 1)


def test_unseen_shifted_site_improves(trained) -> None:  # type: ignore[no-untyped-def]
    root, global_model = trained
    site = root / "site1"  # knee data, never seen by the brain-trained model
    before_state = {k: v.clone() for k, v in global_model.state_dict().items()}
    cfg = PersonalizeConfig(lrs=(1e-3,), max_epochs=4, folds=3, patience=2)
    model, report = personalize(
        global_model,
        SiteDataset(site, "train"),
        cfg,
        test_set=SiteDataset(site, "test"),
        progress=False,
    )
    print(report["decision"], report["before"], report["after"])
    assert report["fine_tune"] and report["n_fine"] >= 1 and report["r_fine"] == 1e-3
    assert report["after"]["ssim"] > report["before"]["ssim"]
    assert report["after"]["psnr"] > report["before"]["psnr"]
    assert len(report["cv_curves"]["0.001"]) == 3  # one validation curve per fold
    for k, v in global_model.state_dict().items():  # the global model is untouched
        torch.testing.assert_close(v, before_state[k])


def test_well_represented_site_not_made_worse(trained) -> None:  # type: ignore[no-untyped-def]
    root, global_model = trained
    site = root / "site0"
    test_set = SiteDataset(site, "test")
    cfg = PersonalizeConfig(lrs=(1e-4, 1e-3), max_epochs=3, folds=3, patience=2)
    model, report = personalize(global_model, SiteDataset(site, "train"), cfg, progress=False)
    after, before = evaluate(model, test_set), evaluate(global_model, test_set)
    assert after["ssim"] >= before["ssim"] - 0.01  # type: ignore[operator]
    if not report["fine_tune"]:
        assert model is global_model and "kept the global model" in report["decision"]


def test_guard_keeps_global_model_when_cv_sees_no_gain(trained) -> None:  # type: ignore[no-untyped-def]
    root, global_model = trained
    cfg = PersonalizeConfig(lrs=(1e-3,), max_epochs=1, folds=2, patience=1, min_gain=1.0)
    model, report = personalize(
        global_model, SiteDataset(root / "site1", "train"), cfg, progress=False
    )
    assert model is global_model and not report["fine_tune"] and report["n_fine"] == 0

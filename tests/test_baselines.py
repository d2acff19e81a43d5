"""Baselines on a tiny synthetic federation: deterministic, and learning beats zero-filling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from recon.data.synth import generate_sites
from recon.models import ModelConfig
from recon.train import TrainConfig
from recon.train.baselines import (
    SiteSlices,
    centralized,
    initial_model,
    local_only,
    run_baselines,
    site_map,
    zero_filled_metrics,
)

MODEL = ModelConfig(num_unrolls=2, cg_iters=2, unet_chans=16, unet_pools=2)
TRAIN = TrainConfig(lr=1e-3, seed=0)
STEPS = 30  # per site; the pooled model takes 2 x 30
DATA = {"rotate": None}  # as the sites load their slices (client.site)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("sites")
    generate_sites(root, n_sites=2, n_slices=20, seed=2, matrix=32, overrides={"num_coils": 2})
    return [root / "site0", root / "site1"]


@pytest.fixture(scope="module")
def all_baselines(sites: list[Path]) -> dict[str, dict[str, dict[str, float]]]:
    return run_baselines(sites, MODEL, TRAIN, STEPS, data_kwargs=DATA, progress=False)


def test_shapes_and_keys(all_baselines: dict, sites: list[Path]) -> None:
    assert list(all_baselines) == ["zero_filled", "local_only", "centralized"]
    for per_site in all_baselines.values():
        assert list(per_site) == ["site0", "site1"]
        for m in per_site.values():
            assert set(m) == {"ssim", "nrmse", "psnr"}
            assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())


def test_deterministic(all_baselines: dict, sites: list[Path]) -> None:
    assert (
        local_only(sites, MODEL, TRAIN, STEPS, data_kwargs=DATA, progress=False)
        == all_baselines["local_only"]
    )
    assert zero_filled_metrics(sites, data_kwargs=DATA) == all_baselines["zero_filled"]


def test_centralized_deterministic(all_baselines: dict, sites: list[Path]) -> None:
    # exact step count (half the default) to keep the test short; the default must still match
    short = centralized(sites, MODEL, TRAIN, STEPS, data_kwargs=DATA, steps=STEPS, progress=False)
    assert short == centralized(
        sites, MODEL, TRAIN, STEPS, data_kwargs=DATA, steps=STEPS, progress=False
    )
    assert short != all_baselines["centralized"]


def test_learning_beats_zero_filled(all_baselines: dict) -> None:
    zf = all_baselines["zero_filled"]
    for method in ("local_only", "centralized"):
        for site, m in all_baselines[method].items():
            assert m["ssim"] > zf[site]["ssim"], (method, site, m, zf[site])
            assert m["nrmse"] < zf[site]["nrmse"], (method, site, m, zf[site])
            assert m["psnr"] > zf[site]["psnr"], (method, site, m, zf[site])


def test_same_init(sites: list[Path]) -> None:
    a, b = initial_model(MODEL, seed=3), initial_model(MODEL, seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    other = initial_model(MODEL, seed=4, init_state=a.state_dict())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in a.state_dict().items())


def test_site_ids_and_errors(sites: list[Path]) -> None:
    assert list(site_map({"a": sites[0], "b": sites[1]})) == ["a", "b"]
    with pytest.raises(ValueError, match="share the name"):
        site_map([sites[0], sites[0]])
    with pytest.raises(ValueError, match="no sites"):
        site_map([])
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baselines(sites, MODEL, TRAIN, 1, methods=("local_only", "oracle"))


def test_train_slice_cap(sites: list[Path]) -> None:
    data = SiteSlices(sites, DATA, max_train_slices=2)
    assert len(data.get("site0", "train")) == 2
    assert len(data.get("site0", "test")) == len(SiteSlices(sites, DATA).get("site0", "test")) > 2
    assert data.get("site0", "train") is data.get("site0", "train")  # loaded once


def test_simulate_baselines_use_the_federations_data_budget(
    sites: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data.max-train-slices`` (Levac et al. 2023's low-data regime) binds the local-only and the
    centralized baselines too, and they load slices with the sites' data settings."""
    from fedunroll import simulate
    from recon.config import parse_run_config
    from recon.train import baselines

    seen: dict[str, dict] = {}

    def spy(name):
        def record(*args, **kwargs):
            seen[name] = {"data_kwargs": args[5], **kwargs}
            return {}

        return record

    monkeypatch.setattr(baselines, "local_only", spy("local_only"))
    monkeypatch.setattr(baselines, "centralized", spy("centralized"))
    root = sites[0].parent
    flat = {
        "data.root": str(root),
        "data.num-sites": 2,
        "data.max-train-slices": 5,
        "data.acs-frac": 0.1,
        "run.device": "cpu",
        "run.local-only": False,
        "run.centralized": True,
    }
    simulate._local_only_site(flat, "site0", str(sites[0]), 3)
    cfg = parse_run_config(flat)
    data = {"rounds": [{"round": 1}], "sites": ["site0", "site1"]}
    simulate.run_baselines(cfg, data)
    for name in ("local_only", "centralized"):
        assert seen[name]["max_train_slices"] == 5, name
        assert seen[name]["data_kwargs"]["acs_frac"] == 0.1, name

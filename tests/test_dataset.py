"""SiteDataset and site preparation on small fake fastMRI-layout sites written to tmp_path."""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedunroll.data import register
from recon.data import (
    DataError,
    Sample,
    SiteDataset,
    acs_rss_max,
    cache_path,
    collate,
    prepare_site,
    split_files,
    write_volume,
)
from recon.physics.coils import np_fft2c, np_ifft2c, np_rss
from recon.physics.masks import acs_slice


def fake_kspace(slices: int = 3, coils: int = 2, h: int = 32, w: int = 32, seed: int = 0):
    """Soft-edged ellipses, smooth phase, smooth Gaussian coils, small noise, raw-scanner gain."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w) * w / h, indexing="ij")
    out = np.empty((slices, coils, h, w), np.complex64)
    for s in range(slices):
        a, b = rng.uniform(0.5, 0.7), rng.uniform(0.6, 0.8)
        r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
        img = (
            0.5 * (1 + np.tanh((1 - r) * 12)) * (1 + 0.5 * np.exp(-((x - 0.2) ** 2 + y**2) / 0.02))
        )
        img = img * np.exp(1j * (0.5 * x + rng.uniform(0, 6)))
        ang = 2 * np.pi * np.arange(coils) / coils + rng.uniform(0, 1)
        maps = np.stack(
            [np.exp(-((x - 1.3 * np.cos(t)) ** 2 + (y - 1.3 * np.sin(t)) ** 2) / 1.5) for t in ang]
        )
        k = np_fft2c(maps * img)
        k += 0.005 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
        out[s] = k * 3e-4  # raw scanner scale; normalisation must remove it
    return out


SPLIT_SEEDS = {"train": 10, "val": 20, "test": 30}


def make_site(root: Path, name: str = "siteA", layout: str = "splits", **kw) -> Path:
    site = root / name
    if layout == "splits":
        for split, n in (("train", 2), ("val", 1), ("test", 1)):
            for i in range(n):
                k = fake_kspace(seed=SPLIT_SEEDS[split] + i, **kw)
                write_volume(site / split / f"{name}_{split}{i}.h5", k)
    else:
        for i in range(6):
            write_volume(site / f"vol{i}.h5", fake_kspace(seed=i, **kw))
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site(tmp_path_factory.mktemp("data"))


def test_samples_types_shapes(site: Path) -> None:
    ds = SiteDataset(site, "train")
    assert len(ds) == 6 and ds.errors == [] and len(ds.files) == 2
    s = ds[0]
    assert isinstance(s, Sample)
    assert s.kspace.shape == (2, 32, 32) and s.kspace.dtype == torch.complex64
    assert s.maps.shape == (2, 32, 32) and s.maps.dtype == torch.complex64
    assert s.mask.shape == (32, 32) and s.mask.dtype == torch.float32
    assert s.target.shape == (32, 32) and s.target.dtype == torch.float32
    assert s.meta["file"] == "siteA/train/siteA_train0.h5"
    assert (s.meta["slice"], s.meta["site"]) == (0, "siteA")
    batch = collate([ds[0], ds[1]])
    assert batch.kspace.shape == (2, 2, 32, 32) and len(batch.meta["items"]) == 2


def test_normalisation_and_target(site: Path) -> None:
    """Levac et al. 2023, Sec. 3.1: max of the RSS from the ACS lines is 1; target is the full
    RSS."""
    ds = SiteDataset(site, "val", acs_frac=0.08)
    for s in ds:
        k = s.kspace.numpy()  # undersampled, but the ACS lines are all there
        assert acs_rss_max(k, 0.08) == pytest.approx(1.0, abs=1e-5)
        full = fake_kspace(seed=SPLIT_SEEDS["val"])[s.meta["slice"]] * s.meta["scale"]
        np.testing.assert_allclose(s.target.numpy(), np_rss(np_ifft2c(full)), rtol=1e-4, atol=1e-6)
        # kspace == mask * normalised full k-space
        np.testing.assert_allclose(k, full * s.mask.numpy(), rtol=1e-4, atol=1e-7)
        assert torch.all(s.mask[:, acs_slice(32, 0.08)] == 1)


def test_mask_is_fixed_per_slice_across_epochs_and_rounds(site: Path) -> None:
    ds = SiteDataset(site, "train", seed=5)
    loader = DataLoader(ds, batch_size=1, shuffle=True, collate_fn=collate)
    epochs = []
    for _ in range(2):
        epochs.append(
            {(b.meta["items"][0]["file"], b.meta["items"][0]["slice"]): b.mask[0] for b in loader}
        )
    assert epochs[0].keys() == epochs[1].keys()
    for key in epochs[0]:
        assert torch.equal(epochs[0][key], epochs[1][key])
    again = SiteDataset(site, "train", seed=5)  # a new round / a new process
    for s in again:
        assert torch.equal(s.mask, epochs[0][(s.meta["file"], s.meta["slice"])])
    masks = [s.mask for s in again]
    assert not torch.equal(masks[0], masks[1])  # different slices, different masks
    other = SiteDataset(site, "train", seed=6)
    assert not torch.equal(other[0].mask, masks[0])


def test_acceleration_and_mask_kinds(site: Path) -> None:
    for kind in ("random1d", "equispaced1d"):
        ds = SiteDataset(site, "test", mask_kind=kind, accel=4)
        for s in ds:
            assert s.mask.numel() / s.mask.sum().item() == pytest.approx(4, rel=0.1)
    with pytest.raises(ValueError, match="unknown mask kind"):
        SiteDataset(site, "test", mask_kind="spiral")


def test_maps_cached_and_reused(tmp_path: Path) -> None:
    site = make_site(tmp_path, "siteC")
    src = site / "train" / "siteC_train0.h5"
    cache = cache_path(src, site, "espirit")
    assert cache == site / ".cache" / "maps-espirit" / "train" / "siteC_train0.maps.h5"
    assert not cache.exists()
    ds = SiteDataset(site, "train")  # computes and caches on first use
    assert cache.exists()
    with h5py.File(cache) as f:
        assert f["maps"].shape == (3, 2, 32, 32)
    rep = prepare_site(site, progress=False)
    assert rep["files"] == 4 and rep["slices"] == 12 and rep["errors"] == []
    assert (rep["computed"], rep["reused"]) == (2, 2)  # val/test new, train from the cache
    rep = prepare_site(site, progress=False)
    assert (rep["computed"], rep["reused"]) == (0, 4)
    # a newer source invalidates its cache; --force recomputes everything
    later = time.time() + 5
    os.utime(src, (later, later))
    assert prepare_site(site, progress=False)["computed"] == 1
    assert prepare_site(site, force=True, progress=False)["computed"] == 4
    assert not list(site.rglob("*.tmp"))
    again = SiteDataset(site, "train")
    torch.testing.assert_close(again[0].maps, ds[0].maps)
    # other estimator, other cache
    rep = prepare_site(site, method="jsense", progress=False)
    assert rep["computed"] == 4 and "maps-jsense" in rep["cache_dir"]
    j = SiteDataset(site, "train", maps_method="jsense")
    assert j[0].maps.abs().min() > 0  # JSENSE maps are not cropped


@pytest.mark.slow  # two spawned workers import torch + sigpy (~3-10 s)
def test_parallel_prepare_matches_serial(tmp_path: Path) -> None:
    site = make_site(tmp_path, "siteP")
    prepare_site(site, progress=False)
    before = {p: h5py.File(p)["maps"][()] for p in sorted(site.rglob("*.maps.h5"))}
    rep = prepare_site(site, force=True, progress=False, workers=2)
    assert (rep["computed"], rep["files"], rep["errors"]) == (4, 4, [])
    for p, maps in before.items():
        np.testing.assert_array_equal(h5py.File(p)["maps"][()], maps)


def test_espirit_maps_explain_the_data(site: Path) -> None:
    """With the cached maps, SENSE-combined fully sampled data has the RSS magnitude inside."""
    ds = SiteDataset(site, "train", accel=1)
    s = ds[0]
    coil_imgs = np_ifft2c(s.kspace.numpy())
    maps = s.maps.numpy()
    combined = np.abs(np.sum(np.conj(maps) * coil_imgs, 0))
    inside = np_rss(maps) > 0.5
    rel = np.abs(combined - s.target.numpy())[inside].max() / s.target.numpy().max()
    assert inside.mean() > 0.3 and rel < 0.05
    assert s.image is not None and s.image.dtype == torch.complex64
    np.testing.assert_allclose(np.abs(s.image.numpy()), combined, rtol=1e-4, atol=1e-5)


def test_bad_files_are_skipped_and_named(tmp_path: Path) -> None:
    site = make_site(tmp_path, "siteB")
    bad = site / "train" / "siteB_bad.h5"
    k = fake_kspace()
    k[1, 0, 3, 3] = np.nan
    with h5py.File(bad, "w") as f:
        f.create_dataset("kspace", data=k)
    (site / "train" / "siteB_zero.h5").write_bytes(b"garbage")
    with pytest.warns(UserWarning) as caught:
        ds = SiteDataset(site, "train")
    assert any("siteB/train/siteB_bad.h5: field 'kspace'" in str(w.message) for w in caught)
    assert len(ds) == 6
    assert sorted(e.file for e in ds.errors) == [
        "siteB/train/siteB_bad.h5",
        "siteB/train/siteB_zero.h5",
    ]
    assert {e.field for e in ds.errors} == {"kspace", "file"}
    rep = prepare_site(site, progress=False)
    assert rep["files"] == 4 and len(rep["errors"]) == 2
    assert any(
        "siteB/train/siteB_bad.h5: field 'kspace': contains 1 NaN/Inf" in e for e in rep["errors"]
    )


def test_split_without_usable_files_is_a_data_error(tmp_path: Path) -> None:
    site = tmp_path / "siteD"
    (site / "train").mkdir(parents=True)
    (site / "train" / "x.h5").write_bytes(b"nope")
    (site / "val").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            DataError, match=r"siteD/train: field 'split': no usable slices \(.*x\.h5"
        ):
            SiteDataset(site, "train")
    with pytest.raises(DataError, match="field 'split'"):
        SiteDataset(site, "val")
    with pytest.raises(DataError, match="field 'site_dir'"):
        SiteDataset(tmp_path / "absent", "train")


def test_flat_site_is_split_deterministically(tmp_path: Path) -> None:
    site = make_site(tmp_path, "flat", layout="flat")
    parts = {s: SiteDataset(site, s).files for s in ("train", "val", "test")}
    names = {s: [p.name for p in f] for s, f in parts.items()}
    assert names == {
        "train": [f"vol{i}.h5" for i in range(4)],
        "val": ["vol4.h5"],
        "test": ["vol5.h5"],
    }
    files = [Path(f"f{i}.h5") for i in range(20)]
    chunks = [split_files(files[::-1], s) for s in ("train", "val", "test")]
    assert [len(c) for c in chunks] == [16, 2, 2]
    assert sorted(sum(chunks, [])) == sorted(files)


def test_max_slices(site: Path) -> None:
    ds = SiteDataset(site, "train", max_slices=4)
    assert len(ds) == 4 and [s.meta["slice"] for s in ds] == [0, 1, 2, 0]


def test_rotate_horizontal_readout(tmp_path: Path) -> None:
    """Transposed (horizontal-readout) data with rotate=True equals the original orientation."""
    k = fake_kspace(2, 2, 32, 24)
    write_volume(tmp_path / "v" / "train" / "a.h5", k)
    write_volume(
        tmp_path / "h" / "train" / "a.h5", np.swapaxes(k, -1, -2), attrs={"readout": "horizontal"}
    )
    ref = SiteDataset(tmp_path / "v", "train")
    rot = SiteDataset(tmp_path / "h", "train", rotate=True)
    auto = SiteDataset(tmp_path / "h", "train", rotate=None)  # from the file attribute
    plain = SiteDataset(tmp_path / "h", "train")
    for a, b, c in zip(ref, rot, auto):
        assert b.kspace.shape == (2, 32, 24)
        torch.testing.assert_close(a.target, b.target)
        torch.testing.assert_close(a.mask, b.mask)  # same file name and slice -> same mask
        torch.testing.assert_close(a.maps, b.maps, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.target, c.target)
    assert plain[0].kspace.shape == (2, 24, 32)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedunroll")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_prepare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site(tmp_path / "root", "siteE")
    assert run_cli("prepare", str(site), "--no-progress") == 0
    out = capsys.readouterr().out
    assert "4 files, 12 slices" in out and "4 computed" in out
    assert run_cli("prepare", str(tmp_path / "root"), "--no-progress") == 0  # a folder of sites
    assert "0 computed, 4 reused" in capsys.readouterr().out
    with h5py.File(site / "val" / "broken.h5", "w") as f:
        f.create_dataset("kspace", data=np.zeros((2, 8, 8), np.complex64))
    assert run_cli("prepare", str(site), "--no-progress") == 1
    err = capsys.readouterr().err
    assert "siteE/val/broken.h5: field 'kspace': expected 4 dims" in err
    assert run_cli("prepare", str(tmp_path / "missing"), "--no-progress") == 2
    assert "field 'site_dir'" in capsys.readouterr().err

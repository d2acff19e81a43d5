"""Synthetic multi-site generator: layout, determinism, heterogeneity, IID mode, CLI."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedunroll.data import register
from recon.data import SiteDataset, check_file, generate_sites, read_volume, scan_site, site_presets
from recon.data.synth import (
    SitePreset,
    coil_maps,
    get_preset,
    site_slices,
    synth_volume,
    tissue_signals,
)
from recon.physics.coils import np_ifft2c, np_rss


def all_kspace(site: Path) -> list[np.ndarray]:
    return [read_volume(p).kspace for p in sorted(site.rglob("*.h5"))]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_sites(root, n_sites=4, n_slices=12, seed=0, matrix=32)
    return root


def test_layout_and_site_json(sites: Path) -> None:
    for k in range(4):
        site = sites / f"site{k}"
        info = json.loads((site / "site.json").read_text())
        assert info["name"] == f"site{k}" and info["preset"]["matrix"] == [32, 32]
        assert info["requested_slices"] == 12
        assert sum(info["slices"].values()) == site_slices(SitePreset(**info["preset"]), 12)
        assert all(info["slices"][s] > 0 for s in ("train", "val", "test"))
        valid, errors = scan_site(site)
        assert errors == [] and len(valid) == sum(len(v) for v in info["files"].values())
        for rel in info["files"]["train"]:
            s, c, h, w = check_file(site / rel)
            assert (c, h, w) == (info["preset"]["num_coils"], 32, 32)
            with h5py.File(site / rel) as f:
                assert f["kspace"].dtype == np.complex64
                assert f.attrs["site"] == f"site{k}"
                assert f.attrs["acquisition"] == info["acquisition"]
                assert float(f.attrs["field_strength"]) == info["preset"]["field_strength"]
                assert "systemFieldStrength_T" in f["ismrmrd_header"][()].decode()
                rss = np_rss(np_ifft2c(f["kspace"][()]))
                np.testing.assert_allclose(f["reconstruction_rss"][()], rss, rtol=1e-4)


def test_deterministic_and_seeded(tmp_path: Path, sites: Path) -> None:
    generate_sites(tmp_path / "a", n_sites=2, n_slices=12, seed=0, matrix=32)
    generate_sites(tmp_path / "b", n_sites=2, n_slices=12, seed=1, matrix=32)
    for k in range(2):  # same seed -> identical bytes, also with more sites generated
        for x, y in zip(all_kspace(sites / f"site{k}"), all_kspace(tmp_path / "a" / f"site{k}")):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(
            all_kspace(sites / f"site{k}")[0], all_kspace(tmp_path / "b" / f"site{k}")[0]
        )


def test_slices_differ_within_a_site(sites: Path) -> None:
    ds = SiteDataset(sites / "site0", "train", maps_method="jsense", max_slices=4)
    targets = [s.target.numpy() for s in ds]
    for a, b in zip(targets, targets[1:]):
        assert np.abs(a - b).mean() > 0.01


def test_non_iid_sites_are_heterogeneous(sites: Path) -> None:
    infos = [json.loads((sites / f"site{k}" / "site.json").read_text()) for k in range(4)]
    presets = [i["preset"] for i in infos]
    assert len({p["num_coils"] for p in presets}) == 4
    assert {p["anatomy"] for p in presets} == {"brain", "knee"}
    assert len({(p["anatomy"], p["contrast"], p["field_strength"]) for p in presets}) == 4
    assert len({p["noise"] for p in presets}) == 4
    # intensity statistics (quantiles of the max-normalised RSS, background level) differ clearly
    stats = []
    for k in range(4):
        vol = read_volume(sorted((sites / f"site{k}" / "train").glob("*.h5"))[0])
        rss = np_rss(np_ifft2c(vol.kspace))
        rss = rss / rss.max(axis=(-2, -1), keepdims=True)
        quantiles = np.quantile(rss, [0.25, 0.5, 0.75, 0.9])
        stats.append(np.append(quantiles, np.median(rss[:, :3, :3])))
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(stats[i] - stats[j]).max() > 0.05, (i, j, stats)


def test_iid_mode_one_distribution(tmp_path: Path) -> None:
    infos = generate_sites(tmp_path, n_sites=3, n_slices=6, seed=0, matrix=32, iid=True)
    assert {i["preset"]["name"] for i in infos} == {"knee_pdfs_15t"}
    assert all(i["iid"] for i in infos)
    assert len({i["tissues"]["fat"] for i in infos}) == 1  # same scanner and protocol
    k0, k1 = all_kspace(tmp_path / "site0")[0], all_kspace(tmp_path / "site1")[0]
    assert k0.shape == k1.shape and not np.allclose(k0, k1)  # different subjects


def test_presets_cover_table_1() -> None:
    presets = site_presets()
    assert len(presets) == 12 and len({p.name for p in presets}) == 12
    combos = {(p.anatomy, p.contrast, p.field_strength) for p in presets}
    assert len(combos) == 12
    assert all(
        2 <= p.num_coils <= 8 and 48 <= min(p.matrix) <= max(p.matrix) <= 80 for p in presets
    )
    assert get_preset("knee_pdfs_15t").contrast == "PDFS"
    with pytest.raises(ValueError, match="unknown site preset"):
        get_preset("liver")


def test_overrides_and_horizontal_readout(tmp_path: Path) -> None:
    infos = generate_sites(
        tmp_path,
        n_sites=1,
        n_slices=3,
        matrix=(32, 24),
        overrides={"num_coils": 2, "readout": "horizontal"},
    )
    assert infos[0]["rotate"] is True
    vol = read_volume(next((tmp_path / "site0").rglob("*.h5")))
    assert vol.kspace.shape[1:] == (2, 24, 32)  # stored transposed
    ds = SiteDataset(tmp_path / "site0", "train", rotate=True, maps_method="jsense")
    assert ds[0].kspace.shape == (2, 32, 24)
    with pytest.raises(ValueError, match="unknown preset field 'coils'"):
        generate_sites(tmp_path / "x", n_sites=1, n_slices=3, overrides={"coils": 2})


def test_refuses_to_overwrite_foreign_data(tmp_path: Path) -> None:
    (tmp_path / "site0").mkdir()
    (tmp_path / "site0" / "precious.h5").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not made by synth"):
        generate_sites(tmp_path, n_sites=1, n_slices=3, matrix=32)
    generate_sites(tmp_path / "ok", n_sites=1, n_slices=6, matrix=32)
    generate_sites(tmp_path / "ok", n_sites=1, n_slices=3, matrix=32)  # regenerating is fine
    assert len(list((tmp_path / "ok" / "site0").rglob("*.h5"))) == 3


def test_noise_level_matches_preset() -> None:
    """Same seed with and without noise: the difference is the coil noise, std ~ ``noise``."""
    p = SitePreset("t", "brain", "T2", 3.0, 4, (48, 48), noise=0.02, gain=1.0)
    noisy, _, _ = synth_volume(p, 1, np.random.default_rng(0))
    clean, _, _ = synth_volume(replace(p, noise=1e-9), 1, np.random.default_rng(0))
    assert np.std(noisy - clean) == pytest.approx(0.02, rel=0.3)


def test_synth_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedunroll")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["synth", "--sites", "2", "--slices", "6", "--matrix", "32", str(tmp_path)]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "wrote 2 synthetic sites" in out and "site1" in out and "knee_pd_15t" in out
    assert (tmp_path / "site1" / "site.json").exists()
    args = parser.parse_args(["synth", "--sites", "0", str(tmp_path / "z")])
    assert args.func(args) == 2
    assert "--sites" in capsys.readouterr().err


def test_unequal_hospitals() -> None:
    """The default four sites: two large hospitals and two small ones (Levac et al. 2023: the
    low-data regime is where federation matters)."""
    sizes = [site_slices(p, 50) for p in site_presets()[:4]]
    assert sizes == [50, 50, 15, 15]
    assert site_slices(get_preset("knee_pdfs_3t"), 4) == 3  # every split keeps a volume


def test_contrast_from_signal_equations() -> None:
    """Tissue intensities follow from PD / T1 / T2 and each site's TR / TE / TI."""
    t1 = tissue_signals(get_preset("brain_t1_3t"))
    assert t1["wm"] > t1["gm"] > t1["csf"] and t1["fat"] == 1.0
    t2 = tissue_signals(get_preset("brain_t2_3t"))
    assert t2["csf"] > t2["gm"] > t2["wm"]
    flair = tissue_signals(get_preset("brain_flair_15t"))
    assert flair["csf"] < 0.15 * flair["lesion"] and flair["lesion"] > flair["gm"] > flair["wm"]
    post = tissue_signals(get_preset("brain_t1post_3t"))
    assert post["rim"] > max(post["wm"], post["lesion"])  # gadolinium shortens T1
    pd, pdfs = tissue_signals(get_preset("knee_pd_15t")), tissue_signals(get_preset("knee_pdfs_3t"))
    assert pd["fat"] > 0.8 and pdfs["fat"] < 0.15 and pdfs["marrow"] < 0.4  # fat suppressed
    assert pdfs["fluid"] == 1.0 and pdfs["edema"] > pdfs["cartilage"] > pdfs["meniscus"]
    # the same tissue at 3T has a longer T1: less T1 signal at the same TR
    at15 = tissue_signals(replace(get_preset("brain_t1_3t"), field_strength=1.5))
    assert at15["wm"] / at15["csf"] != pytest.approx(t1["wm"] / t1["csf"], rel=0.01)


def test_slices_are_textured() -> None:
    """No flat piecewise-constant regions: white matter varies inside itself."""
    p = replace(get_preset("brain_t1_3t"), noise=1e-9, bias=0.0, image_phase=0.0, gain=1.0)
    _, rss, _ = synth_volume(p, 1, np.random.default_rng(0))
    img = rss[0] / rss[0].max()
    core = img[24:40, 20:44]  # mostly white matter, some grey
    assert core.std() / core.mean() > 0.04


def test_coil_model() -> None:
    """Loops on a cylinder around the body part: the knee coil's sensitivity falls off along
    the leg (the rows); maps are seeded and differ between coils."""
    p = get_preset("knee_pd_15t")
    maps = coil_maps(p, (64, 48), np.random.default_rng(0))
    again = coil_maps(p, (64, 48), np.random.default_rng(0))
    np.testing.assert_array_equal(maps, again)
    rss = np_rss(maps)
    assert rss[:4].mean() < 0.5 * rss[28:36].mean() and rss[-4:].mean() < 0.5 * rss[28:36].mean()
    assert np.abs(maps[0] - maps[1]).mean() > 0.1 * np.abs(maps[0]).mean()
    phase = np.angle(maps[0, 28:36, 16:32] * maps[0, 28:36, 16:32].conj().mean())
    assert np.ptp(phase) > 0.05  # B1- carries a spatially varying phase


def test_noise_is_correlated_across_coils() -> None:
    """The noise covariance follows the coils' overlap: neighbouring coils correlate."""
    p = replace(get_preset("knee_pdfs_3t"), gain=1.0)
    noisy, _, _ = synth_volume(p, 1, np.random.default_rng(0))
    clean, _, _ = synth_volume(replace(p, noise=1e-9), 1, np.random.default_rng(0))
    n = (noisy - clean)[0].reshape(p.num_coils, -1)
    corr = np.abs(np.corrcoef(n))
    assert corr[~np.eye(p.num_coils, dtype=bool)].max() > 0.1


def test_readout_oversampling_and_large_matrix() -> None:
    """fastMRI-like 2x readout oversampling: k-space covers twice the FOV along H, the stored
    RSS is the FOV; a 320 x 320 fastMRI-size matrix works."""
    p = replace(get_preset("knee_pd_15t"), readout_os=2.0, matrix=(40, 48))
    kspace, rss, _ = synth_volume(p, 2, np.random.default_rng(0))
    assert kspace.shape == (2, p.num_coils, 80, 48) and rss.shape == (2, 40, 48)
    full = np_rss(np_ifft2c(kspace))
    np.testing.assert_allclose(full[:, 20:60], rss, rtol=1e-4)
    assert full[:, :6].mean() < 0.3 * full[:, 20:60].mean()  # the leg fades before the edges
    big = replace(get_preset("brain_t2_3t"), matrix=(320, 320))
    kspace, rss, _ = synth_volume(big, 1, np.random.default_rng(0))
    assert kspace.shape == (1, 8, 320, 320) and np.isfinite(rss).all()

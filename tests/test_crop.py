"""``crop``: the image-domain centre crop of the fully sampled data (fastMRI readout
oversampling), its map cache, its config keys and the one config -> SiteDataset mapping."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from client.site import Site, clear_cache, load_split
from fedunroll.cli import main
from fedunroll.report import data_kwargs_from_config
from recon.config import ConfigError, DataConfig, parse_run_config
from recon.data import (
    DataError,
    SiteDataset,
    cache_path,
    generate_sites,
    load_or_compute_maps,
    parse_crop,
    prepare_site,
    write_volume,
)
from recon.data.prepare import _params
from recon.physics.coils import np_crop_kspace

CROP = (32, 24)  # of the 48x48 synthetic matrix


def _site(root: Path) -> Path:
    generate_sites(
        root, n_sites=1, n_slices=6, matrix=48, slices_per_volume=2, overrides={"num_coils": 4}
    )
    return root / "site0"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _site(tmp_path_factory.mktemp("crop"))


def _rss_max_normalised(x: np.ndarray) -> np.ndarray:
    return x / x.max()


def test_crop_shapes_and_target_is_the_centre_of_the_full_rss(site: Path) -> None:
    ds = SiteDataset(site, "train", crop=CROP)
    assert len(ds) == 2 and ds.errors == []
    for s in ds:
        assert s.kspace.shape == (4, *CROP) and s.maps.shape == (4, *CROP)
        assert s.mask.shape == CROP and s.target.shape == CROP
        assert s.image is not None and s.image.shape == CROP
        # independent numpy: RSS of the file's full k-space, centre-cropped by hand
        with h5py.File(site / s.meta["file"].split("/", 1)[1]) as f:
            k = f["kspace"][s.meta["slice"]]
        imgs = np.fft.fftshift(
            np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
        )
        rss = np.sqrt((np.abs(imgs) ** 2).sum(0))[8:40, 12:36]
        np.testing.assert_allclose(
            _rss_max_normalised(s.target.numpy()), _rss_max_normalised(rss), atol=1e-4
        )
    # the same slices without crop: the full matrix
    assert SiteDataset(site, "train")[0].target.shape == (48, 48)


def test_crop_maps_cache_keeps_crops_apart(tmp_path: Path) -> None:
    site = _site(tmp_path)
    src = site / "train" / "site0_vol000.h5"
    # the params of a crop-free cache are those of caches written before crops existed
    assert _params("espirit", None, None) == '{"calib_width": null, "method": "espirit"}'
    shapes = []
    for crop in (CROP, None, None, CROP, CROP):
        maps, computed = load_or_compute_maps(src, None, site, crop=crop)
        shapes.append((maps.shape[-2:], computed))
    assert shapes == [
        (CROP, True),
        ((48, 48), True),
        ((48, 48), False),  # a crop-free cache is reused
        (CROP, True),
        (CROP, False),
    ]
    with h5py.File(cache_path(src, site)) as f:
        assert json.loads(f.attrs["params"])["matrix_crop"] == list(CROP)
    # cropped k-space given without saying which crop it is: refused, not mis-cached
    with pytest.raises(ValueError, match="not cropped"):
        load_or_compute_maps(src, np.zeros((2, 4, 48, 48), np.complex64), site, crop=CROP)


def test_too_large_crop_skips_the_file_naming_sizes(tmp_path: Path) -> None:
    site = _site(tmp_path)
    with h5py.File(site / "train" / "site0_vol000.h5") as f:
        small = np_crop_kspace(f["kspace"][()], (24, 24))
    write_volume(site / "train" / "small.h5", small)
    with pytest.warns(UserWarning, match="skipping bad file"):
        ds = SiteDataset(site, "train", crop=(30, 30))
    assert [p.name for p in ds.files] == ["site0_vol000.h5"] and len(ds) == 2
    (err,) = ds.errors
    assert (err.file, err.field) == ("site0/train/small.h5", "kspace")
    assert err.reason == "crop 30x30 larger than the 24x24 matrix"
    rep = prepare_site(site, progress=False, crop=(30, 30))
    assert rep["files"] == 3 and rep["errors"] == [str(err)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="crop 64x24 larger than the 48x48 matrix"):
            SiteDataset(site, "val", crop=(64, 24))


@pytest.mark.parametrize(
    ("text", "crop"),
    [
        ("320x320", (320, 320)),
        ("320,368", (320, 368)),
        (" 32 X 24 ", (32, 24)),
        ("", None),
        ("  ", None),
        (None, None),
        ([32, 24], (32, 24)),
        ((32, 24), (32, 24)),
    ],
)
def test_parse_crop(text: object, crop: tuple[int, int] | None) -> None:
    assert parse_crop(text) == crop


@pytest.mark.parametrize(
    "text", ["320", "320x", "axb", "0x10", "-1x5", "1x2x3", "32.0x24", [32], [1.5, 2], [True, 2], 3]
)
def test_parse_crop_rejects_naming_the_text(text: object) -> None:
    with pytest.raises(ValueError, match="bad crop") as err:
        parse_crop(text)
    assert repr(text) in str(err.value)


def test_crop_config_keys_and_the_one_mapping() -> None:
    cfg = parse_run_config({"data.crop": "320,368", "data.accel": 8.0, "data.acs-frac": 0.1})
    assert cfg.data.crop == "320x368" and cfg.flat()["data.crop"] == "320x368"
    kwargs = cfg.data.dataset_kwargs()
    assert kwargs["crop"] == (320, 368) and kwargs["rotate"] is None
    assert (kwargs["accel"], kwargs["acs_frac"]) == (8.0, 0.1)
    assert parse_run_config({}).data.dataset_kwargs()["crop"] is None
    # report figures (flat results.json config) and personalize (a checkpoint's run config)
    assert data_kwargs_from_config(cfg.flat()) == kwargs
    restored = parse_run_config(cfg.flat()).data  # e.g. a checkpoint's saved run config
    assert restored.dataset_kwargs(rotate=None) == kwargs
    with pytest.raises(ConfigError, match="run-config key 'data.crop': .*bad crop '320'"):
        parse_run_config({"data.crop": "320"})
    # the same data section for `fedunroll train` (one run config, one spelling)
    assert DataConfig(crop=[32, 24]).crop == "32x24"
    with pytest.raises(ValueError, match="data.crop': .*bad crop"):
        parse_run_config({"data.crop": "32y24"})


def test_prepare_command_crop_writes_cropped_maps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site(tmp_path)
    assert main(["prepare", str(site), "--crop", "32x24", "--no-progress"]) == 0
    assert "(32x24 crop)" in capsys.readouterr().out
    src = site / "train" / "site0_vol000.h5"
    with h5py.File(cache_path(src, site)) as f:
        assert f["maps"].shape == (2, 4, *CROP)
    # the dataset with the same crop reuses them
    assert load_or_compute_maps(src, None, site, crop=CROP)[1] is False
    assert main(["prepare", str(site), "--crop", "32", "--no-progress"]) == 2
    assert "--crop: bad crop '32'" in capsys.readouterr().err


def test_client_load_split_uses_the_run_config_crop(site: Path) -> None:
    clear_cache()
    try:
        node = Site("a", site, "cpu")
        cropped = load_split(node, parse_run_config({"data.crop": "32x24"}), "val")
        full = load_split(node, parse_run_config({}), "val")  # another process-cache entry
        assert cropped[0].kspace.shape == (4, *CROP) and cropped[0].target.shape == CROP
        assert full[0].kspace.shape == (4, 48, 48)
        assert load_split(node, parse_run_config({"data.crop": "32,24"}), "val") is cropped
    finally:
        clear_cache()


def test_recon_file_with_crop(site: Path) -> None:
    from recon.reconstruct import reconstruct_file

    src = site / "test" / "site0_vol002.h5"
    out = site.parent / "zf.h5"
    rep = reconstruct_file(src, "zero-filled", out=out, data=DataConfig(crop="32x24"))
    assert len(rep["slices"]) == 2
    with h5py.File(out) as f:
        assert f["reconstruction_zero-filled"].shape == (2, *CROP)
        assert f.attrs["crop"] == "32x24"

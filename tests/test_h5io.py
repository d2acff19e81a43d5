"""fastMRI-layout h5 I/O: round trip, and bad files named by file and field."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from recon.data import DataError, check_file, read_volume, scan_site, write_volume


def kspace(slices: int = 2, coils: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (slices, coils, h, w)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def raw_h5(path: Path, **datasets: np.ndarray) -> Path:
    """An h5 file with arbitrary (possibly wrong) content, bypassing write_volume's checks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, val in datasets.items():
            f.create_dataset(key, data=val)
    return path


def test_round_trip(tmp_path: Path) -> None:
    k = kspace()
    rss = np.abs(k).sum(1).astype(np.float32)
    attrs = {"acquisition": "CORPD_FBK", "site": "siteA", "field_strength": 1.5}
    path = write_volume(tmp_path / "a.h5", k, rss=rss, attrs=attrs, header="<xml/>")
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.kspace, k)
    np.testing.assert_array_equal(vol.rss, rss)
    assert vol.attrs == attrs and vol.header == "<xml/>" and vol.num_slices == 2
    assert check_file(path) == (2, 3, 32, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5"]  # no temporary left behind
    assert read_volume(path, slices=slice(1, 2)).kspace.shape == (1, 3, 32, 32)


def test_optional_fields_absent(tmp_path: Path) -> None:
    vol = read_volume(raw_h5(tmp_path / "b.h5", kspace=kspace(1, 2)))
    assert vol.rss is None and vol.header is None and vol.attrs == {}


def test_write_rejects_bad_kspace(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="complex"):
        write_volume(tmp_path / "c.h5", np.ones((1, 2, 8, 8)))


BAD = {
    "missing_key.h5": (
        dict(reconstruction_rss=np.ones((2, 8, 8), np.float32)),
        "kspace",
        "missing",
    ),
    "wrong_rank.h5": (dict(kspace=kspace()[0]), "kspace", "expected 4 dims"),
    "real_valued.h5": (dict(kspace=np.ones((1, 2, 8, 8), np.float32)), "kspace", "complex"),
    "zero_coils.h5": (dict(kspace=np.zeros((2, 0, 8, 8), np.complex64)), "kspace", "zero coils"),
    "zero_slices.h5": (dict(kspace=np.zeros((0, 2, 8, 8), np.complex64)), "kspace", "zero slices"),
    "bad_rss.h5": (
        dict(kspace=kspace(2, 2, 8, 8), reconstruction_rss=np.ones((2, 8), np.float32)),
        "reconstruction_rss",
        "expected 3 dims",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_name_file_and_field(tmp_path: Path, name: str) -> None:
    datasets, field, reason = BAD[name]
    path = raw_h5(tmp_path / "site3" / name, **datasets)
    with pytest.raises(DataError) as info:
        check_file(path, name=f"site3/{name}")
    err = info.value
    assert err.field == field and err.file == f"site3/{name}"
    assert str(err).startswith(f"site3/{name}: field '{field}': ")
    assert reason in str(err)
    with pytest.raises(DataError, match=name):
        read_volume(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_kspace(tmp_path: Path, bad: float) -> None:
    k = kspace(3, 2, 16, 16)
    k[2, 1, 5, 5] = bad
    path = raw_h5(tmp_path / "nan.h5", kspace=k)
    for fn in (check_file, read_volume):
        with pytest.raises(DataError, match=r"nan\.h5: field 'kspace': contains 1 NaN/Inf"):
            fn(path)


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(DataError, match=r"junk\.h5: field 'file': not a readable HDF5"):
        check_file(junk)
    good = write_volume(tmp_path / "trunc.h5", kspace(4, 4, 32, 32))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated copy
    with pytest.raises(DataError, match=r"trunc\.h5: field '(file|kspace)'"):
        check_file(good)
    with pytest.raises(DataError, match=r"nope\.h5: field 'file': does not exist"):
        read_volume(tmp_path / "nope.h5")


def test_scan_site_keeps_good_files(tmp_path: Path) -> None:
    site = tmp_path / "site3"
    good = [write_volume(site / "train" / f"good{i}.h5", kspace(seed=i)) for i in range(2)]
    good.append(write_volume(site / "test" / "good9.h5", kspace()))
    for name, (datasets, _, _) in BAD.items():
        raw_h5(site / "train" / name, **datasets)
    (site / "val").mkdir()
    (site / "val" / "corrupt.h5").write_bytes(b"\x00" * 100)
    valid, errors = scan_site(site)
    assert sorted(valid) == sorted(good)
    assert len(errors) == len(BAD) + 1
    shown = {e.file for e in errors}
    assert shown == {f"site3/train/{n}" for n in BAD} | {"site3/val/corrupt.h5"}
    for e in errors:
        assert str(e).startswith(f"{e.file}: field '{e.field}': ")
    for p in valid:
        read_volume(p)  # still usable


def test_scan_missing_site(tmp_path: Path) -> None:
    valid, errors = scan_site(tmp_path / "nowhere")
    assert valid == [] and errors[0].field == "site_dir"


def test_data_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(DataError("a.h5", "kspace", "bad")))
    assert (err.file, err.field, err.reason, str(err)) == (
        "a.h5",
        "kspace",
        "bad",
        "a.h5: field 'kspace': bad",
    )

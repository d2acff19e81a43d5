"""Input checks before any work: each slip a real site makes, on a small file written here.

Non-centred k-space, coil-last layout, undersampled data presented as fully sampled, complex
data stored as real/imag pairs (accepted), MATLAB v7.3 files, non-finite coil maps (never
cached), acceleration above the coil count; messages name file, field and what to do, and carry
no folder out of a site; every data command turns expected errors into one line.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedunroll.cli import main
from fedunroll.errors import guard
from recon.data.checks import (
    CHECK_NAMES,
    DataWarning,
    check_kspace,
    describe,
    redact_paths,
    sampling,
)
from recon.data.h5io import DataError, check_file, read_volume, write_volume
from recon.data.prepare import cache_path, load_or_compute_maps, prepare_site
from recon.physics.coils import np_fft2c


def phantom_kspace(slices: int = 2, coils: int = 4, n: int = 32, seed: int = 0) -> np.ndarray:
    """Centred, fully sampled k-space of a soft ellipse seen by smooth coils ``[S, C, n, n]``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    out = np.empty((slices, coils, n, n), np.complex64)
    for s in range(slices):
        r = np.sqrt((x / rng.uniform(0.55, 0.7)) ** 2 + (y / rng.uniform(0.6, 0.8)) ** 2)
        img = 0.5 * (1 + np.tanh((1 - r) * 10)) * np.exp(0.5j * x)
        ang = 2 * np.pi * np.arange(coils) / coils
        maps = np.stack(
            [np.exp(-((x - 1.3 * np.cos(a)) ** 2 + (y - 1.3 * np.sin(a)) ** 2) / 1.5) for a in ang]
        )
        k = np_fft2c(maps * img)
        k += 0.002 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
        out[s] = k
    return out


def raw_h5(path: Path, attrs: dict[str, object] | None = None, **datasets: np.ndarray) -> Path:
    """An h5 file with arbitrary content (write_volume would refuse some of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, val in datasets.items():
            f.create_dataset(key, data=val)
        for key, val in (attrs or {}).items():
            f[next(iter(datasets))].attrs[key] = val
    return path


def undersample(k: np.ndarray, keep: int, seed: int = 0) -> np.ndarray:
    """Keep ``keep`` phase-encode lines (W axis): 2 central ones plus random others."""
    w = k.shape[-1]
    rng = np.random.default_rng(seed)
    centre = [w // 2 - 1, w // 2]
    others = rng.choice([i for i in range(w) if i not in centre], keep - 2, replace=False)
    mask = np.zeros(w, bool)
    mask[centre + list(others)] = True
    return (k * mask).astype(np.complex64)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- a good file -----------------------------------------------------------------------------


def test_good_file_passes_every_check(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "good.h5", phantom_kspace())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vol = read_volume(path, accel=4)
    assert vol.checks == ["layout", "finite", "centred", "sampling", "accel"]
    assert vol.findings == []
    info = sampling(vol.kspace)
    assert info is not None and not info.undersampled and info.filled == 1.0


def test_noise_is_not_called_uncentred() -> None:
    """Random numbers have no energy peak: the centring check says nothing (the existing h5 tests
    write such k-space)."""
    rng = np.random.default_rng(1)
    k = (rng.standard_normal((2, 3, 32, 32)) + 1j * rng.standard_normal((2, 3, 32, 32))).astype(
        np.complex64
    )
    assert check_kspace(k, "noise.h5").findings == []


# --- k-space not centred ---------------------------------------------------------------------


def test_uncentred_kspace_is_refused_with_fftshift_hint(tmp_path: Path) -> None:
    k = np.fft.ifftshift(phantom_kspace(), axes=(-2, -1))  # a forgotten fftshift
    path = write_volume(tmp_path / "site0" / "train" / "shifted.h5", k)
    with pytest.raises(DataError) as info:
        read_volume(path, name="site0/train/shifted.h5")
    err = info.value
    assert (err.file, err.field) == ("site0/train/shifted.h5", "kspace")
    assert "not centred" in err.reason and "H (peak at 0 of 32, centre 16)" in err.reason
    assert "numpy.fft.fftshift(kspace, axes=(-2, -1))" in err.reason
    assert "fedunroll convert IN OUT.h5 --fftshift" in err.reason


def test_one_uncentred_axis_is_named() -> None:
    k = np.fft.ifftshift(phantom_kspace(), axes=-1)  # only W
    with pytest.raises(DataError, match=r"along W \(peak at 0 of 32, centre 16\).*axes=-1\)"):
        check_kspace(k, "w.h5")


def test_prepare_fails_an_uncentred_file_and_caches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site0"
    write_volume(site / "train" / "good.h5", phantom_kspace())
    bad = write_volume(site / "train" / "shifted.h5", np.fft.ifftshift(phantom_kspace(seed=1)))
    rc, out, err = run_cli(["prepare", str(site), "--no-progress"], capsys)
    assert rc == 1
    assert "1 files" in out and "1 computed" in out
    lines = [line for line in err.splitlines() if "shifted.h5" in line]
    assert len(lines) == 1 and "k-space is not centred" in lines[0] and "fftshift" in lines[0]
    assert not cache_path(bad, site).exists()


# --- non-finite coil maps --------------------------------------------------------------------


def test_nan_maps_name_file_slice_and_cause_and_are_never_cached(tmp_path: Path) -> None:
    """ESPIRiT on uncentred k-space gives all-NaN maps; reaching the estimator directly (with the
    k-space given, past the reader's check) must still fail and write no cache."""
    site = tmp_path / "site0"
    k = phantom_kspace(slices=3)
    src = write_volume(site / "train" / "a.h5", k)
    shifted = k.copy()
    shifted[2] = np.fft.ifftshift(k[2], axes=(-2, -1))
    with pytest.raises(DataError) as info:
        load_or_compute_maps(src, shifted, site)
    err = info.value
    assert (err.file, err.field) == ("site0/train/a.h5", "kspace")
    assert err.reason.startswith("ESPIRiT maps are NaN at slice 2")
    assert "not cached" in err.reason and "k-space not centred?" in err.reason
    assert not cache_path(src, site).exists()
    assert not list(site.rglob("*.tmp"))


def test_cached_nan_maps_are_recomputed(tmp_path: Path) -> None:
    """A cache written with NaN maps (by an older version) is never reused."""
    site = tmp_path / "site0"
    k = phantom_kspace(slices=1)
    src = write_volume(site / "train" / "a.h5", k)
    maps, fresh = load_or_compute_maps(src, None, site)
    assert fresh and np.isfinite(maps).all()
    with h5py.File(cache_path(src, site), "r+") as f:
        f["maps"][0, 0, 0, 0] = np.nan
    maps, fresh = load_or_compute_maps(src, None, site)
    assert fresh and np.isfinite(maps).all()
    assert not load_or_compute_maps(src, None, site)[1]  # the recomputed cache is reused


# --- already undersampled --------------------------------------------------------------------


def test_undersampled_file_is_measured_and_warned(tmp_path: Path) -> None:
    k = undersample(phantom_kspace(), keep=4)  # 4 of 32 lines: 12.5% filled
    path = write_volume(tmp_path / "under.h5", k)
    with pytest.warns(DataWarning) as caught:
        vol = read_volume(path, name="under.h5")
    msg = str(caught[0].message)
    assert msg.startswith("under.h5: field 'kspace': k-space is already undersampled")
    assert "12.5% of k-space filled" in msg and "4 of 32 lines acquired" in msg
    assert "R ~ 8.0" in msg and "Prospective reconstruction" in msg
    assert [f.check for f in vol.findings] == ["sampling", "accel"]  # R=8 > 4 coils
    assert "measured acceleration R=8 is above the coil count 4" in str(vol.findings[1])
    # prospective use: undersampled is expected, the acceleration is still worth a word
    with pytest.warns(DataWarning, match="measured acceleration R=8") as caught:
        vol = read_volume(path, expect_full=False)
    assert len(caught) == 1 and [f.check for f in vol.findings] == ["accel"]


@pytest.mark.parametrize(
    "blank",
    [
        "partial_fourier",  # 40% of the lines at one edge never acquired
        "edge_padding",  # zero-padded phase-encode edges (fastMRI)
        "elliptical",  # corners outside an ellipse not acquired
    ],
)
def test_fully_sampled_with_unacquired_edges_is_not_undersampled(blank: str) -> None:
    k = phantom_kspace()
    n = k.shape[-1]
    if blank == "partial_fourier":
        k[..., : int(0.4 * n)] = 0
    elif blank == "edge_padding":
        k[..., :3] = 0
        k[..., -3:] = 0
    else:
        y, x = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
        k[..., x**2 + y**2 > 1] = 0
    rep = check_kspace(k, "ok.h5")
    assert rep.findings == [] and rep.sampling is not None and not rep.sampling.undersampled


def test_prepare_refuses_an_undersampled_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site0"
    write_volume(site / "train" / "good.h5", phantom_kspace())
    bad = write_volume(site / "train" / "under.h5", undersample(phantom_kspace(), keep=4))
    rep = prepare_site(site, progress=False)
    assert rep["files"] == 1 and len(rep["errors"]) == 1
    assert rep["errors"][0].startswith("site0/train/under.h5: field 'kspace': k-space is already")
    assert not cache_path(bad, site).exists()
    rc, _, err = run_cli(["prepare", str(site), "--no-progress"], capsys)
    assert rc == 1 and err.count("under.h5") == 1


# --- layout ----------------------------------------------------------------------------------


def test_coil_last_file_is_refused_with_the_transpose(tmp_path: Path) -> None:
    k = np.moveaxis(phantom_kspace(), 1, -1)  # [slices, H, W, coils] = (2, 32, 32, 4)
    path = raw_h5(tmp_path / "coil_last.h5", kspace=k)
    for fn in (check_file, read_volume):
        with pytest.raises(DataError) as info:
            fn(path, name="coil_last.h5")
        err = info.value
        assert (err.file, err.field) == ("coil_last.h5", "kspace")
        assert "looks like [slices, H, W, coils] (4 coils of 32x32)" in err.reason
        assert "transpose to [slices, coils, H, W]" in err.reason
        assert "fedunroll convert coil_last.h5 OUT.h5 --layout shwc" in err.reason


def test_coil_axis_at_h_is_refused() -> None:
    from recon.data.checks import coil_axis_reason, suggest_layout

    assert coil_axis_reason((2, 4, 32, 32)) is None  # 4 coils of 32x32
    assert coil_axis_reason((2, 32, 32, 32)) is None  # as many coils as pixels: can't tell
    why = coil_axis_reason((2, 32, 4, 40))
    assert why is not None and "looks like [slices, H, coils, W] (4 coils of 32x40)" in why
    assert suggest_layout("schw", (2, 96, 96, 16)) == "shwc"
    assert suggest_layout("schw", (2, 32, 4, 40)) == "shcw"
    assert suggest_layout("hwcs", (3, 40, 32, 2)) == "chws"  # MATLAB size() order
    assert suggest_layout("schw", (2, 4, 32, 32)) is None


@pytest.mark.parametrize("names", [("real", "imag"), ("r", "i")])
def test_compound_real_imag_is_accepted(tmp_path: Path, names: tuple[str, str]) -> None:
    k = phantom_kspace()
    dtype = np.dtype([(names[0], "<f8"), (names[1], "<f8")])
    stored = np.empty(k.shape, dtype)
    stored[names[0]], stored[names[1]] = k.real, k.imag
    path = raw_h5(tmp_path / "compound.h5", kspace=stored)
    assert check_file(path) == (2, 4, 32, 32)
    vol = read_volume(path)
    assert vol.kspace.dtype == np.complex64
    np.testing.assert_array_equal(vol.kspace, k)


def test_trailing_real_imag_axis_is_accepted(tmp_path: Path) -> None:
    k = phantom_kspace()
    path = raw_h5(tmp_path / "pairs.h5", kspace=np.stack([k.real, k.imag], axis=-1))
    assert check_file(path) == (2, 4, 32, 32)
    np.testing.assert_array_equal(read_volume(path).kspace, k)


def test_matlab_variable_is_refused_once_with_the_convert_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    k = phantom_kspace()
    stored = np.empty(k.shape[::-1], np.dtype([("real", "<f8"), ("imag", "<f8")]))
    stored["real"], stored["imag"] = k.real.T, k.imag.T
    site = tmp_path / "edge"
    path = raw_h5(site / "train" / "scan.h5", {"MATLAB_class": np.bytes_("double")}, kspace=stored)
    with pytest.raises(DataError) as info:
        read_volume(path, name="edge/train/scan.h5")
    assert info.value.field == "kspace" and "MATLAB v7.3 variable" in info.value.reason
    assert "fedunroll convert scan.h5 OUT.h5 --var kspace" in info.value.reason
    rc, _, err = run_cli(["prepare", str(site), "--no-progress"], capsys)
    assert rc == 1 and err.count("MATLAB v7.3") == 1 and "field 'split'" not in err


def test_wrong_rank_points_to_convert(tmp_path: Path) -> None:
    path = raw_h5(tmp_path / "one_slice.h5", kspace=phantom_kspace()[0])
    with pytest.raises(DataError, match=r"expected 4 dims .*fedunroll convert one_slice\.h5"):
        read_volume(path)


# --- acceleration above the coil count -------------------------------------------------------


def test_acceleration_above_coils_warns_with_the_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site0"
    path = write_volume(site / "train" / "two_coils.h5", phantom_kspace(coils=2))
    with pytest.warns(DataWarning, match=r"acceleration R=4 is above the coil count 2"):
        read_volume(path, accel=4)
    rc, out, err = run_cli(["prepare", str(site), "--accel", "4", "--no-progress"], capsys)
    assert rc == 0
    assert "warning: site0/train/two_coils.h5: field 'kspace': acceleration R=4" in err
    assert "use R <= 2 (data.accel)" in err


# --- what prepare reports --------------------------------------------------------------------


def test_prepare_reports_the_checks_it_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site0"
    write_volume(site / "train" / "good.h5", phantom_kspace(slices=1))
    rc, out, err = run_cli(["prepare", str(site), "--accel", "4", "--no-progress"], capsys)
    assert rc == 0 and err == ""
    expected = describe(["layout", "finite", "centred", "sampling", "accel", "maps"])
    assert f"{site}: checked {expected}" in out
    assert set(CHECK_NAMES) == {"layout", "finite", "centred", "sampling", "accel", "maps"}
    assert "k-space centred" in expected and "coil maps finite" in expected


# --- privacy and one-line errors -------------------------------------------------------------


def test_redacted_errors_carry_only_the_file_name() -> None:
    err = DataError(
        "/data/hospital/patient_0042/train/scan.h5",
        "file",
        "not a readable HDF5 file (Unable to open file (name = "
        "'/data/hospital/patient_0042/train/scan.h5', errno = 2))",
    )
    safe = err.redacted()
    assert "patient_0042" not in str(safe) and "/" not in str(safe)
    assert str(safe).startswith("scan.h5: field 'file': not a readable HDF5 file")
    kept = "compound of real/imag floats [slices, H, W, coils] site0/train/x.h5"
    assert redact_paths(kept) == "compound of real/imag floats [slices, H, W, coils] x.h5"


def test_reasons_carry_no_directory(tmp_path: Path) -> None:
    folder = tmp_path / "patient_0042"
    folder.mkdir()
    junk = folder / "junk.h5"
    junk.write_bytes(b"not hdf5" * 20)
    with pytest.raises(DataError) as info:
        read_volume(junk, name="junk.h5")
    assert "patient_0042" not in str(info.value)


def test_guard_turns_expected_errors_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def fails(exc: BaseException) -> int:
        raise exc

    args = argparse.Namespace(command="prepare")
    for exc in (
        DataError("a.h5", "kspace", "bad"),
        ValueError("two\nlines"),
        FileNotFoundError("missing.h5"),
        OSError("Unable to synchronously open file (file signature not found)"),
    ):
        assert guard(lambda a, e=exc: fails(e))(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("fedunroll prepare: error: ") and err.count("\n") == 1
    with pytest.raises(KeyError):  # a bug keeps its traceback
        guard(lambda a: fails(KeyError("x")))(args)


def test_data_commands_report_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["convert", str(tmp_path / "nope.mat"), str(tmp_path / "o.h5")], capsys)
    assert rc == 2 and err == "fedunroll convert: error: nope.mat: field 'file': does not exist\n"


def test_one_bad_file_is_reported_once_with_its_own_field(tmp_path) -> None:
    """``fedunroll recon FILE`` on a bad file: that file's own error, once, no 'split' field."""
    import warnings

    from recon.data.dataset import file_samples
    from recon.data.h5io import DataError

    bad = tmp_path / "edge" / "scan.h5"
    bad.parent.mkdir()
    bad.write_bytes(b"not an h5 file")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping bad file" warning either
        with pytest.raises(DataError) as err:
            file_samples(bad)
    assert "split" not in str(err.value) and str(err.value).count("scan.h5") == 1

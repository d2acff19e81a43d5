"""Prospective reconstruction (k-space undersampled at acquisition), honest sampling reports,
metrics inside the object, CS that converges, and the acceleration-vs-coils warning.

Small files written here (48 px, 2-4 coils, from recon.data.synth)."""

from __future__ import annotations

import json
import stat
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedunroll.cli import main
from recon.data.h5io import write_volume
from recon.data.synth import get_preset, synth_volume
from recon.physics.coils import espirit_maps, np_fft2c, np_ifft2c, np_rss
from recon.physics.masks import make_mask
from recon.reconstruct import cs_l1_wavelet, reconstruct_file

SIZE = 48


def _volume(coils: int, seed: int = 0, slices: int = 2) -> np.ndarray:
    preset = replace(get_preset("brain_t1_3t"), num_coils=coils, matrix=(SIZE, SIZE))
    kspace, _, _ = synth_volume(preset, slices, np.random.default_rng(seed))
    return kspace  # [S, C, H, W]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A fully sampled file, the same scan undersampled at acquisition (zeros on the skipped
    lines) in a read-only folder, and the mask as .npy."""
    root = tmp_path_factory.mktemp("prospective")
    full = _volume(coils=4)
    mask = make_mask("random1d", (SIZE, SIZE), accel=3, acs_frac=0.17, seed=1)  # 8 ACS lines
    (root / "full").mkdir()
    (root / "archive").mkdir()
    write_volume(root / "full" / "scan.h5", full)
    write_volume(root / "archive" / "scan_us.h5", full * mask)
    np.save(root / "mask.npy", mask)
    archive = root / "archive"
    archive.chmod(stat.S_IRUSR | stat.S_IXUSR)  # a read-only archive
    yield {"full": root / "full" / "scan.h5", "us": archive / "scan_us.h5", "root": root}
    archive.chmod(stat.S_IRWXU)


def test_prospective_sense_equals_retrospective_with_the_same_mask(files: dict[str, Path]) -> None:
    """Same mask, same acquired lines: the prospective path (mask read from the zero lines,
    maps from the acquired ACS lines) gives the retrospective SENSE result."""
    root = files["root"]
    retro = reconstruct_file(
        files["full"], "sense", out=root / "retro", mask=root / "mask.npy", prospective=False
    )
    pro = reconstruct_file(files["us"], "sense", out=root / "pro")  # detected
    assert pro["mode"] == "prospective" and retro["mode"] == "retrospective"
    assert pro["sampling"]["mask"] == "acquired" and pro["sampling"]["acs_lines"] == 8
    assert pro["calibration"] == retro["calibration"] == {"lines": 8, "source": "acquired ACS"}
    with h5py.File(retro["out"]) as a, h5py.File(pro["out"]) as b:
        np.testing.assert_allclose(
            b["reconstruction_sense"][()], a["reconstruction_sense"][()], rtol=1e-4, atol=1e-5
        )
    scale = [r["scale"] for r in retro["slices"]]
    assert scale == pytest.approx([r["scale"] for r in pro["slices"]], rel=1e-5)
    # no reference prospectively: no metrics, said so
    assert pro["mean"] is None and "no fully sampled reference" in pro["metrics"]
    assert "ssim" not in pro["slices"][0] and retro["mean"]["ssim"] > 0


def test_default_method_needs_no_checkpoint_and_nothing_lands_next_to_the_input(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in files["us"].parent.iterdir())
    out = files["root"] / "default"
    assert main(["recon", str(files["us"]), "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "sense (prospective)" in text and "metrics: none" in text
    assert "sampling: acquired" in text and "8 ACS lines" in text and "effective R" in text
    assert sorted(p.name for p in files["us"].parent.iterdir()) == before  # nothing new
    names = {p.name for p in out.iterdir()}
    assert {"scan_us.sense.h5", "scan_us.sense.nii.gz", "scan_us.sense.json"} <= names
    assert list((out / "png").glob("scan_us_s000_sense.png"))
    assert list((out / "cache").rglob("*.maps.h5"))  # the map cache is in the output folder
    import nibabel as nib

    assert nib.load(out / "scan_us.sense.nii.gz").shape == (SIZE, SIZE, 2)


def test_default_output_folder_is_under_runs(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    rep = reconstruct_file(files["us"], "zero-filled", png=False, nifti=False)
    out = Path(rep["out"])
    assert out.parent.parent == Path("runs") and out.parent.name.startswith("recon-")
    assert (tmp_path / out).is_file()


def test_sampling_in_json_and_printed_line(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = files["root"] / "retro-keys"
    rc = main(
        ["recon", str(files["full"]), "--method", "zero-filled", "--out", str(out)]
        + ["--set", "data.accel=4", "--set", "data.seed=3", "--set", "data.acs-frac=0.1"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "sampling: random1d R=4, effective R 4.00 (12 of 48 lines, ACS included)" in text
    assert "5 ACS lines, seed 3" in text and "coil maps from 8 calibration lines" in text
    assert "inside the object: SSIM" in text and "per-volume SSIM" in text
    rep = json.loads((out / "scan.zero-filled.json").read_text())
    s = rep["sampling"]
    assert (s["mask"], s["accel"], s["acs_lines"], s["seed"]) == ("random1d", 4.0, 5, 3)
    assert s["effective_accel"] == pytest.approx(4.0) and s["total_lines"] == SIZE
    with h5py.File(out / "scan.zero-filled.h5") as f:
        assert f.attrs["mask"] == "random1d" and f.attrs["acs_lines"] == 5
        assert not f.attrs["rotated"]
    # metrics on the whole image, inside the support, and per volume (fastMRI)
    m = rep["mean"]
    for key in ("ssim", "nrmse", "psnr", "support_ssim", "support_nrmse", "support_psnr"):
        assert np.isfinite(m[key])
    assert 0 < m["support_fraction"] < 1 and 0 < rep["volume"]["ssim"] <= 1


def test_mask_file_and_prospective_flag(files: dict[str, Path]) -> None:
    root = files["root"]
    rep = reconstruct_file(
        files["us"], "zero-filled", out=root / "flag", prospective=True, mask=root / "mask.npy"
    )
    assert rep["sampling"]["mask"] == "file mask.npy" and rep["sampling"]["acs_lines"] == 8
    with pytest.raises(ValueError, match="needs --checkpoint"):
        reconstruct_file(files["us"], "model", out=root / "m")


def _wide_object(coils: int) -> np.ndarray:
    """One slice [C, H, W] of an object wider than FOV/R (it touches the FOV edges), with
    smooth loop-coil maps and noise: at R=4 the aliased copies overlap."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    yy, xx = (yy - SIZE / 2) / (SIZE / 2), (xx - SIZE / 2) / (SIZE / 2)
    img = ((yy / 0.85) ** 2 + xx**2 < 1) * 1.0
    img += 0.5 * (((yy - 0.2) / 0.3) ** 2 + ((xx + 0.3) / 0.3) ** 2 < 1)
    img -= 0.4 * (((yy + 0.3) / 0.2) ** 2 + ((xx - 0.4) / 0.2) ** 2 < 1)
    k = np_fft2c(_loop_coils(coils, rng) * img)
    k = k + 0.01 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)) / 2**0.5
    return (k / np_rss(np_ifft2c(k)).max()).astype(np.complex64)


def _loop_coils(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` loop coils on a ring of radius 1.2 around the FOV ([C, H, W]): on-axis Biot-Savart
    magnitude ``(a^2 / (a^2 + d^2))^{3/2}`` (a = 0.55) and a smooth phase. Fixed here, so this
    test does not follow the synthetic sites' coil model."""
    h = (np.arange(SIZE) - SIZE / 2 + 0.5) * (2.0 / SIZE)
    yy, xx = np.meshgrid(h, h, indexing="ij")
    angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n) / n + rng.normal(0, 0.1, n)
    maps = np.empty((n, SIZE, SIZE), dtype=np.complex128)
    for c, ang in enumerate(angles):
        r, a = 1.2 * (1 + rng.normal(0, 0.05)), 0.55 * (1 + rng.normal(0, 0.1))
        cx, cy = r * np.cos(ang), r * np.sin(ang)
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        t = (xx - cx) * -np.sin(ang) + (yy - cy) * np.cos(ang)
        phase = rng.uniform(0, 2 * np.pi) + 0.5 * t + 0.15 * rng.normal() * d2
        maps[c] = (a**2 / (a**2 + d2)) ** 1.5 * np.exp(1j * phase)
    centre = xx**2 + yy**2 < 0.25
    return maps / np_rss(maps)[centre].mean()


@pytest.mark.parametrize("coils", [2, 4])
def test_cs_never_ends_worse_than_its_start(coils: int) -> None:
    """On an object wider than FOV/R, CS ends no worse than the zero-filled SENSE-combined image
    it starts from, with a bounded amplitude and a lower objective (SigPy's L1WaveletRecon grew
    with the iterations here)."""
    full = _wide_object(coils)
    ref = np_rss(np_ifft2c(full))
    mask = make_mask("random1d", full.shape, accel=4, acs_frac=0.16, seed=0)
    y = full * mask
    maps = espirit_maps(y, calib_width=8)

    def err(x: np.ndarray) -> float:
        return float(np.linalg.norm(np_rss(maps * x) - ref) / np.linalg.norm(ref))

    start = np.sum(np.conj(maps) * np_ifft2c(y), axis=0)
    for iters in (30, 100):
        x, info = cs_l1_wavelet(y, maps, mask, max_iter=iters)
        assert err(x) <= err(start), (iters, err(x), err(start))
        assert np.abs(x).max() < 1.5 * ref.max()
        assert info["objective_end"] <= info["objective_start"]


def test_acceleration_above_coils_warns_with_the_numbers(tmp_path: Path) -> None:
    write_volume(tmp_path / "two.h5", _volume(coils=2, slices=1))
    with pytest.warns(UserWarning, match=r"R=4 is above the coil count 2"):
        rep = reconstruct_file(
            tmp_path / "two.h5", "zero-filled", out=tmp_path / "o", png=False, nifti=False
        )
    assert any("coil count 2" in w for w in rep["warnings"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4 coils at R=4: no warning of that kind
        write_volume(tmp_path / "four.h5", _volume(coils=4, slices=1))
        rep = reconstruct_file(
            tmp_path / "four.h5", "zero-filled", out=tmp_path / "o4", png=False, nifti=False
        )
    assert not rep["warnings"]


def test_rotated_output_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k = np.swapaxes(_volume(coils=4, slices=1), -1, -2)
    write_volume(tmp_path / "h.h5", k, attrs={"readout": "horizontal"})
    assert main(["recon", str(tmp_path / "h.h5"), "--out", str(tmp_path / "o")]) == 0
    assert "rotated: the file's readout is horizontal" in capsys.readouterr().out
    with h5py.File(tmp_path / "o" / "h.sense.h5") as f:
        assert f.attrs["rotated"]


def test_train_reports_the_sampling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recon.data.synth import generate_sites

    generate_sites(tmp_path / "synth", n_sites=1, n_slices=6, matrix=32, slices_per_volume=2)
    rc = main(
        ["train", str(tmp_path / "synth" / "site0"), "--out", str(tmp_path / "run")]
        + ["--device", "cpu", "--set", "train.local-steps=2", "--set", "model.num-unrolls=1"]
        + ["--set", "model.cg-iters=1", "--set", "model.unet-chans=4"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "site0: sampling random1d R=4 (effective 4.00: 8 of 32 lines" in text
    assert "3 ACS lines, seed 0; coil maps from 8 calibration lines" in text  # the floor
    s = json.loads((tmp_path / "run" / "results.json").read_text())["sampling"]["site0"]
    assert (s["mask"], s["accel"], s["acs_lines"], s["seed"]) == ("random1d", 4.0, 3, 0)
    assert s["calibration"] == {"lines": 8, "source": "fully sampled centre (floor)"}
    assert torch.isfinite(torch.tensor(s["effective_accel"]))


def test_readme_prospective_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's 'Prospective reconstruction' lines, run as they are written there."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Prospective reconstruction", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    lines = [ln.split("  #")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert len(lines) == 3 and all(ln.startswith("fedunroll recon ") for ln in lines)
    monkeypatch.chdir(tmp_path)
    full = _volume(coils=4)
    mask = make_mask("random1d", (SIZE, SIZE), accel=3, acs_frac=0.17, seed=1)
    write_volume("scan.h5", full)
    Path("archive").mkdir()
    write_volume("archive/scan_us.h5", full * mask)
    np.save("mask.npy", mask)
    Path("archive").chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        for line in lines:
            assert main(shlex.split(line)[1:]) == 0, line
    finally:
        Path("archive").chmod(stat.S_IRWXU)
    text = capsys.readouterr().out
    assert "sense (prospective)" in text and "metrics: none" in text
    assert "sampling: acquired, effective R 3.00 (16 of 48 lines, ACS included)" in text
    assert sorted(p.name for p in Path("archive").iterdir()) == ["scan_us.h5"]
    with h5py.File("recon_pro/scan_us.sense.h5") as a, h5py.File("recon_retro/scan.sense.h5") as b:
        np.testing.assert_allclose(
            a["reconstruction_sense"][()], b["reconstruction_sense"][()], rtol=1e-4, atol=1e-5
        )
    rep = json.loads(Path("recon_keys/scan.cs.json").read_text())
    assert rep["sampling"]["seed"] == 3 and rep["mean"]["support_ssim"] > 0

"""The command line a user runs: synth -> train -> recon, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from fedunroll.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 48 px: at 32 px the synthetic head coils' ESPIRiT maps (8-line calibration box) are too
    # coarse for plain SENSE to beat zero-filled (18.8 vs 19.8 dB); at 48 px it gains 3 dB.
    root = tmp_path_factory.mktemp("cli")
    assert (
        main(
            [
                "synth",
                "--sites",
                "2",
                "--slices",
                "20",
                "--matrix",
                "48",
                "--no-progress",
                str(root / "synth"),
            ]
        )
        == 0
    )
    return root


def test_train_writes_checkpoint_and_per_site_table(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sites = sorted(str(p) for p in (workdir / "synth").glob("site*"))
    out = workdir / "run"
    rc = main(
        [
            "train",
            *sites,
            "--out",
            str(out),
            "--device",
            "cpu",
            "--set",
            "train.local-steps=30",
            "--set",
            "model.num-unrolls=2",
            "--set",
            "model.cg-iters=2",
            "--set",
            "model.unet-chans=8",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "zero-filled" in text and "site0" in text and "site1" in text
    results = json.loads((out / "results.json").read_text())
    assert set(results["final"]) == {"site0", "site1"}
    assert results["config"]["model"]["num_unrolls"] == 2
    assert (out / "model.pt").stat().st_size > 10_000


@pytest.mark.parametrize("method", ["zero-filled", "sense", "cs", "model"])
def test_recon_every_method_writes_images_and_metrics(workdir: Path, method: str) -> None:
    ckpt = workdir / "run" / "model.pt"
    if method == "model" and not ckpt.exists():
        pytest.skip("needs the checkpoint of test_train_writes_checkpoint_and_per_site_table")
    src = next((workdir / "synth" / "site0" / "test").glob("*.h5"))
    out = workdir / f"{method}.h5"
    rc = main(
        [
            "recon",
            str(src),
            "--method",
            method,
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--png",
            str(workdir / "png"),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    with h5py.File(out) as f:
        images = f[f"reconstruction_{method}"][()]
    with h5py.File(src) as f:
        assert images.shape == (f["kspace"].shape[0], *f["kspace"].shape[-2:])
    report = json.loads(out.with_suffix(".json").read_text())
    assert 0 < report["mean"]["ssim"] <= 1 and len(report["slices"]) == images.shape[0]
    assert list((workdir / "png").glob(f"*_{method}.png"))


def test_classical_and_learned_beat_zero_filled(workdir: Path) -> None:
    means = {}
    for method in ["zero-filled", "sense"]:
        path = workdir / f"{method}.h5"
        if not path.exists():
            pytest.skip("runs after the recon tests")
        means[method] = json.loads(path.with_suffix(".json").read_text())["mean"]
    assert means["sense"]["psnr"] > means["zero-filled"]["psnr"]


def test_bad_config_key_is_named(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", str(workdir / "synth" / "site0"), "--set", "model.num_unroll=2"])
    assert rc == 2
    assert "unknown run-config key 'model.num_unroll'" in capsys.readouterr().err
    rc = main(["train", str(workdir / "synth" / "site0"), "--set", "optim.lr=1"])
    assert rc == 2 and "optim.lr" in capsys.readouterr().err


def test_train_with_gleam_and_its_config_errors(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train.method=gleam`` trains greedily from the command line; a method the architecture
    cannot take is refused before any data is read, naming the key to change."""
    site = str(workdir / "synth" / "site0")
    small = ["--set", "model.num-unrolls=2", "--set", "model.cg-iters=2"]
    small += ["--set", "model.unet-chans=4", "--set", "train.local-steps=6"]
    out = workdir / "gleam"
    rc = main(
        ["train", site, "--out", str(out), "--device", "cpu", *small]
        + ["--set", "train.method=gleam", "--set", "model.shared=false"]
        + ["--set", "gleam.modules=2", "--set", "gleam.devices=cpu,cpu"]
    )
    assert rc == 0, capsys.readouterr().err
    assert "method gleam num_modules=2 devices=['cpu', 'cpu']" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["train"]["method"] == "gleam"
    assert results["config"]["gleam"]["num_modules"] == 2
    assert results["train"]["steps"] == 6

    rc = main(["train", site, *small, "--set", "train.method=gleam"])  # shared U-Net
    assert rc == 2 and "set model.shared = false" in capsys.readouterr().err
    rc = main(["train", site, *small, "--set", "train.method=sgd"])
    assert rc == 2 and "unknown train.method 'sgd'" in capsys.readouterr().err
    rc = main(["train", site, *small, "--set", "train.method=layerwise"])
    assert rc == 2 and 'model.denoiser = "convex"' in capsys.readouterr().err


def test_bad_input_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.h5"
    with h5py.File(bad, "w") as f:
        f["kspace"] = [[1.0, 2.0]]  # real, rank 2
    rc = main(["recon", str(bad), "--method", "zero-filled"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "broken.h5" in err and "kspace" in err


def test_personalize_command_writes_report_and_weights(workdir: Path) -> None:
    ckpt = workdir / "run" / "model.pt"
    if not ckpt.exists():
        pytest.skip("needs the checkpoint of test_train_writes_checkpoint_and_per_site_table")
    out = workdir / "pers"
    rc = main(
        [
            "personalize",
            "--checkpoint",
            str(ckpt),
            "--site",
            str(workdir / "synth" / "site1"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--set",
            "personalize.folds=2",
            "--set",
            "personalize.max-epochs=2",
            "--set",
            "personalize.lrs=[1e-3]",
        ]
    )
    assert rc == 0
    report = json.loads((out / "personalize.json").read_text())
    assert report["grid"] == {"lrs": [1e-3], "max_epochs": 2, "folds": 2}
    assert len(report["cv_curves"]["0.001"]) == 2 and set(report["before"]) == {
        "ssim",
        "nrmse",
        "psnr",
    }
    assert report["fine_tune"] == (report["n_fine"] > 0)
    assert (out / "personalized_model.pt").exists()


@pytest.mark.parametrize("command", ["train", "recon", "personalize", "simulate"])
def test_old_spelling_fails_naming_the_dashed_key_in_every_command(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One spelling for every command: an underscore key fails before anything runs, naming the
    key and its dashed form."""
    args = {
        "train": [str(tmp_path / "no-site")],
        "recon": [str(tmp_path / "no.h5"), "--method", "zero-filled"],
        "personalize": ["--checkpoint", str(tmp_path / "no.pt"), "--site", str(tmp_path)],
        "simulate": ["--out", str(tmp_path)],
    }[command]
    rc = main([command, *args, "--set", "model.num_unrolls=4", "--set", "train.lr=1e-3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown run-config key 'model.num_unrolls'; did you mean 'model.num-unrolls'?" in err
    assert not (tmp_path / "no-site").exists() and not list(tmp_path.glob("*/results.json"))


def test_config_command_lists_every_key_with_default_and_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import tomllib

    from recon.config import VALID_KEYS, default_flat

    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert tomllib.loads(text) == default_flat()  # valid TOML: a starting --config file
    lines = [line for line in text.splitlines() if line.startswith('"')]
    assert len(lines) == len(VALID_KEYS) and all(" # " in line for line in lines)
    assert main(["config", "gleam", "--for", "train"]) == 0
    text = capsys.readouterr().out
    assert '"gleam.devices" = ""' in text and "model." not in text
    assert main(["config", "model", "--for", "train"]) == 0
    assert '"model.num-unrolls" = 6' in capsys.readouterr().out  # the paper's MoDL
    assert main(["config", "modle"]) == 2
    assert "unknown section" in capsys.readouterr().err

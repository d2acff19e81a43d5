"""``fedunroll report``: tables with the right numbers, readable PNGs, clear schema errors."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from fedunroll.report import ResultsError, command, load_results, validate_results, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_results(baselines: bool = True, n_rounds: int = 3) -> dict[str, Any]:
    """A hand-written ``fedunroll.results/1`` document: 2 sites, ``n_rounds`` rounds."""
    rounds = []
    for r in range(1, n_rounds + 1):
        rounds.append(
            {
                "round": r,
                "seconds": 10.0 + r,
                "bytes_sent": 2_000_000 * r,
                "bytes_received": 1_900_000 * r,
                "train": {
                    "site0": {"loss": 0.5 / r, "num-examples": 30, "seconds": 4.0},
                    "site1": {"loss": 0.3 / r, "num-examples": 10, "seconds": 2.0},
                },
                "eval": {
                    "site0": {"ssim": 0.6 + 0.1 * r, "nrmse": 0.3 / r, "psnr": 20.0 + r,
                              "num-examples": 3},
                    "site1": {"ssim": 0.5 + 0.1 * r, "nrmse": 0.4 / r, "psnr": 18.0 + r,
                              "num-examples": 1},
                },
                "rejected": [{"site": "site1", "reason": "non-finite arrays"}] if r == 2 else [],
            }
        )  # fmt: skip
    final: dict[str, Any] = {
        "federated": {
            "site0": {"ssim": 0.91234, "nrmse": 0.10049, "psnr": 31.456},
            "site1": {"ssim": 0.81, "nrmse": 0.2, "psnr": 27.5},
        },
        "zero_filled": {
            "site0": {"ssim": 0.7, "nrmse": 0.3, "psnr": 22.0},
            "site1": {"ssim": 0.6, "nrmse": 0.4, "psnr": 20.0},
        },
    }
    if baselines:
        final["local_only"] = {
            "site0": {"ssim": 0.88, "nrmse": 0.12, "psnr": 30.0},
            "site1": {"ssim": 0.77, "nrmse": 0.25, "psnr": 26.0},
        }
        final["centralized"] = {
            "site0": {"ssim": 0.93, "nrmse": 0.09, "psnr": 32.0},
            "site1": {"ssim": 0.85, "nrmse": 0.18, "psnr": 28.0},
        }
    return {
        "schema": "fedunroll.results/1",
        "name": "scaffold-test",
        "config": {"strategy.name": "scaffold", "num-server-rounds": 3, "data.root": "nowhere"},
        "sites": ["site0", "site1"],
        "model": {"num_parameters": 481_000, "bytes": 1_924_000},
        "rounds": rounds,
        "final": final,
        "timings": {"total_seconds": 40.0, "rounds_seconds": 36.0},
        "status": "completed",
    }


def write_run(path: Path, results: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(results))
    return path


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300, img.shape
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_report_with_baselines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", make_results(baselines=True))
    md = write_report(run)
    text = md.read_text()
    assert md == run / "report.md"
    # per site x method, formatted SSIM 4 dp, NRMSE 4 dp, PSNR 2 dp
    assert "| site0 | federated | 0.9123 | 0.1005 | 31.46 |" in text
    assert "| site1 | zero-filled | 0.6000 | 0.4000 | 20.00 |" in text
    assert "| site0 | local-only | 0.8800 | 0.1200 | 30.00 |" in text
    assert "| site1 | centralized | 0.8500 | 0.1800 | 28.00 |" in text
    assert "| **mean** | centralized | 0.8900 | 0.1350 | 30.00 |" in text
    # round 3: example-weighted (3:1) val means, train loss weighted 30:10
    ssim3 = (3 * 0.9 + 1 * 0.8) / 4
    nrmse3 = (3 * 0.1 + 1 * 0.4 / 3) / 4
    loss3 = (30 * 0.5 / 3 + 10 * 0.1) / 40
    row3 = (
        f"| 3 | 13.0 | 6,000,000 | 5,700,000 | 2 | 0 | {loss3:.4f} | {ssim3:.4f} | {nrmse3:.4f} |"
    )
    assert row3 in text
    assert "| 2 | site1 | non-finite arrays |" in text  # rejected replies listed
    assert "status: **completed**" in text and "rounds: 3 of 3" in text
    for name in ("metrics_vs_round.png", "site_bars.png"):
        assert f"]({name})" in text
        assert_png(run / name)
    assert not (run / "recon_grid.png").exists()
    out = capsys.readouterr().out
    assert "| site0 | federated | 0.9123 | 0.1005 | 31.46 |" in out  # table echoed to stdout
    assert "recon grid skipped: no final_model.pt" in out


def test_report_without_baselines(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_results(baselines=False))
    text = write_report(run, echo=False).read_text()
    assert "| site1 | federated | 0.8100 | 0.2000 | 27.50 |" in text
    assert "local-only" not in text and "centralized" not in text
    assert_png(run / "site_bars.png")
    assert_png(run / "metrics_vs_round.png")


def test_report_of_failed_run(tmp_path: Path) -> None:
    results = make_results(n_rounds=2)
    for key in ("final", "timings", "model"):
        del results[key]
    results["status"] = "failed: site1 timed out"
    run = write_run(tmp_path / "run", results)
    text = write_report(run, echo=False).read_text()
    assert "status: **failed: site1 timed out**" in text and "rounds: 2 of 3" in text
    # no final evaluation: the last round's validation metrics stand in, labelled as such
    assert "| site0 | federated (val, last round) | 0.8000 | 0.1500 | 22.00 |" in text
    assert_png(run / "metrics_vs_round.png")

    results["rounds"] = []  # failed before the first round finished
    write_run(run, results)
    text = write_report(run, echo=False).read_text()
    assert "_No round completed._" in text
    assert not (run / "metrics_vs_round.png").exists()  # stale figure removed


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.pop("sites"), "'sites'"),
        (lambda d: d.update(schema="fedunroll.results/0"), "'schema'"),
        (lambda d: d["rounds"][1]["eval"]["site0"].pop("ssim"), "'rounds[1].eval.site0.ssim'"),
        (
            lambda d: d["rounds"][0]["train"]["site1"].update(loss="x"),
            "'rounds[0].train.site1.loss'",
        ),
        (lambda d: d["rounds"][2].pop("bytes_sent"), "'rounds[2].bytes_sent'"),
        (lambda d: d["final"].pop("federated"), "'final.federated'"),
        (lambda d: d["final"]["local_only"]["site1"].pop("psnr"), "'final.local_only.site1.psnr'"),
        (lambda d: d.pop("timings"), "'timings'"),
        (lambda d: d["model"].update(bytes=1.5), "'model.bytes'"),
    ],
)
def test_malformed_results_name_the_field(edit: Any, field: str, tmp_path: Path) -> None:
    bad = copy.deepcopy(make_results())
    edit(bad)
    with pytest.raises(ResultsError, match=re.escape(f"field {field}")):
        validate_results(bad)
    run = write_run(tmp_path / "run", bad)
    with pytest.raises(ResultsError, match="results.json: field"):
        load_results(run)


def test_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Args:
        data = None
        device = "cpu"
        no_grid = False

    bad = make_results()
    del bad["rounds"][0]["eval"]
    Args.run_dir = str(write_run(tmp_path / "bad", bad))  # type: ignore[attr-defined]
    assert command(Args) == 2
    assert "field 'rounds[0].eval': missing" in capsys.readouterr().err
    Args.run_dir = str(tmp_path / "empty")  # type: ignore[attr-defined]
    assert command(Args) == 2
    assert "no results.json" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    Args.run_dir = str(tmp_path / "broken")  # type: ignore[attr-defined]
    assert command(Args) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_recon_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from recon.data.synth import generate_sites
    from recon.models import ModelConfig, build_model
    from recon.models.checkpoint import save_checkpoint

    data = tmp_path / "data"
    generate_sites(data, n_sites=2, n_slices=12, seed=0, matrix=32, overrides={"num_coils": 2})
    cfg = ModelConfig(num_unrolls=2, cg_iters=2, unet_chans=8, unet_pools=2)
    torch.manual_seed(0)
    run = write_run(tmp_path / "run", make_results())
    save_checkpoint(build_model(cfg), cfg, run / "final_model.pt")
    # the run config's data.root does not exist: skipped with a note, then --data finds it
    write_report(run)
    assert "recon grid skipped: data folder nowhere does not exist" in capsys.readouterr().out
    text = write_report(run, data_root=data).read_text()
    assert "](recon_grid.png)" in text
    assert_png(run / "recon_grid.png")


def test_nan_metrics_written_as_null(tmp_path: Path) -> None:
    """``server.results.write`` stores NaN as ``null``: reported as '–', left out of means."""
    from server import results as server_results

    doc = make_results(baselines=False)
    doc["rounds"][0]["train"]["site1"]["loss"] = float("nan")
    doc["final"]["federated"]["site1"]["psnr"] = float("nan")
    built = server_results.build(
        name=doc["name"],
        config=doc["config"],
        sites=doc["sites"],
        num_parameters=10,
        model_bytes=40,
        rounds=doc["rounds"],
        final=doc["final"],
        total_seconds=1.0,
        status="completed",
    )
    run = tmp_path / "run"
    server_results.write(run, built)
    assert '"loss": null' in (run / "results.json").read_text()
    text = write_report(run, echo=False).read_text()
    assert "| site1 | federated | 0.8100 | 0.2000 | – |" in text
    assert "| **mean** | federated | 0.8612 | 0.1502 | 31.46 |" in text
    assert "| 1 | 11.0 | 2,000,000 | 1,900,000 | 2 | 0 | 0.5000 |" in text  # site0's loss only
    assert_png(run / "site_bars.png")


def test_bad_checkpoint_is_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", make_results())
    (run / "final_model.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "data" / "site0").mkdir(parents=True)
    md = write_report(run, data_root=tmp_path / "data")
    assert "recon grid skipped:" in capsys.readouterr().out
    assert "| site0 | federated | 0.9123 |" in md.read_text()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedunroll.cli import main

    run = write_run(tmp_path / "run", make_results())
    assert main(["report", str(run), "--no-grid"]) == 0
    assert "| site1 | local-only | 0.7700 | 0.2500 | 26.00 |" in capsys.readouterr().out
    assert (run / "report.md").is_file()
    bad = make_results()
    del bad["final"]["zero_filled"]["site0"]["nrmse"]
    write_run(run, bad)
    assert main(["report", str(run)]) == 2
    assert "field 'final.zero_filled.site0.nrmse': missing" in capsys.readouterr().err

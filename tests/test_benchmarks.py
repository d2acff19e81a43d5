"""The benchmark scripts run and write what their README promises (tiny sizes, smoke only:
the figures themselves are measured by hand, see benchmarks/results/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> None:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_bench_gleam_quick_writes_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    _run(
        "benchmarks/bench_gleam.py",
        "--quick",
        "--size", "32", "--coils", "2", "--unrolls", "2",
        "--quality-size", "32", "--quality-coils", "2", "--budget-unrolls", "1",
        "--train-steps", "6", "--slices", "20",
        "--out", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    mt = report["memory_time"]
    assert set(mt["runs"]) == {"e2e", "checkpoint", "gleam"}
    assert mt["activation_ratio_e2e_over_gleam"] > 1  # greedy modules hold fewer activations
    for section in ("equal_architecture", "equal_memory"):
        runs = report[section]
        assert runs["e2e"]["per_seed"] and runs["gleam"]["per_seed"]
        assert len(runs["gleam"]["psnr_per_unroll"]) == runs["gleam"]["unrolls"]
    assert (
        report["equal_memory"]["gleam"]["unrolls"] == 3 * report["equal_memory"]["e2e"]["unrolls"]
    )
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_modl_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    _run(
        "benchmarks/bench_modl.py",
        "--quick",
        "--unrolls",
        "2",
        "--cg-iters",
        "2",
        "--out",
        str(out),
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["size"] == 64 and row["forward_s"] > 0 and row["forward_over_fft_floor"] > 0


@pytest.mark.slow
def test_reproduce_quick_writes_every_section(tmp_path: Path) -> None:
    _run("benchmarks/reproduce.py", "--quick", "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "reproduce_quick.json").read_text())
    sections = report["sections"]
    assert set(sections) == {
        "strategies",
        "low_data",
        "personalization",
        "gleam",
        "fairness",
        "nas",
    }
    seeds = report["seeds"]
    assert seeds == list(range(len(seeds))) and len(seeds) >= 2  # seeds 0..S-1, never chosen
    for dist in ("iid", "noniid"):
        diff = sections["strategies"][dist]["scaffold_minus_fedavg"]["ssim"]
        assert len(diff["values"]) == len(seeds) and diff["ci"][0] <= diff["mean"] <= diff["ci"][1]
    assert sections["personalization"]["unseen"]["ssim"]["n"] == len(seeds)
    assert {"equal_architecture", "equal_memory"} <= set(sections["gleam"])
    assert "std" in sections["fairness"]["fairfedavg_minus_fedavg"]
    claims = [d["claim"][:2] for d in report["directions"]]
    assert {"1.", "2.", "3.", "4.", "5.", "6."} <= set(claims)
    assert all(d["verdict"] for d in report["directions"]) and report["wall_seconds"] > 0
    assert "| claim |" in (tmp_path / "reproduce_quick.md").read_text()
    assert (tmp_path / "reproduce_quick.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_privacy_quick_runs_the_default_federation(tmp_path: Path) -> None:
    from recon.config import RunConfig

    out = tmp_path / "privacy"
    _run("benchmarks/bench_privacy.py", "--quick", "--seeds", "1", "--out", str(out))
    data = json.loads(out.with_suffix(".json").read_text())
    setup, default = data["setup"], RunConfig()
    assert len(setup["sites"]) == default.data.num_sites  # the default federation's sites
    assert setup["strategy_default"] == default.strategy.name
    assert setup["strategy"] == default.strategy.name or setup["strategy_reason"]
    assert setup["config"]["run.local-only"] is False
    assert setup["total_steps"] == setup["rounds"] * setup["local_steps"]
    assert [e["epsilon"] for e in data["table"]] == [1.0, 3.0, 8.0, None]
    for entry in data["table"]:
        assert len(entry["ssim_mean_per_seed"]) == 1 and entry["seconds"] > 0
        if entry["epsilon"] is None:
            assert entry["noise_multiplier"] is None and entry["epsilon_reached"] is None
        else:
            assert set(entry["epsilon_reached"]) == set(setup["sites"])
            assert entry["epsilon"] * 0.9 <= entry["epsilon_reached_max"] <= entry["epsilon"]
    assert out.with_suffix(".png").stat().st_size > 10_000

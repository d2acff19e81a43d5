"""``fedunroll simulate`` for real: SuperLink + Ray simulation, and no process left behind.

Each command gets a marker in its environment; every process it starts (SuperLink, SuperExec,
``flwr-simulation``, Ray's GCS/raylet/workers) inherits it, so the test can list exactly this
command's processes in /proc, during the run and after it (normal end and Ctrl-C), without
being confused by other Flower or Ray users on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from test_app_support import tiny_config, tiny_sites

from fedunroll.procs import tagged_pids
from fedunroll.simulate import to_toml
from server import checkpoint
from server.results import read

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc"),
]
MARK = "FEDUNROLL_TEST_MARK"
ROOT = Path(__file__).resolve().parents[1]


def _marked(mark: str) -> list[int]:
    needle = f"{MARK}={mark}".encode()
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle in (p / "environ").read_bytes().split(b"\0"):
                stat = (p / "stat").read_text()
                if stat[stat.rindex(")") + 2] != "Z":
                    out.append(int(p.name))
        except OSError:
            continue
    return out


def _cmdlines(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(
                Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
            )
        except OSError:
            pass
    return out


def _start(config: Path, out: Path, mark: str, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        MARK: mark,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    cmd = [sys.executable, "-m", "fedunroll.cli", "simulate", "--config", str(config)]
    cmd += ["--out", str(out), "--quiet", *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _assert_no_leftovers(mark: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes outlived the command: {_cmdlines(left)}"


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    sd = torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]
    return {k: v.numpy() for k, v in sd.items()}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return tiny_sites(tmp_path_factory)


def _config(sites: Path, tmp: Path, strategy: str, name: str, extra: dict | None = None) -> Path:
    flat = tiny_config(sites, tmp, {"strategy.name": strategy, "num-server-rounds": 3})
    flat.update({"run.name": name, "train.local-steps": 6, **(extra or {})})
    path = tmp / f"{name}.toml"
    path.write_text(to_toml(flat))
    return path


def _run(config: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, str, str]:
    mark = uuid.uuid4().hex
    proc = _start(config, out, mark, *extra)
    seen: list[int] = []
    while proc.poll() is None:
        seen = seen or _marked(mark)
        time.sleep(0.5)
    log = proc.stdout.read() if proc.stdout else ""
    assert seen, "the marker did not reach the simulation's processes"
    return proc, mark, log


@pytest.fixture(scope="module")
def uninterrupted(sites, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    proc, mark, log = _run(_config(sites, tmp, "scaffold", "full"), tmp)
    assert proc.returncode == 0, log
    _assert_no_leftovers(mark)
    return tmp / "full", log


def test_scaffold_simulation_completes_and_beats_zero_filled(uninterrupted) -> None:
    run_dir, log = uninterrupted
    data = read(run_dir)
    assert data["status"] == "completed" and len(data["rounds"]) == 3
    for site in data["sites"]:
        fed, zf = data["final"]["federated"][site], data["final"]["zero_filled"][site]
        assert fed["ssim"] > zf["ssim"] and fed["psnr"] > zf["psnr"], (site, fed, zf)
    assert "zero-filled" in log and "site2" in log  # the per-site table
    assert not list(Path(run_dir).glob(".flwr/local-superlink"))  # our SuperLink, not Flower's


# Every strategy's maths and its gain over zero-filled are tested in process
# (tests/test_app_federation.py, all six); through Ray, one server-mean strategy and one server
# optimiser (with Scaffold above) cover the message path and the process clean-up, which do not
# depend on the strategy (the other three cost about 4 CI minutes and tested nothing more).
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_simulation_per_strategy_completes_and_leaves_no_process(sites, tmp_path, strategy) -> None:
    extra = {"train.local-steps": 10}
    if strategy.startswith(("fedadam", "fedyogi", "fedadagrad")):
        extra["fedopt.eta"] = 3e-3
    proc, mark, log = _run(_config(sites, tmp_path, strategy, "run", extra), tmp_path)
    assert proc.returncode == 0, log
    _assert_no_leftovers(mark)
    data = read(tmp_path / "run")
    assert data["status"] == "completed" and data["config"]["strategy.name"] == strategy
    for site in data["sites"]:
        fed, zf = data["final"]["federated"][site], data["final"]["zero_filled"][site]
        assert fed["ssim"] > zf["ssim"] and fed["psnr"] > zf["psnr"], (site, fed, zf)


def test_ctrl_c_stops_everything_and_resume_gives_the_same_model(
    sites, tmp_path, uninterrupted
) -> None:
    config = _config(sites, tmp_path, "scaffold", "cut")
    mark = uuid.uuid4().hex
    proc = _start(config, tmp_path, mark)
    run_dir = tmp_path / "cut"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if checkpoint.load(run_dir).round >= 1:
                break
        except (FileNotFoundError, EOFError, RuntimeError, ValueError):
            pass
        time.sleep(0.3)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    assert _marked(mark)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "--resume" in out
    _assert_no_leftovers(mark)
    done = checkpoint.load(run_dir).round
    assert 1 <= done < 3

    proc, mark, log = _run(config, tmp_path, "--resume", str(run_dir))
    assert proc.returncode == 0, log
    _assert_no_leftovers(mark)
    data = read(run_dir)
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3]
    expected, got = _final(uninterrupted[0]), _final(run_dir)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_bad_config_fails_before_starting_anything(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('"train.lrr" = 0.1\n')
    mark = uuid.uuid4().hex
    proc = _start(bad, tmp_path, mark)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "train.lrr" in out and "train.lr" in out
    assert not tagged_pids(mark) and not _marked(mark)


def test_failed_run_exits_with_the_reason_and_leaves_no_process(sites, tmp_path) -> None:
    import shutil

    broken = tmp_path / "sites"
    shutil.copytree(sites, broken)
    for h5 in (broken / "site1" / "train").glob("*.h5"):
        h5.write_bytes(b"not an h5 file")
    flat = tiny_config(broken, tmp_path, {"strategy.name": "fedavg", "num-server-rounds": 1})
    flat.update({"run.name": "broken", "min-fit-clients": 3, "min-available-clients": 3})
    config = tmp_path / "broken.toml"
    config.write_text(to_toml(flat))
    proc, mark, log = _run(config, tmp_path)
    assert proc.returncode == 1, log
    _assert_no_leftovers(mark)
    status = read(tmp_path / "broken")["status"]
    assert status.startswith("failed: NotEnoughReplies") and "site1" in status, status
    assert "client error: data" in status  # the kind; file and field stay in the site log

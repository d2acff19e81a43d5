"""``flwr run .`` as a Flower user types it, and the expected-sites wait it relies on.

The slow test runs the README's command in the source checkout with an isolated ``FLWR_HOME``
and its own local-SuperLink ports, so it neither reuses nor disturbs a SuperLink the user has
running. Flower leaves that SuperLink (and its SuperExec / Ray processes) alive by design; the
test stops every process it caused (tagged environment + process groups, ``fedunroll.procs``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from fedunroll.procs import ProcessGroup
from recon.config import default_flat, parse_run_config
from server.federation import Federation

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --- the expected-sites wait follows the nodes that are there ---------------------------------
class _Grid:
    """``get_node_ids`` from a schedule of (seconds since start, node count)."""

    def __init__(self, schedule: list[tuple[float, int]]) -> None:
        self.schedule = schedule
        self.t0 = time.monotonic()

    def get_node_ids(self) -> list[int]:
        elapsed = time.monotonic() - self.t0
        count = [n for t, n in self.schedule if t <= elapsed][-1]
        return list(range(1, count + 1))


class _Strategy:
    """What the round loop reads of a strategy before any round: its site names."""

    def __init__(self) -> None:
        from strategies.flower import SiteNames

        self.sites = SiteNames()


def _wait(schedule: list[tuple[float, int]], settle: float, **flat: object) -> float:
    cfg = parse_run_config({**default_flat(), **flat})
    fed = Federation(_Grid(schedule), _Strategy(), cfg, Path("."), "uid")
    t0 = time.monotonic()
    fed.wait_for_expected_sites(poll=0.05, settle=settle)
    return time.monotonic() - t0


def test_wait_returns_once_every_expected_site_is_there() -> None:
    assert _wait([(0, 0), (0.2, 4)], settle=30) < 1.0


def test_wait_follows_a_smaller_federation() -> None:
    """Flower's default simulation has 2 SuperNodes for 4 sites: no node-wait-timeout wait."""
    took = _wait([(0, 0), (0.1, 2)], settle=0.5, **{"node-wait-timeout": 60.0})
    assert 0.5 <= took < 2.0


def test_wait_gives_a_late_site_the_settle_time() -> None:
    took = _wait([(0, 2), (0.4, 3), (0.8, 4)], settle=0.6)
    assert 0.75 <= took < 1.4  # returned when the 4th site came, not after 2 x settle


def test_wait_is_bounded_by_node_wait_timeout_below_min_available() -> None:
    took = _wait([(0, 1)], settle=0.1, **{"node-wait-timeout": 0.5, "min-available-clients": 2})
    assert 0.5 <= took < 1.5


# --- flwr run . ---------------------------------------------------------------------------------
def _readme_command() -> list[str]:
    """The ``flwr run .`` line of README.md's section on it (the test runs what users read)."""
    text = (ROOT / "README.md").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("flwr run . ")]
    assert lines, "README.md shows no `flwr run . ...` command"
    cmd = shlex.split(lines[0].split("#")[0])
    assert cmd[:3] == ["flwr", "run", "."]
    return cmd


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flwr_run_dot(tmp_path: Path) -> None:
    from fedunroll.simulate import free_port

    data = tmp_path / "data"
    out = tmp_path / "runs"
    sites = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"][
        "data.num-sites"
    ]
    tiny = {
        "num-server-rounds": 1,
        "train.local-steps": 1,
        "model.num-unrolls": 1,
        "model.cg-iters": 1,
        "model.unet-chans": 4,
        "data.root": str(data),
        "data.synth-size": 32,
        "data.synth-coils": 2,
        "data.synth-slices": 6,
        "run.out": str(out),
        "run.name": "flwr-run",
    }
    from recon.data import generate_sites

    generate_sites(data, n_sites=sites, n_slices=6, seed=0, matrix=32, overrides={"num_coils": 2})
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in tiny.items())
    cmd = [*_readme_command(), "--run-config", run_config]
    env = {
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),  # an activated venv
    }
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    log = tmp_path / "flwr-run.log"
    with ProcessGroup(env) as group, open(log, "w") as sink:
        t0 = time.monotonic()
        proc = group.start(
            [str(BIN / cmd[0]), *cmd[1:]], stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT
        )
        results = out / "flwr-run" / "results.json"
        try:
            while not results.exists() and time.monotonic() - t0 < 240:
                group.watch()  # remember the detached SuperLink and what it starts
                time.sleep(0.5)
            took = time.monotonic() - t0
            try:
                proc.wait(timeout=30)  # --stream ends with the run
            except subprocess.TimeoutExpired:
                pass
        finally:
            group.watch()
            left = group.stop()
    text = log.read_text()
    assert not left, f"processes left running: {left}"
    assert (ROOT / "pyproject.toml").read_bytes() == pyproject, "flwr run rewrote pyproject.toml"
    assert results.exists(), text[-4000:]
    res = json.loads(results.read_text())
    assert res["status"] == "completed", res.get("error")
    assert len(res["rounds"]) == 1
    assert sorted(res["rounds"][0]["train"]) == [f"site{k}" for k in range(sites)], text[-3000:]
    assert took < 90, f"flwr run . took {took:.0f} s (a node-wait-timeout wait?)"
    assert "default simulated SuperNodes" not in text or f"({sites} simulated" in text


# --- fedunroll simulate keeps third-party noise out of the terminal -----------------------------
def test_pump_keeps_quiet_lines_out_of_the_terminal_only() -> None:
    import io

    from fedunroll.simulate import _pump

    src = io.StringIO(
        "INFO: round 1/1 done\n"
        "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from "
        "10 to 2.\n"
        "WARNING: starting with 2 of 4 expected sites\n"
    )
    log, term = io.StringIO(), io.StringIO()
    _pump(src, [log, term], (term,))
    assert log.getvalue().count("\n") == 3
    assert term.getvalue() == "INFO: round 1/1 done\nWARNING: starting with 2 of 4 expected sites\n"


def test_child_warnings_silence_rays_tip_but_not_our_warnings() -> None:
    from fedunroll.simulate import child_warnings

    code = (
        "import warnings\n"
        "warnings.warn_explicit('Tip: Ray', FutureWarning, 'worker.py', 1, "
        "module='ray._private.worker')\n"
        "warnings.warn_explicit('ours', FutureWarning, 'cli.py', 1, module='fedunroll.cli')\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": child_warnings({})}
    err = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stderr
    assert "ours" in err and "Tip: Ray" not in err
    # the user's own filter comes last and wins
    env["PYTHONWARNINGS"] = child_warnings({"PYTHONWARNINGS": "always::FutureWarning"})
    err = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stderr
    assert "Tip: Ray" in err

"""``fedunroll simulate`` on an existing Ray cluster of two nodes (``sim.ray-address``).

The cluster is started here the way an operator would, with ``ray start --head`` and ``ray start
--address`` (two nodes on localhost, one CPU each, a private ``--temp-dir``), inside a
:class:`fedunroll.procs.ProcessGroup`, so every Ray daemon carries this test's token and is
stopped afterwards without ``ray stop`` (which would take down every Ray instance of the user).
While the run goes on, the test lists the ``ray::ClientAppActor`` processes in /proc: the
simulated sites must run under both nodes' raylets. The run must leave the cluster as it found
it (both raylets alive), and without ``sim.ray-address`` a run must not join this cluster even
though ``RAY_ADDRESS`` points at it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_app_support import tiny_config, tiny_sites

from fedunroll.procs import ProcessGroup, descendants, tagged_pids
from fedunroll.simulate import free_port, to_toml
from server.results import read

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc"),
]
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
STORE = str(80 * 1024 * 1024)  # object store per node: the models travel through the SuperLink


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[int | None, int | None]:
    """(parent PID, start time) of a live, non-zombie ``pid``; (None, None) if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (None, None) if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def _raylets(token: str) -> list[int]:
    return sorted(p for p in tagged_pids(token) if "raylet/raylet " in _cmdline(p))


def _alive_nodes(address: str) -> int:
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR', "
        "log_to_driver=False); print(sum(1 for n in ray.nodes() if n['Alive'])); ray.shutdown()"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )
    lines = out.stdout.split()
    return int(lines[-1]) if out.returncode == 0 and lines else 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, ProcessGroup]]:
    """A two-node Ray cluster on localhost: (GCS address, the group owning its processes)."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are bounded
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    common += ["--object-store-memory", STORE]
    with ProcessGroup(ENV) as group:
        head = [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false"]
        for cmd in (
            head + [f"--temp-dir={temp}", *common],
            [RAY, "start", f"--address={address}", *common],
        ):
            proc = group.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out[-2000:]
        deadline = time.monotonic() + 60
        while _alive_nodes(address) < 2:
            assert time.monotonic() < deadline, "the second Ray node did not join the head"
            time.sleep(1)
        assert len(_raylets(group.token)) == 2
        agents = descendants(_raylets(group.token))  # started without the token in their env
        yield address, group
    assert not group.alive(), "Ray processes outlived the test's cluster"
    shutil.rmtree(temp, ignore_errors=True)  # the cluster's logs and sockets
    left = [pid for pid, start in agents.items() if _stat(pid)[1] == start]
    assert not left, (
        f"the raylets' agents outlived the cluster: {[_cmdline(p).strip() for p in left]}"
    )


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sites(tmp_path_factory, 4)


def _simulate(config: Path, out: Path, env: dict[str, str]) -> tuple[int, str, set[int]]:
    """Run ``fedunroll simulate``; returns (exit code, output, PIDs of the ClientApp actors'
    parents seen in /proc while it ran)."""
    cmd = [sys.executable, "-m", "fedunroll.cli", "simulate", "--config", str(config)]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--quiet"],
        cwd=ROOT,
        env={**os.environ, **ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    parents: set[int] = set()
    output: list[str] = []
    reader = threading.Thread(
        target=lambda: output.append(proc.stdout.read() if proc.stdout else "")
    )
    reader.start()
    while proc.poll() is None:
        for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
            if _cmdline(pid).startswith("ray::ClientAppActor"):
                parent = _stat(pid)[0]
                if parent is not None:
                    parents.add(parent)
        time.sleep(0.2)
    reader.join(timeout=30)
    return proc.returncode, "".join(output), parents


def _config(sites: Path, tmp: Path, name: str, address: str) -> Path:
    flat = tiny_config(sites, tmp, {"strategy.name": "fedavg", "num-server-rounds": 2})
    flat.update({"run.name": name, "train.local-steps": 4, "sim.ray-address": address})
    path = tmp / f"{name}.toml"
    path.write_text(to_toml(flat))
    return path


def test_simulation_runs_its_sites_on_both_nodes_of_an_existing_cluster(
    cluster, sites, tmp_path
) -> None:
    address, group = cluster
    raylets = _raylets(group.token)
    rc, log, parents = _simulate(_config(sites, tmp_path, "on-cluster", address), tmp_path, {})
    assert rc == 0, log[-3000:]
    assert f"on the cluster at {address}" in log
    results = read(tmp_path / "on-cluster")
    assert results["status"] == "completed"
    assert [sorted(r["train"]) for r in results["rounds"]] == [[f"site{k}" for k in range(4)]] * 2
    # one actor per node (1 CPU each, sim.client-cpus = 1): the sites ran on both machines
    assert parents & set(raylets) == set(raylets), (parents, raylets)
    # the run leaves the operator's cluster running, and nothing of its own behind
    assert _raylets(group.token) == raylets
    assert _alive_nodes(address) == 2


def test_without_ray_address_a_run_starts_its_own_ray_even_if_ray_address_is_set(
    cluster, sites, tmp_path
) -> None:
    address, group = cluster
    raylets = set(_raylets(group.token))
    rc, log, parents = _simulate(
        _config(sites, tmp_path, "private", ""), tmp_path, {"RAY_ADDRESS": address}
    )
    assert rc == 0, log[-3000:]
    assert "RAY_ADDRESS is set but ignored" in log
    assert parents and not parents & raylets  # its actors ran under a raylet of its own


def test_a_wrong_ray_address_fails_before_anything_starts(sites, tmp_path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    rc, log, _ = _simulate(_config(sites, tmp_path, "nowhere", dead), tmp_path, {})
    assert rc != 0
    assert f"sim.ray-address {dead}: no Ray cluster answers there" in log
    assert not (tmp_path / "nowhere").exists()

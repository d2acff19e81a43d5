"""``docker compose up`` for real: 3 hospital containers, TLS + node keys, 2 small rounds.

Needs a Docker engine. Skipped when none is reachable, unless ``FEDUNROLL_REQUIRE_DOCKER=1``
(CI: ``deploy/ci-docker.sh`` makes one reachable and builds the image), which turns the skip
into a failure. The image is (re)built from a staged context unless
``FEDUNROLL_DOCKER_REUSE_IMAGE=1`` and it exists (the build is layer-cached: seconds when nothing
changed).

One compose project (unique name, its own volumes and certificates):

1. ``up -d`` with SITES=3, MIN_SITES=2, ROUNDS=2: every site trains in round 1;
2. right after round 1, ``kill site2``: the run still completes with the two others (bounded by
   ROUND_TIMEOUT), site2 being rejected or absent in round 2;
3. ``start site2`` and a second, 1-round run: site2 rejoins (same key, same volume);
4. ``down -v``: no container or volume of the project is left.

Wall time, image size and the participation log lines go to ``$FEDUNROLL_DOCKER_REPORT``
(default: the test's tmp folder, ``docker-report.json`` / ``compose.log``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]
ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("FEDUNROLL_IMAGE", "fedunroll:latest")
REQUIRE = os.environ.get("FEDUNROLL_REQUIRE_DOCKER", "") == "1"
ROUND_TIMEOUT = 90  # s: bound on waiting for a killed site's reply
RUN_TIMEOUT = 900  # s: bound on one run


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"FEDUNROLL_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


def _sh(cmd: list[str], timeout: float = 120, check: bool = True, **kw) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT, **kw
    )
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    return out


def _engine() -> None:
    if not shutil.which("docker"):
        _unavailable("no docker client on PATH")
    try:
        ok = subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        _unavailable("no Docker engine reachable (docker info failed)")


def _compose_cmd() -> list[str]:
    try:
        if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
            return ["docker", "compose"]
    except OSError:
        pass
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    _unavailable("neither `docker compose` nor `docker-compose` is installed")
    raise AssertionError  # unreachable


def _image(tmp: Path) -> dict[str, float]:
    """Build (cached) or reuse the image; returns timings."""
    reuse = os.environ.get("FEDUNROLL_DOCKER_REUSE_IMAGE", "") == "1"
    exists = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True)
    if reuse and exists.returncode == 0:
        return {"build": 0.0}
    base = os.environ.get("BASE_IMAGE", "fedunroll-base:bookworm")
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True).returncode:
        base = "python:3.11-slim"
    t0 = time.monotonic()
    ctx = tmp / "context"
    _sh(["bash", str(ROOT / "deploy/stage-context.sh"), str(ctx)])
    _sh(
        ["docker", "build", "-q", "--build-arg", f"BASE_IMAGE={base}", "-t", IMAGE]
        + ["-f", str(ctx / "deploy/Dockerfile"), str(ctx)],
        timeout=1500,
    )
    shutil.rmtree(ctx, ignore_errors=True)
    return {"build": time.monotonic() - t0}


class Project:
    """One compose project with its own name, environment, certificates and volumes."""

    def __init__(self, tmp: Path) -> None:
        self.name = f"fedunroll-test-{uuid.uuid4().hex[:8]}"
        self.cmd = [*_compose_cmd(), "-p", self.name, "-f", str(ROOT / "docker-compose.yml")]
        self.tls = tmp / "tls"
        self.tls.mkdir()
        self.env = {
            **os.environ,
            "FEDUNROLL_IMAGE": IMAGE,
            "FEDUNROLL_TLS_DIR": str(self.tls),
            "SITES": "3",
            "MIN_SITES": "2",
            "ROUNDS": "2",
            "LOCAL_STEPS": "3",
            "RUN_NAME": "compose-test",
            "ROUND_TIMEOUT": str(ROUND_TIMEOUT),
            "NODE_WAIT_TIMEOUT": "120",
            "SYNTH_SLICES": "15",
        }

    def __call__(self, *args: str, timeout: float = 180, check: bool = True) -> str:
        return _sh([*self.cmd, *args], timeout=timeout, check=check, env=self.env)

    def container(self, service: str) -> str:
        out = _sh(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.name}"]
            + ["--filter", f"label=com.docker.compose.service={service}"]
        )
        ids = out.split()
        assert ids, f"no container for {service}"
        return ids[0]

    def state(self, service: str) -> tuple[str, int]:
        out = _sh(
            ["docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}"]
            + [self.container(service)]
        )
        status, code = out.split()
        return status, int(code)

    def logs(self, *services: str) -> str:
        return self("logs", "--no-color", *services, check=False)

    def results(self, run_name: str) -> dict:
        out = _sh(
            ["docker", "run", "--rm", "-v", f"{self.name}_results:/results:ro"]
            + ["--entrypoint", "cat", IMAGE, f"/results/{run_name}/results.json"]
        )
        return json.loads(out)

    def leftovers(self) -> str:
        label = f"label=com.docker.compose.project={self.name}"
        containers = _sh(["docker", "ps", "-aq", "--filter", label])
        volumes = _sh(["docker", "volume", "ls", "-q", "--filter", label])
        return (containers + volumes).strip()


def _wait_exit(project: Project, service: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, code = project.state(service)
        if status in ("exited", "dead"):
            return code
        time.sleep(2)
    raise AssertionError(f"{service} still running after {timeout} s:\n{project.logs()[-6000:]}")


def _participation(log: str) -> list[str]:
    keys = ("[fedunroll run]", "Activated node_id", "registered site", "rejected", "killed")
    return [line for line in log.splitlines() if any(k in line for k in keys)]


@pytest.fixture(scope="module")
def compose_run(tmp_path_factory):
    _engine()
    tmp = tmp_path_factory.mktemp("docker")
    report_dir = Path(os.environ.get("FEDUNROLL_DOCKER_REPORT", tmp))
    report_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    timings = _image(tmp)
    project = Project(tmp)
    out: dict = {"project": project, "timings": timings}
    try:
        t_up = time.monotonic()
        project("up", "-d", timeout=600)
        # Kill site2 as soon as round 1 is done: round 2 is then sent to a dead site.
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            if "round 1/2 done" in project.logs("superexec", "run"):
                break
            status, _ = project.state("run")
            assert status == "running", f"run ended before round 1:\n{project.logs()[-8000:]}"
            time.sleep(2)
        else:
            raise AssertionError(f"round 1 not done in {RUN_TIMEOUT} s:\n{project.logs()[-8000:]}")
        timings["up->round 1"] = time.monotonic() - t_up
        project("kill", "site2")
        t_kill = time.monotonic()
        out["run_rc"] = _wait_exit(project, "run", RUN_TIMEOUT)
        timings["kill->run end"] = time.monotonic() - t_kill
        timings["up->run end"] = time.monotonic() - t_up
        out["results"] = project.results("compose-test")
        out["log"] = project.logs()

        # The killed site rejoins a later run (same key and volume, new container start).
        t_rejoin = time.monotonic()
        project("start", "site2")
        out["rejoin_out"] = project(
            "run",
            "--rm",
            "-e",
            "RUN_NAME=compose-rejoin",
            "-e",
            "ROUNDS=1",
            "-e",
            "MIN_SITES=3",
            "run",
            timeout=RUN_TIMEOUT,
            check=False,
        )
        out["rejoin"] = project.results("compose-rejoin")
        timings["rejoin run"] = time.monotonic() - t_rejoin
        out["log"] = project.logs()
    finally:
        (report_dir / "compose.log").write_text(project.logs())
        t_down = time.monotonic()
        project("down", "-v", "--remove-orphans", "-t", "5", timeout=300, check=False)
        timings["down"] = time.monotonic() - t_down
        out["left"] = project.leftovers()
    timings["total"] = time.monotonic() - t0
    size = _sh(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE]).strip()
    report = {
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "image": IMAGE,
        "image_bytes": int(size),
        "participation": _participation(out.get("log", "")),
    }
    (report_dir / "docker-report.json").write_text(json.dumps(report, indent=1))
    print("\ndocker compose report:", json.dumps(report, indent=1))
    yield out


SITES = ["site0", "site1", "site2"]


def test_every_site_takes_part_then_the_run_survives_a_killed_site(compose_run) -> None:
    res = compose_run["results"]
    assert compose_run["run_rc"] == 0, compose_run["log"][-8000:]
    assert res["status"] == "completed", res["status"]
    assert res["sites"] == SITES
    first, second = res["rounds"]
    assert sorted(first["train"]) == SITES, first
    # eval-mode "piggyback" (the default): round 1's global model is evaluated by the sites at
    # the start of round 2 and its metrics ride on their round-2 train replies, so the killed
    # site2 has no round-1 evaluation; the last round is evaluated by its own messages.
    assert sorted(first["eval"]) == ["site0", "site1"], first
    # Round 2: site2 was killed; the two others carried the round.
    assert sorted(second["train"]) == ["site0", "site1"], second
    assert sorted(second["eval"]) == ["site0", "site1"], second
    assert set(res["final"]["federated"]) == {"site0", "site1"}


def test_the_killed_site_rejoins_a_later_run(compose_run) -> None:
    res = compose_run["rejoin"]
    assert res["status"] == "completed", compose_run["rejoin_out"][-6000:]
    (only,) = res["rounds"]
    assert sorted(only["train"]) == SITES, only


def test_tls_and_node_auth_were_on(compose_run) -> None:
    log = compose_run["log"]
    assert "insecure mode" not in log
    assert log.count("registered site") >= 3 or "already registered" in log
    assert "Activated node_id" in log or "SuperNode ID" in log


def test_nothing_is_left_after_down(compose_run) -> None:
    assert not compose_run["left"], compose_run["left"]

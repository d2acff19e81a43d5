"""A real Flower deployment on loopback, without Docker: 10 sites, TLS, node keys, 4 per round.

SuperLink + 10 SuperNodes as processes on free ports, the CA and server certificate from
``deploy/tls/make-certs.sh``, one ECDSA P-384 key per site from ``deploy/keys/make-node-keys.sh``
registered with ``flwr supernode register`` (the 10 registrations run concurrently, then the 10
SuperNodes start at once, each in Flower's default ``subprocess`` isolation: a SuperExec per
SuperNode, a ClientApp process per message). An eleventh SuperNode with an unregistered key must
be refused. The real app then runs 2 small rounds through ``flwr run`` with partial
participation: ``min-available-clients = 10`` (the run waits for every site),
``sites-per-round = 4`` (= ``min-fit-clients``: every sampled site must reply) and
``round-grace = 0``, so each round trains exactly 4 distinct registered sites, and the final
evaluation covers what ``final-eval-sites`` says (0: every site up to 32, i.e. all 10). The
sites are ``tiny_sites`` (32 px, 4 coils, 20 slices, coil maps cached). No process may outlive
the test (process groups + an environment token, :mod:`fedunroll.procs`).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_app_support import tiny_config, tiny_sites

from fedunroll.procs import ProcessGroup
from fedunroll.simulate import free_port, to_toml
from recon.config import parse_run_config
from server.results import read

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc"),
]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = 10
PER_ROUND = 4
ROUNDS = 2
NAMES = [f"site{k}" for k in range(SITES)]
CONNECTION = "deploy"
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}


def _exe(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return str(path)


def _wait_tls_health(port: int, ca: Path, proc: subprocess.Popen, log: Path, timeout=60.0):
    import httpx

    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"superlink exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"https://127.0.0.1:{port}/health", verify=ctx, timeout=1).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"superlink not healthy in {timeout} s:\n{log.read_text()[-3000:]}")


def _flwr(args: list[str], env: dict[str, str], timeout: float = 60) -> str:
    proc = subprocess.run(
        [_exe("flwr"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"flwr {' '.join(args)} failed ({proc.returncode}):\n{out}"
    return out


def _supernode(
    group: ProcessGroup, port: int, ca: Path, key: Path, site: Path | None, log: Path
) -> subprocess.Popen:
    node_config = f'data-path="{site}" site-id="{site.name}" device="cpu"' if site else "x=0"
    cmd = [
        _exe("flower-supernode"),
        "--superlink",
        f"127.0.0.1:{port}",
        "--root-certificates",
        str(ca),
        "--auth-supernode-private-key",
        str(key),
        "--port",
        str(free_port()),
        "--node-config",
        node_config,
    ]
    return group.start(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=log.parent)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Run the whole deployment once; yields the run dir, logs, outcomes and timings."""
    t0 = time.monotonic()
    sites = tiny_sites(tmp_path_factory, SITES)
    t_sites = time.monotonic() - t0
    tmp = tmp_path_factory.mktemp("deploy")
    logs = tmp / "logs"
    logs.mkdir()
    tls, keys = tmp / "tls", tmp / "keys"
    subprocess.run(["bash", str(ROOT / "deploy/tls/make-certs.sh"), str(tls)], check=True)
    subprocess.run(
        ["bash", str(ROOT / "deploy/keys/make-node-keys.sh"), str(SITES), str(keys)], check=True
    )
    subprocess.run(
        ["bash", str(ROOT / "deploy/keys/make-node-keys.sh"), "--name", "rogue", str(keys)],
        check=True,
    )
    ca = tls / "ca.crt"

    port = free_port()
    flwr_home = tmp / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n'
    )
    # The SuperLink and SuperNodes spawn `flower-superexec` from PATH.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(flwr_home), "PATH": path}
    flat = tiny_config(
        sites,
        tmp / "runs",
        {
            "run.name": "deploy",
            "num-server-rounds": ROUNDS,
            "sites-per-round": PER_ROUND,
            "min-fit-clients": PER_ROUND,
            "min-available-clients": SITES,
            "round-grace": 0.0,  # wait for every sampled site (up to round-timeout)
            "eval-mode": "piggyback",  # the default: round r's evaluation rides on r + 1's train
            "node-wait-timeout": 120.0,
            "round-timeout": 180.0,
            "train.local-steps": 3,
            "strategy.name": "scaffold",
        },
    )
    cfg = parse_run_config(flat)  # the validation the app runs (sites-per-round bounds)
    run_config = tmp / "run_config.toml"
    run_config.write_text(to_toml(flat))
    timings: dict[str, float] = {"sites": t_sites}

    with ProcessGroup({**FLWR_ENV, "FLWR_HOME": str(flwr_home), "PATH": path}) as group:
        link_log = logs / "superlink.log"
        link = group.start(
            [
                _exe("flower-superlink"),
                "--ssl-ca-certfile",
                str(ca),
                "--ssl-certfile",
                str(tls / "server.crt"),
                "--ssl-keyfile",
                str(tls / "server.key"),
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                # Flower's in-memory state, not deploy/entrypoint.sh's `--database state.db`:
                # with a SQLite file, 10 SuperNodes polling a SuperLink starved of CPU (a loaded
                # 2-core CI machine) exceed SQLite's 5 s busy timeout ("database is locked"), a
                # push-object fails with 500 and the round loses its replies.
                "--disable-runtime-dependency-installation",
            ],
            stdout=link_log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
        _wait_tls_health(port, ca, link, link_log)
        with ThreadPoolExecutor(SITES) as pool:  # each `flwr` is ~1.5 s of CPU, mostly imports
            list(
                pool.map(
                    lambda name: _flwr(
                        ["supernode", "register", str(keys / f"{name}.pub"), CONNECTION], env
                    ),
                    NAMES,
                )
            )
        registered = _flwr(["supernode", "list", CONNECTION, "--format", "json"], env)
        timings["superlink+register"] = time.monotonic() - t0

        # all at once (Popen does not wait); the server waits for min-available-clients
        rogue = _supernode(group, port, ca, keys / "rogue", None, logs / "rogue.log")
        nodes = [
            _supernode(
                group, port, ca, keys / f"site{k}", sites / f"site{k}", logs / f"site{k}.log"
            )
            for k in range(SITES)
        ]
        t_run = time.monotonic()
        runner = group.start(
            [
                _exe("flwr"),
                "run",
                str(ROOT),
                CONNECTION,
                "--stream",
                "--run-config",
                str(run_config),
            ],
            stdout=(logs / "flwr-run.log").open("w"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 300
        while runner.poll() is None and time.monotonic() < deadline:
            group.watch()
            assert link.poll() is None, f"superlink died:\n{link_log.read_text()[-3000:]}"
            dead = [k for k, n in enumerate(nodes) if n.poll() is not None]
            assert not dead, (
                f"supernode(s) {dead} exited:\n" + (logs / f"site{dead[0]}.log").read_text()[-3000:]
            )
            time.sleep(0.5)
        timings["flwr run"] = time.monotonic() - t_run
        timings["run timed out"] = float(runner.poll() is None)
        rogue_rc = rogue.poll()
        group.watch()
        left = group.stop()
    timings["total"] = time.monotonic() - t0
    (logs / "timings.json").write_text(json.dumps(timings, indent=1))
    print(f"\nlocalhost deployment timings (s): {timings}")
    yield {
        "cfg": cfg,
        "run_dir": tmp / "runs" / "deploy",
        "logs": logs,
        "registered": registered,
        "rogue_rc": rogue_rc,
        "runner_rc": runner.returncode,
        "left": left,
        "group": group,
    }


def _log(d, name: str) -> str:
    return (d["logs"] / name).read_text(errors="replace")


def test_rounds_complete_with_partial_participation(deployment) -> None:
    """Each round trains 4 distinct registered sites (the two samples may coincide); round 1's
    evaluation rides on round 2's train replies, round 2's is its own sample of 4; the final
    evaluation covers ``final-eval-sites`` (all 10)."""
    run_log = _log(deployment, "flwr-run.log")
    assert deployment["runner_rc"] == 0, f"flwr run failed:\n{run_log[-4000:]}"
    res = read(deployment["run_dir"])
    assert res["status"] == "completed", res["status"]
    cfg = deployment["cfg"]
    assert cfg.federation.sites_per_round == PER_ROUND and cfg.data.num_sites == SITES
    assert len(res["rounds"]) == ROUNDS
    for r in res["rounds"]:
        assert len(r["train"]) == PER_ROUND, r["train"]  # dict keys: distinct sites
        assert set(r["train"]) <= set(NAMES), r["train"]
        assert len(r["eval"]) == PER_ROUND and set(r["eval"]) <= set(NAMES), r["eval"]
        assert not r["rejected"], r["rejected"]
    assert sorted(res["rounds"][0]["eval"]) == sorted(res["rounds"][1]["train"])
    # the server's own log line, streamed by `flwr run --stream`
    sampled = f"configure_train: sampled {PER_ROUND} of {SITES} nodes"
    assert run_log.count(sampled) == ROUNDS, run_log[-4000:]

    want = cfg.federation.final_eval_sites or (SITES if SITES <= 32 else 32)
    assert want == SITES
    assert sorted(res["final"]["federated"]) == NAMES
    assert res["final_summary"]["evaluated"] == want
    assert res["final_summary"]["num_sites"] == SITES
    assert res["sites"] == NAMES  # every site that trained, evaluated or took part in final
    assert (deployment["run_dir"] / "final_model.pt").is_file()
    assert (deployment["run_dir"] / "checkpoint.pt").is_file()


def test_unregistered_key_is_refused(deployment) -> None:
    """The SuperLink answers the rogue's activation with 412 and the rogue exits (code 305)."""
    log = _log(deployment, "rogue.log")
    assert deployment["rogue_rc"] not in (None, 0), f"the rogue SuperNode is still running:\n{log}"
    assert "Failed to activate SuperNode" in log, log
    link = _log(deployment, "superlink.log")
    assert "No SuperNode found with the given public key" in link
    assert link.count("Activated node_id=") == SITES  # the 10 registered sites, not the rogue


def test_registered_nodes_are_listed(deployment) -> None:
    out = deployment["registered"]
    nodes = json.loads(out[out.index("{") :])["nodes"]
    assert [n["status"] for n in nodes] == ["registered"] * SITES, nodes
    assert len({n["node-id"] for n in nodes}) == SITES, nodes


def test_no_process_left(deployment) -> None:
    assert not deployment["left"], f"left running: {deployment['left']}"
    assert not deployment["group"].alive()

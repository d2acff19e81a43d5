"""Hostile and broken sites, process side: a killed command, a live run, a dead site, a kill at
every phase of a round.

- SIGKILL of ``fedunroll simulate`` (no cleanup runs) leaves none of the processes it started
  alive a few seconds later: the parent-death signal and the watchdog of
  :mod:`fedunroll.procs` stop the SuperLink, SuperExec, the simulation and Ray. Processes are
  tracked by a marker in their environment (PIDs), never by name.
- ``--resume`` of a run whose ServerApp is alive is refused up front (``server.runlock``).
- A dead site costs a round the grace period, not ``round-timeout``; stale replies (to an
  earlier message) are dropped by the in-process grid and ignored by the round loop.
- A server SIGKILLed after sending train, while aggregating, while evaluating or while writing
  its checkpoint resumes (a new process, ``run.resume``) to the very same final arrays as an
  uninterrupted run, and the killed process's run lock does not block the resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from inprocess import InProcessGrid
from test_app_support import tiny_config, tiny_sites

from fedunroll.simulate import check_run_free, to_toml
from recon.config import parse_run_config
from server import checkpoint
from server.app import run_federation
from server.federation import GRACE_FLOOR, collect
from server.runlock import LOCK_FILE, RunInUseError, RunLock
from strategies.protocol import to_numpy, to_record

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
LINUX = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sites(tmp_path_factory)


# --- processes ----------------------------------------------------------------------------------
MARK = "FEDUNROLL_FAULTS_MARK"


def _marked(mark: str) -> dict[int, str]:
    """Live (non-zombie) processes whose environment holds ``MARK=mark``: pid -> command."""
    needle = f"{MARK}={mark}".encode()
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle in (p / "environ").read_bytes().split(b"\0"):
                stat = (p / "stat").read_text()
                if stat[stat.rindex(")") + 2] != "Z":
                    cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    out[int(p.name)] = cmd[:160]
        except OSError:
            continue
    return out


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan's zombie waits for an init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _cli(args: list[str], mark: str) -> subprocess.Popen[str]:
    env = {**os.environ, **FLWR_ENV, MARK: mark}
    return subprocess.Popen(
        [sys.executable, "-m", "fedunroll.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _round(run_dir: Path) -> int:
    try:
        return checkpoint.load(run_dir).round
    except (FileNotFoundError, EOFError, RuntimeError, ValueError):
        return 0


@pytest.mark.slow
@LINUX
def test_sigkill_of_simulate_leaves_no_process(root: Path, tmp_path: Path) -> None:
    flat = tiny_config(root, tmp_path, {"strategy.name": "fedavg", "num-server-rounds": 50})
    flat.update({"run.name": "killed", "train.local-steps": 2})
    config = tmp_path / "killed.toml"
    config.write_text(to_toml(flat))
    mark = uuid.uuid4().hex
    proc = _cli(["simulate", "--config", str(config), "--out", str(tmp_path), "--quiet"], mark)
    run_dir = tmp_path / "killed"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and _round(run_dir) < 1:
        time.sleep(0.3)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    started = _marked(mark)
    names = " ".join(started.values())
    for name in ("flower-superlink", "flower-superexec", "gcs_server", "raylet"):
        assert name in names, (name, started)  # the test sees what it must see die
    with pytest.raises(RunInUseError):  # the live run owns its directory
        check_run_free(run_dir)

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    killed_at = time.monotonic()
    while (left := _marked(mark)) and time.monotonic() - killed_at < 5.0:
        time.sleep(0.1)
    gone_after = time.monotonic() - killed_at
    assert not left, f"alive {gone_after:.1f} s after SIGKILL: {sorted(left.values())}"
    assert not [pid for pid in started if _running(pid)]  # by PID too, not only by marker
    done = _round(run_dir)
    time.sleep(3)
    assert _round(run_dir) == done  # nobody writes into the killed run any more
    check_run_free(run_dir)  # its lock died with it
    print(f"all {len(started)} processes gone {gone_after:.1f} s after SIGKILL")


@LINUX
def test_resume_of_a_live_run_is_refused_before_anything_starts(tmp_path: Path) -> None:
    run_dir = tmp_path / "live"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from server.runlock import RunLock; "
            f"RunLock({str(run_dir)!r}).acquire(); print('locked', flush=True); time.sleep(120)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        mark = uuid.uuid4().hex
        proc = _cli(["simulate", "--resume", str(run_dir), "--quiet"], mark)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2, out
        line = [x for x in out.splitlines() if "fedunroll simulate" in x]
        assert len(line) == 1 and f"in use by PID {holder.pid}" in line[0], out
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing written
        assert not _marked(mark)
        # the ServerApp itself refuses as well (a second run on the same directory)
        cfg = parse_run_config({"run.resume": str(run_dir)})
        with pytest.raises(RunInUseError, match=str(holder.pid)):
            run_federation(InProcessGrid({}, cfg.flat()), cfg)
    finally:
        holder.kill()
        holder.wait()
    check_run_free(run_dir)  # a dead holder blocks nobody


# --- the grace period -----------------------------------------------------------------------
def _echo(msg: Message, ctx: Context) -> Message | None:
    site = f"site{ctx.node_config['partition-id']}"
    metrics = {"num-examples": 4, "ssim": 0.5, "nrmse": 0.3, "psnr": 20.0}
    if msg.metadata.message_type == MessageType.TRAIN:
        metrics["train-loss"] = 0.5
    else:  # zero-filled metrics belong to evaluate replies only
        metrics.update({"zf-ssim": 0.4, "zf-nrmse": 0.4, "zf-psnr": 18.0})
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "config": ConfigRecord({"site-id": site})}
    )
    if msg.metadata.message_type == MessageType.TRAIN:
        content["arrays"] = to_record(to_numpy(msg.content["arrays"]))
    return Message(content, reply_to=msg)


def _dead(msg: Message, ctx: Context) -> Message | None:
    return None


def _msgs(grid: InProcessGrid) -> list[Message]:
    arrays = to_record({"w": np.zeros(3, np.float32)})
    return [
        Message(RecordDict({"arrays": arrays, "config": ConfigRecord()}), n, MessageType.TRAIN)
        for n in sorted(grid.clients)
    ]


def test_a_dead_site_costs_the_grace_period_not_the_round_timeout() -> None:
    delays = {10: 0.2, 11: 0.6, 12: 1.2}
    grid = InProcessGrid({10: _echo, 11: _echo, 12: _echo, 13: _dead}, {}, delay=delays)
    t0 = time.monotonic()
    got = collect(grid, _msgs(grid), 60.0, needed=2, grace=2.0)
    wall = time.monotonic() - t0
    assert sorted(got.reply_seconds) == [10, 11, 12] and got.missing == [13] == got.late
    last_live = max(got.reply_seconds.values())
    assert got.grace == pytest.approx(GRACE_FLOOR)  # 2 x median (~0.6 s) is under the floor
    # the wait ends one grace period after the needed replies (the 2nd, ~0.6 s), and no later
    # than the grace period after the last live reply plus a second
    assert wall < last_live + got.grace + 1.0, (wall, last_live, got.grace)
    assert wall >= sorted(got.reply_seconds.values())[1] + got.grace - 0.05
    assert wall < 60.0 / 4


def test_the_grace_period_scales_with_the_median_reply_time() -> None:
    delays = {10: 2.0, 11: 2.2, 12: 6.5}  # median ~2.1 s: grace 1.0 x that is under the floor
    grid = InProcessGrid({10: _echo, 11: _echo, 12: _echo}, {}, delay=delays)
    got = collect(grid, _msgs(grid), 60.0, needed=2, grace=1.0)
    assert got.grace == pytest.approx(GRACE_FLOOR)
    assert got.late == [12] and sorted(got.reply_seconds) == [10, 11]  # 6.5 > ~2.2 + 3
    grid = InProcessGrid({10: _echo, 11: _echo, 12: _echo}, {}, delay=delays)
    got = collect(grid, _msgs(grid), 60.0, needed=2, grace=2.5)
    assert got.grace is not None and got.grace > GRACE_FLOOR  # 2.5 x ~2.1 s
    assert got.missing == [] and sorted(got.reply_seconds) == [10, 11, 12]  # 6.5 < 2.2 + 5.3


def test_without_grace_or_needed_every_reply_is_awaited_up_to_the_timeout() -> None:
    grid = InProcessGrid({10: _echo, 11: _echo, 12: _dead}, {}, delay={11: 0.3})
    t0 = time.monotonic()
    got = collect(grid, _msgs(grid), 1.5, needed=1, grace=0.0)  # round-grace = 0: off
    assert time.monotonic() - t0 >= 1.5 and got.missing == [12] and got.late == []


def test_round_with_a_dead_site_ends_after_the_grace_period(root: Path, tmp_path: Path) -> None:
    flat = tiny_config(root, tmp_path, {"strategy.name": "fedavg", "num-server-rounds": 1})
    flat.update({"round-timeout": 60.0, "min-fit-clients": 2, "fraction-evaluate": 1.0})
    grid = InProcessGrid({10: _echo, 11: _echo, 12: _dead}, flat, delay={11: 0.5})
    res = run_federation(grid, parse_run_config(flat))
    assert res["status"] == "completed"
    r = res["rounds"][0]
    assert sorted(r["train"]) == ["site0", "site1"]
    reasons = [x["reason"] for x in r["rejected"]]
    assert len(reasons) == 2 and all("no reply within the grace period" in x for x in reasons)
    # train + evaluate: each waits ~0.5 s for the live replies, then the grace period
    assert r["seconds"] < 2 * (0.5 + GRACE_FLOOR + 1.0), r["seconds"]


# --- stale replies ----------------------------------------------------------------------------
def test_stale_replies_are_dropped_by_the_grid_and_ignored_by_the_round_loop() -> None:
    cache: dict[int, Message] = {}

    def replays(msg: Message, ctx: Context) -> Message | None:
        """Answers its first message, then repeats that (now stale) reply for ever."""
        if ctx.node_id not in cache:
            cache[ctx.node_id] = _echo(msg, ctx) or msg
        return cache[ctx.node_id]

    grid = InProcessGrid({10: _echo, 11: replays}, {})
    first = collect(grid, _msgs(grid), 5.0)
    assert sorted(first.reply_seconds) == [10, 11]
    second = collect(grid, _msgs(grid), 5.0, needed=1, grace=1.0)
    assert sorted(second.reply_seconds) == [10] and second.missing == [11]
    assert len(grid.dropped) == 1  # the grid never handed the stale reply out

    other = InProcessGrid({10: _echo}, {})
    stale = collect(other, _msgs(other), 5.0).pairs[0][0]  # a real reply, to another exchange

    class LeakyGrid(InProcessGrid):
        """A grid (a buggy or hostile link) that hands out a reply to an old message."""

        def pull_messages(self, message_ids: Any) -> list[Message]:
            return [*super().pull_messages(message_ids), stale]

    leaky = LeakyGrid({10: _echo, 11: _echo}, {})
    got = collect(leaky, _msgs(leaky), 5.0)
    assert sorted(got.reply_seconds) == [10, 11] and got.stale >= 1
    assert all(r is not stale for r, _ in got.pairs)


def test_a_replayed_reply_never_counts_in_a_later_round(root: Path, tmp_path: Path) -> None:
    cache: dict[int, Message] = {}

    def replays(msg: Message, ctx: Context) -> Message | None:
        if msg.metadata.message_type == MessageType.TRAIN:
            cache.setdefault(ctx.node_id, _echo(msg, ctx) or msg)
            return cache[ctx.node_id]
        return _echo(msg, ctx)

    flat = tiny_config(root, tmp_path, {"strategy.name": "fedavg", "num-server-rounds": 2})
    flat.update({"min-fit-clients": 1, "fraction-evaluate": 1.0})
    grid = InProcessGrid({10: _echo, 11: replays}, flat)
    res = run_federation(grid, parse_run_config(flat))
    assert res["status"] == "completed"
    assert sorted(res["rounds"][0]["train"]) == ["site0", "site1"]
    assert sorted(res["rounds"][1]["train"]) == ["site0"]  # round 1's reply is refused
    assert [x["site"] for x in res["rounds"][1]["rejected"]] == ["site1"]
    assert len(grid.dropped) == 1


# --- a server killed at each phase resumes to the same final arrays ------------------------
# Runs in a subprocess: an in-process federation (InProcessGrid + the real ClientApp +
# run_federation); FAULT_PHASE makes it SIGKILL itself at that phase of round FAULT_ROUND.
# The faults are monkeypatched in here; the product code has no fault switch.
WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from inprocess import InProcessGrid
    from client.app import app as client_app
    from recon import fileio
    from recon.config import parse_run_config
    from server import app as server_app, checkpoint, federation

    flat = json.loads(os.environ["FAULT_CONFIG"])
    phase = os.environ.get("FAULT_PHASE", "")
    kill_round = int(os.environ.get("FAULT_ROUND", "0"))
    now = {{"round": 0}}

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    run_round = federation.Federation.run_round

    def tracked_round(self, progress):
        now["round"] = progress.round + 1
        return run_round(self, progress)

    federation.Federation.run_round = tracked_round
    hit = lambda name: phase == name and now["round"] == kill_round

    class Grid(InProcessGrid):
        def push_messages(self, messages):
            messages = list(messages)
            ids = super().push_messages(messages)
            if hit("train-sent") and messages[0].metadata.message_type == "train":
                die()  # the sites trained and replied (and saved their state); nothing else
            return ids

    def client(msg, ctx):
        if hit("evaluate") and msg.metadata.message_type == "evaluate":
            die()  # a site is evaluating the aggregated model
        return client_app(msg, ctx)

    build = server_app.strategy_from_config

    def strategy_from_config(cfg):
        strategy = build(cfg)
        aggregate = strategy.aggregate_train

        def aggregating(server_round, replies):
            out = aggregate(server_round, replies)
            if hit("aggregate"):
                die()  # the new global model exists in memory only
            return out

        strategy.aggregate_train = aggregating
        return strategy

    server_app.strategy_from_config = strategy_from_config
    save = checkpoint.atomic_torch_save

    def torn_save(obj, path):
        if hit("checkpoint"):
            import io
            buf = io.BytesIO()
            torch.save(obj, buf)
            with fileio.atomic_open(path) as f:  # half the bytes, never renamed into place
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                die()
        return save(obj, path)

    checkpoint.atomic_torch_save = torn_save
    cfg = parse_run_config(flat)
    grid = Grid({{10 + i: client for i in range(3)}}, flat)
    res = server_app.run_federation(grid, cfg)
    print(json.dumps({{"status": res["status"], "rounds": [r["round"] for r in res["rounds"]]}}))
    """
)
PHASES = ["train-sent", "aggregate", "evaluate", "checkpoint"]


def _worker(tmp: Path, flat: dict[str, Any], phase: str = "") -> subprocess.CompletedProcess[str]:
    script = tmp / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS)))
    env = {**os.environ, **FLWR_ENV, "FAULT_CONFIG": json.dumps(flat), "FAULT_PHASE": phase}
    env["FAULT_ROUND"] = "2"
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    sd = torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]
    return {k: v.numpy() for k, v in sd.items()}


@pytest.fixture(scope="module")
def uninterrupted(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    tmp = tmp_path_factory.mktemp("whole")
    flat = _fault_config(root, tmp, "whole")
    done = _worker(tmp, flat)
    assert done.returncode == 0, done.stdout + done.stderr
    return _final(tmp / "whole")


def _fault_config(root: Path, tmp: Path, name: str) -> dict[str, Any]:
    flat = tiny_config(root, tmp, {"strategy.name": "scaffold", "num-server-rounds": 3})
    flat.update({"run.name": name, "train.local-steps": 4})
    return flat


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_server_killed_at_each_phase_resumes_to_the_same_final_arrays(
    root: Path, tmp_path: Path, uninterrupted: dict[str, np.ndarray], phase: str
) -> None:
    flat = _fault_config(root, tmp_path, "cut")
    killed = _worker(tmp_path, flat, phase)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    run_dir = tmp_path / "cut"
    assert checkpoint.load(run_dir).round == 1  # round 2 never completed
    assert (run_dir / LOCK_FILE).is_file() and not (run_dir / "results.json").exists()
    with RunLock(run_dir):  # the dead server's lock is no lock
        pass

    resumed = _worker(tmp_path, {**flat, "run.resume": str(run_dir)})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary == {"status": "completed", "rounds": [1, 2, 3]}
    got = _final(run_dir)
    assert list(got) == list(uninterrupted)
    for k, v in uninterrupted.items():
        np.testing.assert_array_equal(got[k], v, err_msg=f"{phase}: {k}")  # bitwise

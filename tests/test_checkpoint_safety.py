"""Server checkpoints that survive a crash mid-write, and one owner per run directory."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from server import checkpoint
from server.checkpoint import CHECKPOINT, PREVIOUS, CheckpointError
from server.runlock import LOCK_FILE, RunInUseError, RunLock

MARKER = b"SECRET-PATIENT-BYTES"  # must never show up in a log line or an error


def _state(r: int) -> checkpoint.ServerState:
    return checkpoint.ServerState(
        round=r,
        arrays={"w": np.full(3, float(r), np.float32), "n": np.array(r, np.int64)},
        strategy={"strategy": "fedavg", "round": r, "m/w": np.zeros(3, np.float32)},
        run_uid="run-0001",
        config={"run.name": "x"},
        rounds=[{"round": i} for i in range(1, r + 1)],
        elapsed_seconds=1.5 * r,
        rng=checkpoint.rng_state(),
    )


@pytest.fixture
def warnings_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="flwr")
    return caplog


def _two_rounds(run: Path) -> None:
    checkpoint.save(run, _state(1))
    checkpoint.save(run, _state(2))


def _raw(**fields: object) -> dict[str, object]:
    return {"version": checkpoint.VERSION, **_state(2).__dict__, **fields}


# --- keeping the previous checkpoint ----------------------------------------------------------


def test_previous_checkpoint_exists_after_two_saves(tmp_path):
    checkpoint.save(tmp_path, _state(1))
    assert (tmp_path / CHECKPOINT).is_file() and not (tmp_path / PREVIOUS).exists()
    checkpoint.save(tmp_path, _state(2))
    assert checkpoint.load(tmp_path).round == 2
    prev = torch.load(tmp_path / PREVIOUS, weights_only=False)
    assert prev["round"] == 1
    checkpoint.save(tmp_path, _state(3))
    assert torch.load(tmp_path / PREVIOUS, weights_only=False)["round"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [CHECKPOINT, PREVIOUS]
    )  # no temp files
    assert checkpoint.exists(tmp_path)


def test_previous_checkpoint_is_copied_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    _two_rounds(tmp_path)
    assert torch.load(tmp_path / PREVIOUS, weights_only=False)["round"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, PREVIOUS])


def test_a_save_killed_mid_write_leaves_both_checkpoints(tmp_path, monkeypatch):
    _two_rounds(tmp_path)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the server killed in the middle of writing round 3

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, _state(3))
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.load(tmp_path).round == 2
    assert torch.load(tmp_path / PREVIOUS, weights_only=False)["round"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, PREVIOUS])


# --- falling back on load ---------------------------------------------------------------------


def test_truncated_latest_falls_back_to_previous_with_a_warning(tmp_path, warnings_log):
    _two_rounds(tmp_path)
    latest = tmp_path / CHECKPOINT
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    state = checkpoint.load(tmp_path)
    assert state.round == 1 and state.run_uid == "run-0001"
    np.testing.assert_array_equal(state.arrays["w"], np.ones(3, np.float32))
    text = warnings_log.text
    assert str(latest) in text and "cannot be read" in text and str(tmp_path / PREVIOUS) in text
    assert all(r.levelno == logging.WARNING for r in warnings_log.records)


@pytest.mark.parametrize(
    "content",
    [b"", MARKER * 100, b"\x80\x04" + MARKER, b"PK\x03\x04" + MARKER],
    ids=["empty", "text", "pickle-prefix", "zip-prefix"],
)
def test_garbage_latest_falls_back_to_previous(tmp_path, warnings_log, content):
    _two_rounds(tmp_path)
    (tmp_path / CHECKPOINT).write_bytes(content)
    assert checkpoint.load(tmp_path).round == 1
    assert str(tmp_path / CHECKPOINT) in warnings_log.text
    assert MARKER.decode() not in warnings_log.text


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ({"version": 99}, "field 'version': expected 1, got 99"),
        ({"version": "v" + MARKER.decode()}, "got a str"),
        ({"arrays": {"w": np.array([1.0, np.nan], np.float32)}}, "arrays['w'] holds non-finite"),
        ({"strategy": {"m/w": np.array([np.inf])}}, "strategy['m/w'] holds non-finite"),
        ({"round": "2"}, "field 'round'"),
        ({"unexpected": 1}, "unknown field(s) ['unexpected']"),
    ],
)
def test_invalid_latest_falls_back_to_previous(tmp_path, warnings_log, raw, why):
    _two_rounds(tmp_path)
    torch.save(_raw(**raw), tmp_path / CHECKPOINT)
    assert checkpoint.load(tmp_path).round == 1
    assert why in warnings_log.text
    assert MARKER.decode() not in warnings_log.text


def test_missing_fields_and_non_dicts_fall_back(tmp_path, warnings_log):
    _two_rounds(tmp_path)
    raw = _raw()
    del raw["arrays"], raw["run_uid"]
    torch.save(raw, tmp_path / CHECKPOINT)
    assert checkpoint.load(tmp_path).round == 1
    assert "missing field(s) ['arrays', 'run_uid']" in warnings_log.text
    torch.save([1, 2, 3], tmp_path / CHECKPOINT)
    assert checkpoint.load(tmp_path).round == 1
    assert "holds a list" in warnings_log.text


def test_missing_latest_uses_previous(tmp_path, warnings_log):
    _two_rounds(tmp_path)
    (tmp_path / CHECKPOINT).unlink()
    assert checkpoint.load(tmp_path).round == 1
    assert "does not exist" in warnings_log.text


def test_both_bad_is_a_clear_error_naming_both_files(tmp_path):
    _two_rounds(tmp_path)
    latest, prev = tmp_path / CHECKPOINT, tmp_path / PREVIOUS
    latest.write_bytes(MARKER)
    torch.save(_raw(version=0), prev)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(tmp_path)
    msg = str(info.value)
    assert str(latest) in msg and str(prev) in msg
    assert "cannot be read" in msg and "field 'version'" in msg
    assert MARKER.decode() not in msg
    assert isinstance(info.value, ValueError)  # callers that caught ValueError still do


def test_bad_latest_without_previous_is_an_error(tmp_path):
    checkpoint.save(tmp_path, _state(1))
    (tmp_path / CHECKPOINT).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=f"{PREVIOUS}: does not exist"):
        checkpoint.load(tmp_path)


def test_no_checkpoint_at_all_is_file_not_found(tmp_path):
    assert not checkpoint.exists(tmp_path)
    with pytest.raises(FileNotFoundError, match="no round completed"):
        checkpoint.load(tmp_path)


def test_a_good_latest_loads_without_a_warning(tmp_path, warnings_log):
    _two_rounds(tmp_path)
    state = checkpoint.load(tmp_path)
    assert state.round == 2 and state.elapsed_seconds == 3.0 and len(state.rounds) == 2
    assert warnings_log.records == []


# --- run-directory lock -----------------------------------------------------------------------

HOLDER = """
import sys, time
from server.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(run: Path) -> subprocess.Popen[str]:
    """A subprocess that owns ``run``; returns once it holds the lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        proc.wait()
        pytest.fail(f"lock holder did not start (exit code {proc.poll()})")
    return proc


def test_lock_held_by_a_live_process_is_refused_with_its_pid(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunInUseError) as info:
            RunLock(tmp_path).acquire()
        msg = str(info.value)
        assert f"in use by PID {proc.pid}" in msg and "--resume" in msg and "refused" in msg
        assert info.value.pid == proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_lock_of_a_sigkilled_process_is_acquired(tmp_path):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert (tmp_path / LOCK_FILE).is_file()  # the stale file is there, its lock is not
    with RunLock(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not lock.held


def test_lock_in_one_process(tmp_path):
    run = tmp_path / "new-run"  # created on acquire
    first = RunLock(run).acquire()
    with pytest.raises(RunInUseError, match=f"PID {os.getpid()}"):
        RunLock(run).acquire()
    first.release()
    first.release()  # idempotent
    with RunLock(run):
        pass
    lock = RunLock(run).acquire()
    with pytest.raises(RuntimeError, match="already held"):
        lock.acquire()
    lock.release()
    assert checkpoint.RunLock is RunLock  # re-exported next to the checkpoint

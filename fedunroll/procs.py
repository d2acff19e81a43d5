"""Start helper processes so that none of them, nor anything they spawn, outlives us.

Flower's SuperLink starts its SuperExec with ``start_new_session=True`` and Ray starts its GCS,
raylet and workers in their own sessions, so killing our children's process groups is not
enough. Every process started here gets a unique token in its environment (inherited by all
its descendants, Ray workers included); :meth:`ProcessGroup.stop` terminates the process
groups, then every live process whose environment carries the token (Linux ``/proc``), then any
descendant seen while running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

TOKEN_VAR = "FEDUNROLL_PROC_TOKEN"
_PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of ``pid`` from /proc, or None if gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[19])


def _pids() -> list[int]:
    try:
        return [int(p.name) for p in _PROC.iterdir() if p.name.isdigit()]
    except OSError:
        return []


def tagged_pids(token: str) -> list[int]:
    """Live processes (zombies excluded) whose environment holds ``TOKEN_VAR=token``."""
    needle = f"{TOKEN_VAR}={token}".encode()
    me = os.getpid()
    out = []
    for pid in _pids():
        if pid == me:
            continue
        try:
            env = (_PROC / str(pid) / "environ").read_bytes()
            state = (_PROC / str(pid) / "stat").read_text()
        except OSError:
            continue
        if needle in env.split(b"\0") and state[state.rindex(")") + 2] != "Z":
            out.append(pid)
    return out


def descendants(roots: Iterable[int]) -> dict[int, int]:
    """``{pid: start time}`` of every live descendant of ``roots`` (roots excluded)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for pid in _pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(pid)
            starts[pid] = st[1]
    out: dict[int, int] = {}
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out and child in starts:
                out[child] = starts[child]
                stack.append(child)
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ProcessGroup:
    """Children started in their own sessions, tagged, and always stopped together.

    Use as a context manager; :meth:`stop` is idempotent and also runs on exceptions and
    ``KeyboardInterrupt``.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.token = uuid.uuid4().hex
        self.env = {**os.environ, **dict(env or {}), TOKEN_VAR: self.token}
        self.procs: list[subprocess.Popen[Any]] = []
        self.seen: dict[int, int] = {}  # pid -> start time of every descendant observed

    def start(
        self,
        cmd: Sequence[str],
        *,
        stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None,
        cwd: str | os.PathLike[str] | None = None,
        text: bool = False,
    ) -> subprocess.Popen[Any]:
        """``Popen`` in a new session with the token in its environment."""
        proc = subprocess.Popen(  # noqa: S603
            list(cmd),
            env=self.env,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
            text=text,
        )
        self.procs.append(proc)
        return proc

    def watch(self) -> None:
        """Remember the current descendants (call now and then while they run)."""
        self.seen.update(descendants(p.pid for p in self.procs))

    def alive(self) -> list[int]:
        """Processes of this group still running (tagged or seen descendants)."""
        pids = set(tagged_pids(self.token))
        for pid, start in self.seen.items():
            st = _stat(pid)
            if st is not None and st[1] == start:
                pids.add(pid)
        pids.update(p.pid for p in self.procs if p.poll() is None)
        return sorted(pids)

    def stop(self, grace: float = 5.0) -> list[int]:
        """SIGTERM the groups, wait ``grace`` s, SIGKILL what is left; returns any leftovers."""
        self.watch()
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    _signal(proc.pid, signal.SIGTERM)
        for pid in self.alive():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.alive():
            for proc in self.procs:
                proc.poll()  # reap our direct children
            time.sleep(0.1)
        for _ in range(50):
            left = self.alive()
            if not left:
                break
            for pid in left:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                _signal(pid, signal.SIGKILL)
            for proc in self.procs:
                proc.poll()
            time.sleep(0.1)
        for proc in self.procs:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        return self.alive()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

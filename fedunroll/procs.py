"""Start helper processes so that none of them, nor anything they spawn, outlives us.

Flower's SuperLink starts its SuperExec with ``start_new_session=True`` and Ray starts its GCS,
raylet and workers in their own sessions, so killing our children's process groups is not
enough. Every process started here gets a unique token in its environment (inherited by all
its descendants, Ray workers included); :meth:`ProcessGroup.stop` terminates the process
groups, then every live process whose environment carries the token (Linux ``/proc``), then any
descendant seen while running.

A SIGKILL of the process that owns the group runs none of that, so two more guards stop the
children when it dies however it dies (Linux):

- every direct child gets a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``, set in
  the child before ``exec``): the kernel signals it when its parent dies;
- a watchdog process (``python -m fedunroll.procs --watchdog FD TOKEN``, in its own session, so
  Ctrl-C does not reach it) holds the read end of a pipe whose write end only the owner holds.
  It learns each child's PID through the pipe and snapshots their descendants twice a second;
  at end of file without the owner's ``done`` (the owner died) it terminates the children's
  process groups, every process carrying the token and every snapshotted descendant, then
  SIGKILLs what is left after 1 s. Processes that escaped the tree (Ray's GCS, raylet and
  workers start in sessions of their own and outlive the SuperLink) are found by the token.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

TOKEN_VAR = "FEDUNROLL_PROC_TOKEN"
_PROC = Path("/proc")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DONE = b"done\n"  # the owner stopped its children itself: the watchdog has nothing to do


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


def _pdeathsig(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks the kernel to SIGTERM the child when ``parent`` dies (Linux).

    The child exits at once if ``parent`` is already gone (it died between fork and prctl).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _same(pid: int, start: int) -> bool:
    """``pid`` is still the process that started at ``start`` (not a reused PID)."""
    st = _stat(pid)
    return st is not None and st[1] == start


def _kill_all(children: Mapping[int, int], token: str, seen: dict[int, int]) -> None:
    """Stop ``children`` (pid -> start time, each leading its own process group), every process
    tagged with ``token`` and the ``seen`` descendants: SIGTERM, 1 s, then SIGKILL (10 s max)."""

    def targets() -> list[int]:
        pids = set(tagged_pids(token))
        pids.update(p for p, t in {**seen, **children}.items() if _same(p, t))
        return sorted(pids)

    def hit(sig: int) -> None:
        for pid, start in children.items():
            if _same(pid, start):
                try:
                    os.killpg(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in targets():
            _signal(pid, sig)

    hit(signal.SIGTERM)
    deadline = time.monotonic() + 1.0
    while targets() and time.monotonic() < deadline:
        time.sleep(0.1)
    deadline = time.monotonic() + 10.0
    while targets() and time.monotonic() < deadline:
        hit(signal.SIGKILL)
        time.sleep(0.1)


def watchdog(fd: int, token: str, poll: float = 0.5) -> None:
    """Wait for the owner's death on pipe ``fd``, then stop everything it started.

    The owner writes one child PID per line, and ``done`` when it has stopped them itself.
    """
    children: dict[int, int] = {}
    seen: dict[int, int] = {}
    buf = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], poll)
            chunk = pipe.read(4096) if ready else None
            if ready and not chunk:
                break  # end of file: the owner is gone (or closed the pipe after "done")
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line == DONE.strip():
                        return
                    st = _stat(int(line)) if line.strip().isdigit() else None
                    if st is not None:
                        children[int(line)] = st[1]
            seen.update(descendants(p for p, t in children.items() if _same(p, t)))
    _kill_all(children, token, seen)


class ProcessGroup:
    """Children started in their own sessions, tagged, and always stopped together.

    Use as a context manager; :meth:`stop` is idempotent and also runs on exceptions and
    ``KeyboardInterrupt``. With ``watchdog`` (default), the children are also stopped when this
    process dies without running :meth:`stop` (SIGKILL, OOM killer): see the module doc.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, watchdog: bool = True) -> None:
        self.token = uuid.uuid4().hex
        self.env = {**os.environ, **dict(env or {}), TOKEN_VAR: self.token}
        self.procs: list[subprocess.Popen[Any]] = []
        self.seen: dict[int, int] = {}  # pid -> start time of every descendant observed
        self.use_watchdog = watchdog
        self.watchdog: subprocess.Popen[bytes] | None = None
        self._pipe: int | None = None  # write end of the watchdog's pipe

    def _start_watchdog(self) -> None:
        """The watchdog process (once, before the first child; Linux /proc only)."""
        if not self.use_watchdog or self.watchdog is not None or not _PROC.is_dir():
            return
        read, write = os.pipe()  # both non-inheritable: only the watchdog gets ``read``
        env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}
        try:
            self.watchdog = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "fedunroll.procs", "--watchdog", str(read), self.token],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(read,),
                start_new_session=True,
            )
        except OSError:
            os.close(write)
            raise
        finally:
            os.close(read)
        self._pipe = write

    def _tell_watchdog(self, data: bytes) -> None:
        if self._pipe is None:
            return
        try:
            os.write(self._pipe, data)
        except OSError:
            pass

    def _close_watchdog(self) -> None:
        """Tell the watchdog the children are stopped and let it exit."""
        if self._pipe is None:
            return
        self._tell_watchdog(DONE)
        os.close(self._pipe)
        self._pipe = None
        if self.watchdog is not None:
            try:
                self.watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()

    def start(
        self,
        cmd: Sequence[str],
        *,
        stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None,
        cwd: str | os.PathLike[str] | None = None,
        text: bool = False,
    ) -> subprocess.Popen[Any]:
        """``Popen`` in a new session with the token in its environment and a parent-death
        signal; the watchdog learns its PID.

        Call it from a thread that lives as long as the child (the main thread): Linux sends
        the parent-death signal when the thread that started the child exits.
        """
        self._start_watchdog()
        proc = subprocess.Popen(  # noqa: S603
            list(cmd),
            env=self.env,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_pdeathsig(os.getpid()),  # noqa: PLW1509 (no other threads run yet)
            text=text,
        )
        self.procs.append(proc)
        self._tell_watchdog(f"{proc.pid}\n".encode())
        return proc

    def watch(self) -> None:
        """Remember the current descendants (call now and then while they run): of our
        children, and of the processes carrying the token, whose own children may not carry it
        (a Ray raylet starts its dashboard and runtime-env agents with an environment of its
        own)."""
        self.seen.update(descendants([p.pid for p in self.procs] + tagged_pids(self.token)))

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
        left = self.alive()
        if not left:
            self._close_watchdog()
        return left

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--watchdog":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the owner's death ends it
        watchdog(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit("usage: python -m fedunroll.procs --watchdog FD TOKEN")

"""One owner per run directory: an advisory ``fcntl.flock`` on ``<run dir>/.lock``.

Two servers writing the same run directory would interleave checkpoints and results; a second
``--resume`` (``run.resume``) of a run whose server is still alive is the usual way to get there.
The owner holds an exclusive lock on ``.lock`` for as long as it runs and writes its PID into the
file, so a refused process can say who holds the run.

The kernel drops a ``flock`` when the last descriptor of its open file goes away, which includes
the death of the holder (SIGKILL, OOM killer, a crash): a stale ``.lock`` file never blocks a
later owner, and it is never deleted (deleting it would let two processes lock two different
files of the same name). The descriptor is not inherited by ``exec``'d children (PEP 446).
``flock`` is local to one machine; on NFS it may not exclude a process on another host.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_FILE = ".lock"


class RunInUseError(RuntimeError):
    """The run directory is locked by a live process."""

    def __init__(self, run_dir: Path, pid: int | None) -> None:
        who = f"PID {pid}" if pid is not None else "another process (its PID is not recorded yet)"
        super().__init__(
            f"run directory {run_dir} is in use by {who} (it holds {run_dir / LOCK_FILE}); "
            "starting or --resume (run.resume) of a live run is refused: stop that process "
            "first, or choose another run name"
        )
        self.run_dir = run_dir
        self.pid = pid


def _holder_pid(fd: int) -> int | None:
    """The PID the holder wrote into the lock file, if any."""
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class RunLock:
    """Exclusive, non-blocking ownership of a run directory (context manager).

    Usage::

        with RunLock(run_dir):
            ...  # rounds, checkpoints, results

    Parameters
    ----------
    run_dir : Path
        The run directory; created if missing.

    Raises
    ------
    RunInUseError
        From :meth:`acquire` / ``__enter__`` when a live process holds the lock (its PID is in
        the message). The same process locking the same directory twice is refused as well.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True between :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunInUseError`; records this process's PID."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this RunLock is already held")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _holder_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunInUseError(self.run_dir, pid) from None
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)  # closing releases the lock
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays; only the lock, not the file, matters."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

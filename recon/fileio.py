"""Atomic file writes: the one way fedunroll writes a file that someone else may be reading.

A file is written to a temporary name in its own folder, flushed to disk, then moved over the
target with ``os.replace`` (atomic on POSIX and Windows). A reader (a resumed run, another
site's worker, the report) sees the old file or the new one, never half of one; a writer that
fails or is killed leaves the old file and removes its temporary one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path next to ``path`` that replaces ``path`` when the block succeeds.

    For writers that need a file name (h5py). The parent folder is created; on an exception
    the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, atomically (flushed and fsynced before the replace)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any, indent: int = 2) -> Path:
    """Write ``data`` as indented JSON with a final newline, atomically; returns the path."""
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; returns the path."""
    import torch  # here: the rest of this module serves torch-free writers too

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
]

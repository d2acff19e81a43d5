"""Scratch files for one round's reply arrays, and sequences that load their items on demand.

Streaming aggregation (:class:`strategies.flower.TrainReplies`) writes each train reply's
arrays to disk as the reply arrives and reads them back one at a time when the round's bounds
are decided, so the server holds one reply's arrays at a time, not every sampled site's. A
scratch directory lives for one round and is removed when it closes, also on error; one left
by a killed server is named ``.aggregate-*`` (:data:`SCRATCH_PREFIX`) and may be deleted.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar, overload

import numpy as np

SCRATCH_PREFIX = ".aggregate-"
T = TypeVar("T")


class Scratch:
    """A temporary directory of array files (``.npy`` streams, one file per record).

    Parameters
    ----------
    parent : path, optional
        Where the directory is made (created if missing); None: the system's temporary
        directory. The server passes its run directory: a disk sized for checkpoints, where
        the system's may be a RAM-backed tmpfs.
    prefix : str
        Name prefix of the directory (:data:`SCRATCH_PREFIX` and the round).
    """

    def __init__(
        self, parent: str | os.PathLike[str] | None = None, prefix: str = SCRATCH_PREFIX
    ) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.TemporaryDirectory(prefix=prefix, dir=parent)
        self.path = Path(self._dir.name)
        self._files = 0

    def save(self, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write ``arrays`` (values only, in order; the reader knows the keys); their path."""
        path = self.path / f"{self._files:06d}.npy"
        self._files += 1
        with open(path, "wb") as f:
            for a in arrays.values():
                np.save(f, a, allow_pickle=False)
        return path

    @staticmethod
    def load(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """What :meth:`save` wrote to ``path``, under ``keys`` (the order it was saved in)."""
        with open(path, "rb") as f:
            return {k: np.load(f, allow_pickle=False) for k in keys}

    def close(self) -> None:
        """Remove the directory and its files."""
        self._dir.cleanup()


class Lazy(Sequence[T]):
    """``n`` items, each made by ``load(i)`` when it is accessed (nothing is cached).

    Iterating loads one item at a time, so a consumer that drops each item before taking the
    next (a running sum) holds one; ``list(lazy)`` loads them all.
    """

    def __init__(self, n: int, load: Callable[[int], T]) -> None:
        self._n = n
        self._load = load

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> T: ...

    @overload
    def __getitem__(self, i: slice) -> Lazy[T]: ...

    def __getitem__(self, i: int | slice) -> T | Lazy[T]:
        if isinstance(i, slice):
            picked = range(self._n)[i]
            return Lazy(len(picked), lambda j: self._load(picked[j]))
        return self._load(range(self._n)[i])  # negative indices; IndexError past the end

    def __iter__(self) -> Iterator[T]:
        for i in range(self._n):
            yield self._load(i)  # not bound to a name: the frame keeps no item


__all__ = ["SCRATCH_PREFIX", "Lazy", "Scratch"]

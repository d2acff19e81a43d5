"""Per-round server checkpoint: everything a killed run needs to continue to the same result.

``<run dir>/checkpoint.pt``, replaced atomically after every round: the global arrays, the strategy
state (FedOpt moments, Scaffold's c, its round counter, the seeded Generator that samples the
sites), the round number, the global RNG states (Python, NumPy, torch), the per-round records of
``results.json`` so far, the run's uid and its flat config.

Crash safety. Before a save replaces ``checkpoint.pt``, the current file also becomes
``checkpoint.prev.pt`` (a second hard link, swapped in with ``os.replace``; a copy where the file
system has no hard links). At every instant ``checkpoint.pt`` is one complete checkpoint and
``checkpoint.prev.pt`` (after the first save) is the one before it. :func:`load` checks the
latest (readable, our version, every field, finite arrays) and falls back to the previous one
with a warning that names the file and the reason, never its content. One process owns a run
directory at a time: :class:`~server.runlock.RunLock` (re-exported here).
"""

from __future__ import annotations

import math
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import log

from recon.fileio import atomic_open, atomic_torch_save
from server.runlock import RunInUseError as RunInUseError
from server.runlock import RunLock as RunLock

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
VERSION = 1
REQUIRED = ("round", "arrays", "strategy", "run_uid", "config")


class CheckpointError(ValueError):
    """No usable checkpoint: the message names each file tried and why it was refused."""


@dataclass
class ServerState:
    """What :func:`save` writes and :func:`load` returns."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy: dict[str, Any]
    run_uid: str
    config: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    rng: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """The RNG states the server uses (Python, NumPy, torch)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the global state is what we restore)
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])  # noqa: NPY002
    if "torch" in state:
        torch.set_rng_state(state["torch"])


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_previous(latest: Path, previous: Path) -> None:
    """Make ``previous`` a complete copy of ``latest``, replacing the old one atomically."""
    tmp = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(latest, tmp)  # same inode: no bytes written, never half a file
    except OSError:  # no hard links here (some network or FUSE file systems): copy instead
        with open(latest, "rb") as src, atomic_open(previous, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return
    try:
        os.replace(tmp, previous)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(run_dir: Path, state: ServerState) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically, keeping the one it replaces.

    The current ``checkpoint.pt`` first becomes ``checkpoint.prev.pt``; then the new one is
    written to a temporary file, fsynced and moved over ``checkpoint.pt``. A crash at any point
    leaves ``checkpoint.pt`` complete (old or new) and ``checkpoint.prev.pt`` complete.
    """
    run = Path(run_dir)
    path = run / CHECKPOINT
    if path.is_file():
        _keep_previous(path, run / PREVIOUS)
    atomic_torch_save({"version": VERSION, **state.__dict__}, path)
    _fsync_dir(run)
    return path


def exists(run_dir: Path) -> bool:
    """True if ``run_dir`` holds a checkpoint (latest or previous), usable or not."""
    run = Path(run_dir)
    return (run / CHECKPOINT).is_file() or (run / PREVIOUS).is_file()


def _non_finite(value: Any, where: str) -> str | None:
    """Where the first non-finite float in ``value`` (arrays, scalars, nested) is, or None."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return where
    elif isinstance(value, torch.Tensor):
        if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
            return where
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return where
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if (found := _non_finite(v, f"{where}[{k!r}]")) is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if (found := _non_finite(v, f"{where}[{i}]")) is not None:
                return found
    return None


def _problem(raw: Any) -> str | None:
    """Why a loaded object is not a usable checkpoint (no content quoted), or None."""
    if not isinstance(raw, dict):
        return f"holds a {type(raw).__name__}, not a checkpoint dict"
    version = raw.get("version")
    if version != VERSION:
        got = (
            repr(version)
            if version is None or isinstance(version, int)
            else "a " + type(version).__name__
        )
        return f"field 'version': expected {VERSION}, got {got}"
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        return f"missing field(s) {missing}"
    unknown = sorted(
        str(k) for k in raw if k != "version" and k not in ServerState.__dataclass_fields__
    )
    if unknown:
        return f"unknown field(s) {unknown}"
    types: dict[str, tuple[type, ...]] = {
        "round": (Integral,),
        "arrays": (dict,),
        "strategy": (dict,),
        "run_uid": (str,),
        "config": (dict,),
        "rounds": (list,),
        "elapsed_seconds": (Real,),
        "rng": (dict,),
    }
    for key, kinds in types.items():
        if key in raw and (not isinstance(raw[key], kinds) or isinstance(raw[key], bool)):
            expected = " or ".join(k.__name__ for k in kinds)
            return f"field {key!r}: expected {expected}, got {type(raw[key]).__name__}"
    if raw["round"] < 0:
        return "field 'round' is negative"
    for key in ("arrays", "strategy", "elapsed_seconds"):
        if key in raw and (where := _non_finite(raw[key], key)) is not None:
            return f"{where} holds non-finite values"
    return None


def _read(path: Path) -> ServerState:
    """One checkpoint file, checked; :class:`CheckpointError` says why it is unusable."""
    if not path.is_file():
        raise CheckpointError("does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    except PermissionError:
        raise CheckpointError("cannot be opened: permission denied") from None
    except Exception as exc:  # truncated zip, garbage, unpickling error: all mean unreadable
        # The exception's text may quote bytes of the file; its type and the size say enough.
        size = path.stat().st_size
        raise CheckpointError(
            f"cannot be read as a checkpoint ({type(exc).__name__}; {size} bytes: "
            "truncated or overwritten?)"
        ) from None
    why = _problem(raw)
    if why is not None:
        raise CheckpointError(why)
    raw.pop("version")
    return ServerState(**raw)


def load(run_dir: Path) -> ServerState:
    """Read the latest usable checkpoint of ``run_dir``.

    ``checkpoint.pt`` if it is readable, of this version, complete and finite; otherwise (with a
    WARNING log line naming the file and why) ``checkpoint.prev.pt``.

    Raises
    ------
    FileNotFoundError
        If neither file exists (no round completed).
    CheckpointError
        If neither file is usable; the message names both files and why each was refused.
    """
    run = Path(run_dir)
    latest, previous = run / CHECKPOINT, run / PREVIOUS
    if not latest.is_file() and not previous.is_file():
        raise FileNotFoundError(f"cannot resume: {latest} does not exist (no round completed?)")
    try:
        return _read(latest)
    except CheckpointError as exc:
        why_latest = str(exc)
    log(WARNING, "checkpoint %s is unusable: %s; trying %s", latest, why_latest, previous)
    try:
        state = _read(previous)
    except CheckpointError as exc:
        raise CheckpointError(
            f"cannot resume {run}: no usable checkpoint: {latest}: {why_latest}; {previous}: {exc}"
        ) from None
    log(WARNING, "resuming from the previous checkpoint %s (round %d)", previous, state.round)
    return state

"""Per-round server checkpoint: everything a killed run needs to continue to the same result.

One file, ``<run dir>/checkpoint.pt``, replaced atomically after every round: the global arrays,
the strategy state (FedOpt moments, Scaffold's c, its round counter), the round number, the RNG
states (Python's ``random`` drives node sampling), the per-round records of ``results.json``
so far, the run's uid and its flat config.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon.fileio import atomic_torch_save

CHECKPOINT = "checkpoint.pt"
VERSION = 1


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


def save(run_dir: Path, state: ServerState) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically (temporary file, fsync, ``os.replace``)."""
    path = Path(run_dir) / CHECKPOINT
    atomic_torch_save({"version": VERSION, **state.__dict__}, path)
    return path


def load(run_dir: Path) -> ServerState:
    """Read ``run_dir/checkpoint.pt``; errors name the file and the missing field."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (no round completed?)")
    raw = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    if raw.get("version") != VERSION:
        raise ValueError(f"{path}: field 'version': expected {VERSION}, got {raw.get('version')!r}")
    raw.pop("version")
    missing = [k for k in ("round", "arrays", "strategy", "run_uid", "config") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    return ServerState(**raw)

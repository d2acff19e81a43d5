"""Shared helpers of the Flower app tests (imported by tests/test_app_*.py, test_simulate*.py).

Tiny sites: 32x32, 4 coils (with 2 coils, ESPIRiT's crop removes part of the object at this
size and no model can beat zero-filled there), 20 slices per site (10 train / 5 val / 5 test),
MoDL with Nu=2 and NCG=2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from inprocess import set_task_identity

_SITES: dict[int, Path] = {}

TINY: dict[str, Any] = {
    "num-server-rounds": 2,
    "min-fit-clients": 2,
    "min-available-clients": 2,
    "node-wait-timeout": 5.0,
    "train.local-steps": 10,
    "model.num-unrolls": 2,
    "model.cg-iters": 2,
    "model.unet-chans": 8,
    "run.local-only": False,
    # an evaluate exchange every round, as the robustness tests count its replies
    # (tests/test_eval_piggyback.py runs the default piggyback mode)
    "eval-mode": "separate",
    # what tiny_sites() generates (simulate refuses synthetic sites made for another layout)
    "data.synth-slices": 20,
    "data.synth-size": 32,
    "data.synth-coils": 4,
}


def tiny_sites(factory: pytest.TempPathFactory, n_sites: int = 3) -> Path:
    """``root/site{k}`` with coil maps already cached (made once per test session)."""
    if n_sites not in _SITES:
        from recon.data import generate_sites, prepare_site

        root = factory.mktemp(f"sites{n_sites}")
        d = TINY
        generate_sites(
            root,
            n_sites=n_sites,
            n_slices=d["data.synth-slices"],
            matrix=d["data.synth-size"],
            overrides={"num_coils": d["data.synth-coils"]},
        )
        for k in range(n_sites):
            prepare_site(root / f"site{k}", progress=False)
        _SITES[n_sites] = root
    return _SITES[n_sites]


def tiny_config(root: Path, out: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A flat run config for ``root``'s sites writing under ``out``."""
    n = len(list(root.glob("site*")))
    flat = {**TINY, "data.root": str(root), "data.num-sites": n, "run.out": str(out)}
    flat.update(overrides or {})
    return flat


def context(run_config: dict[str, Any], node_config: dict[str, Any], node_id: int = 7) -> Context:
    """A ClientApp Context as a SuperNode would build it."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config=node_config,
        state=RecordDict(),
        run_config=run_config,
    )


def message(
    arrays: ArrayRecord,
    config: dict[str, Any] | None = None,
    message_type: str = MessageType.TRAIN,
    node_id: int = 7,
    **extra: ArrayRecord,
) -> Message:
    """A server -> client message (sets Flower's task identity, which Message() requires)."""
    set_task_identity()
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config or {}), **extra})
    return Message(content, dst_node_id=node_id, message_type=message_type)

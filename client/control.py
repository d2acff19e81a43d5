"""Scaffold's client control variate c_k: kept in ``context.state`` and on the site's disk.

``context.state`` lives as long as the Flower run on this node; the disk copy lets a killed run
resume (a new Flower run with an empty state) to the same result. Files are tagged with the
round they were produced in and with the run's uid, so a resumed round ``r`` reads the c_k of
the round before ``r`` even if a crash happened after some sites had already saved round ``r``::

    <state path>/.fedunroll/<run uid>/scaffold_c.r000003.npz     (written atomically)

The state path is the site's ``state-path`` node config, by default its data path
(:class:`client.site.Site`), so a hospital can mount its data read-only and keep state elsewhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from client.state import RoundFiles
from strategies.protocol import to_numpy, to_record

STATE_ARRAYS = "scaffold.c-local"
STATE_META = "scaffold.c-local-meta"


def _files(state_path: Path, run_uid: str) -> RoundFiles:
    return RoundFiles(state_path, run_uid, "scaffold_c")


def load_control(
    state: RecordDict,
    state_path: Path,
    run_uid: str,
    server_round: int,
    reference: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], int]:
    """c_k as it was before ``server_round``: from the state, else the site's disk, else zeros.

    Returns
    -------
    (c_k, round)
        The arrays (keys and dtypes of ``reference``, i.e. of c) and the round that produced
        them (0 for the zero initialisation, Levac et al. 2023 Alg. 1 ``c_k^0``).
    """
    meta = state.config_records.get(STATE_META)
    if (
        meta is not None
        and meta.get("run-uid") == run_uid
        and int(meta.get("round", 0)) < server_round  # type: ignore[arg-type]
        and STATE_ARRAYS in state.array_records
    ):
        arrays = to_numpy(state.array_records[STATE_ARRAYS])
        if _matches(arrays, reference):
            return arrays, int(meta["round"])  # type: ignore[arg-type]
    files = _files(state_path, run_uid)
    latest = files.latest_before(server_round)
    if latest is not None:
        path = files.path(latest)
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            if _matches(arrays, reference):
                return arrays, latest
            warnings.warn(
                f"{path}: control variate does not match the model; reset to 0", stacklevel=2
            )
        except (OSError, ValueError) as err:
            warnings.warn(f"{path}: unreadable control variate ({err}); reset to 0", stacklevel=2)
    return {k: np.zeros_like(v) for k, v in reference.items()}, 0


def forget_run(state: RecordDict, state_path: Path, run_uid: str) -> None:
    """Delete a finished run's c_k (state and disk). A run extended later restarts c_k at 0."""
    state.array_records.pop(STATE_ARRAYS, None)
    state.config_records.pop(STATE_META, None)
    _files(state_path, run_uid).forget()


def _matches(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> bool:
    return list(arrays) == list(reference) and all(
        arrays[k].shape == v.shape and arrays[k].dtype == v.dtype for k, v in reference.items()
    )


def save_control(
    state: RecordDict,
    state_path: Path,
    run_uid: str,
    server_round: int,
    c_new: Mapping[str, np.ndarray],
    loaded_round: int,
) -> Path | None:
    """Keep c_k^+ of ``server_round`` in the state and atomically on disk.

    Older files than ``loaded_round`` are removed (the one just read stays, so a resumed
    ``server_round`` still finds it). A read-only state path only warns: the state copy is
    enough for an uninterrupted run.
    """
    state.array_records[STATE_ARRAYS] = to_record(c_new)
    state.config_records[STATE_META] = ConfigRecord({"run-uid": run_uid, "round": server_round})
    files = _files(state_path, run_uid)
    try:
        return files.save(server_round, c_new, keep_from=loaded_round)
    except OSError as err:
        target = files.path(server_round)
        warnings.warn(f"cannot save the Scaffold control variate to {target}: {err}", stacklevel=2)
        return None

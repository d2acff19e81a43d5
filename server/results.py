"""``results.json``: the one record of a federated run (schema ``fedunroll.results/1``).

::

    {"schema": "fedunroll.results/1", "name": str, "config": {flat run config},
     "sites": [site ids], "model": {"num_parameters": int, "bytes": int},
     "rounds": [{"round", "seconds", "bytes_sent", "bytes_received",
                 "train": {site: {"loss", "num-examples", "seconds"}},
                 "eval": {site: {"ssim", "nrmse", "psnr", "num-examples"}},
                 "rejected": [{"site", "reason"}]}],
     "final": {"federated": {site: {"ssim", "nrmse", "psnr"}}, "zero_filled": {...},
               "local_only": {...} (optional), "centralized": {...} (optional)},
     "timings": {"total_seconds", "rounds_seconds"},
     "status": "completed" | "failed: <reason>",
     "personalization": {site: {"seen": bool, "before": {"ssim", "nrmse", "psnr"},
                                "after": {...}, "r_fine", "n_fine", "fine_tune", "decision"}
                         | {"seen": bool, "error": str}}  (optional, server/personalize.py)}

``fedunroll report`` reads it; :func:`validate_results` is the schema check both sides use.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA = "fedunroll.results/1"
RESULTS = "results.json"
METRIC_KEYS = ("ssim", "nrmse", "psnr")


def train_entry(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A site's train record of one round from its reply metrics."""
    return {
        "loss": float(metrics.get("train-loss", math.nan)),
        "num-examples": int(metrics["num-examples"]),
        "seconds": float(metrics.get("seconds", math.nan)),
    }


def eval_entry(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A site's evaluation record of one round from its reply metrics."""
    return {
        **{k: float(metrics[k]) for k in METRIC_KEYS},
        "num-examples": int(metrics["num-examples"]),
    }


def metric_triplet(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"ssim", "nrmse", "psnr"}`` from reply metrics (``prefix="zf-"`` for zero-filled)."""
    return {k: float(metrics[prefix + k]) for k in METRIC_KEYS}


def build(
    *,
    name: str,
    config: Mapping[str, Any],
    sites: list[str],
    num_parameters: int,
    model_bytes: int,
    rounds: list[dict[str, Any]],
    final: Mapping[str, Any],
    total_seconds: float,
    status: str,
    personalization: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the results dict in schema order."""
    out = {
        "schema": SCHEMA,
        "name": name,
        "config": dict(config),
        "sites": list(sites),
        "model": {"num_parameters": int(num_parameters), "bytes": int(model_bytes)},
        "rounds": rounds,
        "final": {k: v for k, v in final.items() if v or k in ("federated", "zero_filled")},
        "timings": {
            "total_seconds": float(total_seconds),
            "rounds_seconds": float(sum(r["seconds"] for r in rounds)),
        },
        "status": status,
    }
    if personalization:
        out["personalization"] = dict(personalization)
    return out


def write(run_dir: str | os.PathLike[str], results: Mapping[str, Any]) -> Path:
    """Write ``run_dir/results.json`` atomically (NaN is written as ``null``)."""
    path = Path(run_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(results), indent=2)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``run_dir/results.json``."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    data = json.loads(path.read_text())
    validate_results(data, str(path))
    return data


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def validate_results(data: Mapping[str, Any], where: str = RESULTS) -> None:
    """Check the top-level schema; raises ``ValueError`` naming the field."""
    if data.get("schema") != SCHEMA:
        raise ValueError(
            f"{where}: field 'schema': expected {SCHEMA!r}, got {data.get('schema')!r}"
        )
    for key in ("name", "config", "sites", "model", "rounds", "final", "timings", "status"):
        if key not in data:
            raise ValueError(f"{where}: missing field {key!r}")
    for i, r in enumerate(data["rounds"]):
        for key in (
            "round",
            "seconds",
            "bytes_sent",
            "bytes_received",
            "train",
            "eval",
            "rejected",
        ):
            if key not in r:
                raise ValueError(f"{where}: rounds[{i}]: missing field {key!r}")
    for key in ("federated", "zero_filled"):
        if key not in data["final"]:
            raise ValueError(f"{where}: final: missing field {key!r}")
    status = data["status"]
    if status != "completed" and not str(status).startswith("failed: "):
        raise ValueError(f"{where}: field 'status': {status!r}")
    for site, entry in (data.get("personalization") or {}).items():
        if "seen" not in entry:
            raise ValueError(f"{where}: personalization.{site}: missing field 'seen'")
        if "error" in entry:
            continue
        for key in ("before", "after", "r_fine", "n_fine", "fine_tune"):
            if key not in entry:
                raise ValueError(f"{where}: personalization.{site}: missing field {key!r}")
        for key in ("before", "after"):
            for m in METRIC_KEYS:
                if m not in entry[key]:
                    raise ValueError(f"{where}: personalization.{site}.{key}: missing {m!r}")

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
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from recon.fileio import atomic_write_json

SCHEMA = "fedunroll.results/1"
RESULTS = "results.json"
METRIC_KEYS = ("ssim", "nrmse", "psnr")
# The methods of ``final`` whose per-site metrics are checked (others are kept as they are).
FINAL_METHODS = ("federated", "zero_filled", "local_only", "centralized")


def _number(metrics: Mapping[str, Any], key: str) -> float:
    """``metrics[key]`` as a float; NaN (written ``null``) when absent or not a finite real
    scalar. Replies are checked before they get here (``protocol.check_content``); this keeps a
    record from ever holding anything else."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, Real):
        return math.nan
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _count(metrics: Mapping[str, Any]) -> int:
    n = metrics.get("num-examples")
    return int(n) if isinstance(n, Integral) and not isinstance(n, bool) else 0


def train_entry(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A site's train record of one round from its (checked) reply metrics."""
    return {
        "loss": _number(metrics, "train-loss"),
        "num-examples": _count(metrics),
        "seconds": _number(metrics, "seconds"),
    }


def eval_entry(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A site's evaluation record of one round from its (checked) reply metrics."""
    return {**metric_triplet(metrics), "num-examples": _count(metrics)}


def metric_triplet(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"ssim", "nrmse", "psnr"}`` from reply metrics (``prefix="zf-"`` for zero-filled)."""
    return {k: _number(metrics, prefix + k) for k in METRIC_KEYS}


def build(
    *,
    name: str,
    config: Mapping[str, Any],
    sites: list[str],
    num_parameters: int | None,
    model_bytes: int,
    rounds: list[dict[str, Any]],
    final: Mapping[str, Any],
    total_seconds: float,
    status: str,
    personalization: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the results dict in schema order (``num_parameters=None``: no model was built,
    e.g. a run that failed in its architecture search; ``model`` is then left out)."""
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "name": name,
        "config": dict(config),
        "sites": list(sites),
    }
    if num_parameters is not None:
        out["model"] = {"num_parameters": int(num_parameters), "bytes": int(model_bytes)}
    out.update(
        rounds=rounds,
        final={k: v for k, v in final.items() if v or k in ("federated", "zero_filled")},
        timings={
            "total_seconds": float(total_seconds),
            "rounds_seconds": float(sum(r["seconds"] for r in rounds)),
        },
        status=status,
    )
    if personalization:
        out["personalization"] = dict(personalization)
    return out


# Metrics where lower is better (the worst site has the highest value).
LOWER_IS_BETTER = ("nrmse",)


def final_summary(
    per_site: Mapping[str, Mapping[str, float]], num_sites: int | None = None
) -> dict[str, Any]:
    """The distribution of the final metrics over the evaluated sites (``final-eval-sites``):
    per metric the mean, quartiles (q1, median, q3, linear interpolation), the worst value and
    its site; ``evaluated`` sites of ``num_sites``. Non-finite values are left out."""
    out: dict[str, Any] = {"evaluated": len(per_site), "num_sites": num_sites}
    for key in ("ssim", "nrmse", "psnr"):
        pairs = [
            (float(m[key]), site)
            for site, m in per_site.items()
            if isinstance(m.get(key), Real) and math.isfinite(float(m[key]))
        ]
        if not pairs:
            continue
        values = sorted(v for v, _ in pairs)
        worst = max(pairs) if key in LOWER_IS_BETTER else min(pairs)
        out[key] = {
            "mean": sum(values) / len(values),
            "q1": _quantile(values, 0.25),
            "median": _quantile(values, 0.5),
            "q3": _quantile(values, 0.75),
            "worst": worst[0],
            "worst_site": worst[1],
        }
    return out


def _quantile(ordered: Sequence[float], q: float) -> float:
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def write(run_dir: str | os.PathLike[str], results: Mapping[str, Any]) -> Path:
    """Write ``run_dir/results.json`` atomically (NaN is written as ``null``)."""
    return atomic_write_json(Path(run_dir) / RESULTS, _finite(results))


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


class ResultsError(ValueError):
    """A malformed ``results.json``; the message names the file and field (``rounds[1].eval``)."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        self.source, self.field, self.reason = source, field, reason
        super().__init__(f"{source}: field '{field}': {reason}")


# ----------------------------------------------------------------------------- validation


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, reason: str) -> ResultsError:
        return ResultsError(self.source, field, reason)

    def get(self, obj: Mapping[str, Any], key: str, where: str, kind: Any) -> Any:
        field = f"{where}.{key}" if where else key
        if key not in obj:
            raise self.fail(field, "missing")
        return self.check(obj[key], field, kind)

    def check(self, value: Any, field: str, kind: Any) -> Any:
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            name = "a number"
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            name = "an integer"
        else:
            ok = isinstance(value, kind)
            name = {str: "a string", dict: "an object", list: "a list"}[kind]
        if not ok:
            raise self.fail(field, f"must be {name}, got {type(value).__name__} {value!r:.60}")
        return value

    def metrics(self, obj: Any, where: str, keys: Sequence[str], ints: Sequence[str] = ()) -> None:
        """Metric values are numbers or ``null`` (NaN as written by ``server.results``)."""
        self.check(obj, where, dict)
        for k in keys:
            if k not in obj:
                raise self.fail(f"{where}.{k}", "missing")
            if obj[k] is not None:
                self.check(obj[k], f"{where}.{k}", float)
        for k in ints:
            self.get(obj, k, where, int)


def validate_results(data: Any, source: str = RESULTS) -> dict[str, Any]:
    """Check ``data`` against the ``fedunroll.results/1`` schema and return it.

    ``schema``, ``name``, ``config``, ``sites``, ``rounds`` and ``status`` are always required;
    a ``completed`` run also needs ``model``, ``timings`` and ``final.federated`` /
    ``final.zero_filled``. Whatever is present must be well formed. Extra keys are allowed.

    Raises
    ------
    ResultsError
        Naming the first missing or malformed field.
    """
    c = _Checker(source)
    c.check(data, "<top level>", dict)
    schema = c.get(data, "schema", "", str)
    if schema != SCHEMA:
        raise c.fail("schema", f"expected {SCHEMA!r}, got {schema!r}")
    c.get(data, "name", "", str)
    c.get(data, "config", "", dict)
    sites = c.get(data, "sites", "", list)
    for i, s in enumerate(sites):
        c.check(s, f"sites[{i}]", str)
    status = c.get(data, "status", "", str)
    completed = status == "completed"
    if not completed and not status.startswith("failed: "):
        raise c.fail("status", f"must be 'completed' or 'failed: <reason>', got {status!r}")
    for i, r in enumerate(c.get(data, "rounds", "", list)):
        w = f"rounds[{i}]"
        c.check(r, w, dict)
        c.get(r, "round", w, int)
        c.get(r, "seconds", w, float)
        c.get(r, "bytes_sent", w, int)
        c.get(r, "bytes_received", w, int)
        for site, m in c.get(r, "train", w, dict).items():
            c.metrics(m, f"{w}.train.{site}", ("loss", "seconds"), ("num-examples",))
        for site, m in c.get(r, "eval", w, dict).items():
            c.metrics(m, f"{w}.eval.{site}", METRIC_KEYS, ("num-examples",))
        for j, rej in enumerate(c.get(r, "rejected", w, list)):
            c.check(rej, f"{w}.rejected[{j}]", dict)
            c.get(rej, "site", f"{w}.rejected[{j}]", str)
            c.get(rej, "reason", f"{w}.rejected[{j}]", str)
    if completed or "model" in data:
        model = c.get(data, "model", "", dict)
        c.get(model, "num_parameters", "model", int)
        c.get(model, "bytes", "model", int)
    if completed or "timings" in data:
        timings = c.get(data, "timings", "", dict)
        c.get(timings, "total_seconds", "timings", float)
        c.get(timings, "rounds_seconds", "timings", float)
    if completed or "final" in data:
        final = c.get(data, "final", "", dict)
        required = ("federated", "zero_filled") if completed else ()
        for method in required:
            c.get(final, method, "final", dict)
        for method, per_site in final.items():
            if method not in FINAL_METHODS:
                continue  # extra methods (e.g. personalized) are kept but not tabulated
            c.check(per_site, f"final.{method}", dict)
            for site, m in per_site.items():
                c.metrics(m, f"final.{method}.{site}", METRIC_KEYS)
    if "personalization" in data:  # optional: only runs with personalize.enabled
        for site, entry in c.get(data, "personalization", "", dict).items():
            w = f"personalization.{site}"
            c.check(entry, w, dict)
            if not isinstance(entry.get("seen"), bool):
                raise c.fail(f"{w}.seen", "must be true or false")
            if "error" in entry:
                c.get(entry, "error", w, str)
                continue
            c.metrics(c.get(entry, "before", w, dict), f"{w}.before", METRIC_KEYS)
            c.metrics(c.get(entry, "after", w, dict), f"{w}.after", METRIC_KEYS)
            c.get(entry, "n_fine", w, int)
            if not isinstance(entry.get("fine_tune"), bool):
                raise c.fail(f"{w}.fine_tune", "must be true or false")
            if entry.get("r_fine") is not None:
                c.get(entry, "r_fine", w, float)
    return data

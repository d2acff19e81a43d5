"""Run events: one JSON line per event appended to ``<run dir>/events.jsonl`` (schema ``v`` 1).

The ServerApp calls a few hooks (:class:`RunEvents`) as the run goes; each appends one line and
flushes it, so a reader (``fedunroll dashboard``, ``fedunroll report``) sees a run live by
reading the file. The writer never reads anything back and never raises: a failed write (disk
full, read-only volume) is logged once and the run goes on without events.

Every line is an object with ``"v": 1``, ``"t"`` (unix time, seconds), ``"type"`` and, for the
events of a round, ``"round"``. Metrics are finite numbers or ``null``; reasons are the
strategy's bounded rejection reasons (they never quote a reply). The types and their fields::

    run-started        name, config {flat run config}, round (rounds done before: 0, or the
                       checkpoint's round on resume), rounds (num-server-rounds), resumed,
                       host, pid
    site-connected     round, node, site (bound name, or null before the node's first reply)
    site-lost          round, node, site
    round-started      round, nodes (connected node count)
    reply-accepted     round, phase ("train" | "evaluate"), site, metrics (train: loss,
                       num-examples, seconds; evaluate: ssim, nrmse, psnr, num-examples),
                       bytes (ArrayRecord bytes of the reply)
    reply-rejected     round, phase ("train" | "evaluate" | "final" | ...), site, reason
    phase-finished     round, phase, accepted, rejected (counts)
    round-finished     round, seconds, bytes_sent, bytes_received, train {site: {...}},
                       eval {site: {...}}, rejected [{site, reason}] (the results.json record)
    checkpoint-written round, file ("checkpoint.pt")
    run-finished       round, status ("completed"), seconds, final {"federated": {site:
                       {ssim, nrmse, psnr}}, "zero_filled": {...}}
    run-failed         round, status ("failed: <reason>"), seconds

A resumed run appends to the same file: its ``run-started`` (``resumed: true``, ``round`` k)
supersedes the events of rounds after k that the killed run left behind.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common import log

VERSION = 1
EVENTS = "events.jsonl"


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become ``None``; tuples, numpy scalars become plain."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalar
    if callable(item):
        return _clean(item())
    return str(value)


class RunEvents:
    """The writer of one run directory's ``events.jsonl``; ``RunEvents(None)`` writes nothing."""

    def __init__(self, run_dir: str | os.PathLike[str] | None) -> None:
        self.path = Path(run_dir) / EVENTS if run_dir is not None else None
        self._nodes: dict[int, str | None] = {}  # connected nodes at the last round start
        self._rejections = 0  # how many of the strategy's rejections were written

    def emit(self, type_: str, round_: int | None = None, **fields: Any) -> None:
        """Append one event (``v``, ``t``, ``type``, ``round`` if given, ``fields``)."""
        if self.path is None:
            return
        event: dict[str, Any] = {"v": VERSION, "t": round(time.time(), 3), "type": type_}
        if round_ is not None:
            event["round"] = int(round_)
        event.update(fields)
        try:
            line = json.dumps(_clean(event), allow_nan=False, separators=(",", ":"))
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
        except (OSError, ValueError, TypeError) as exc:
            log(WARNING, "run events off: cannot append to %s (%s)", self.path, exc)
            self.path = None

    # --- hooks of server.app ----------------------------------------------------------------
    def run_started(self, name: str, config: Mapping[str, Any], round_: int, rounds: int) -> None:
        self.emit(
            "run-started",
            name=name,
            config=dict(config),
            round=round_,
            rounds=rounds,
            resumed=round_ > 0,
            host=socket.gethostname(),
            pid=os.getpid(),
        )

    def run_finished(
        self,
        round_: int,
        status: str,
        seconds: float,
        final: Mapping[str, Any],
        rejected: Sequence[Any] = (),
    ) -> None:
        """``run-finished`` (status ``completed``) or ``run-failed``; first any rejection not
        written yet (the final evaluation's, or those of a round that stopped the run)."""
        self.rejections(round_, rejected)
        if status == "completed":
            final_metrics = {k: final.get(k, {}) for k in ("federated", "zero_filled")}
            self.emit("run-finished", round_, status=status, seconds=seconds, final=final_metrics)
        else:
            self.emit("run-failed", round_, status=status, seconds=seconds)

    # --- hooks of server.federation ---------------------------------------------------------
    def round_started(self, round_: int, nodes: Iterable[int], name: Callable[[int], str]) -> None:
        """``site-connected`` / ``site-lost`` for the change since the last round, then
        ``round-started``. ``name(node)`` is the bound site name (``node-<id>`` if none)."""
        now = {int(n): _bound(name(int(n)), int(n)) for n in nodes}
        for node in sorted(set(self._nodes) - set(now)):
            self.emit("site-lost", round_, node=node, site=_bound(name(node), node))
        for node in sorted(set(now) - set(self._nodes)):
            self.emit("site-connected", round_, node=node, site=now[node])
        self._nodes = now
        self.emit("round-started", round_, nodes=len(now))

    def replies(
        self,
        round_: int,
        phase: str,
        accepted: Mapping[str, Mapping[str, Any]],
        rejected: Sequence[Any],
        sizes: Mapping[int, int] | None = None,
        name: Callable[[int], str] = str,
    ) -> None:
        """After a phase's aggregation: one ``reply-accepted`` per accepted site (its metrics
        and reply bytes: ``sizes`` maps each replying node to them), one ``reply-rejected``
        per new rejection, then ``phase-finished``."""
        by_site = {name(node): size for node, size in (sizes or {}).items()}
        for site, metrics in sorted(accepted.items()):
            self.emit(
                "reply-accepted",
                round_,
                phase=phase,
                site=site,
                metrics=_metrics(phase, metrics),
                bytes=by_site.get(site, 0),
            )
        new = self.rejections(round_, rejected)
        self.emit("phase-finished", round_, phase=phase, accepted=len(accepted), rejected=new)

    def rejections(self, round_: int, rejected: Sequence[Any]) -> int:
        """``reply-rejected`` for each rejection (strategy ``Rejection``) not written yet."""
        new = list(rejected[self._rejections :])
        self._rejections = len(rejected)
        for rej in new:
            self.emit(
                "reply-rejected",
                getattr(rej, "round", round_),
                phase=rej.phase,
                site=rej.site,
                reason=rej.reason,
            )
        return len(new)

    def round_finished(self, record: Mapping[str, Any]) -> None:
        """``round-finished`` with the round's ``results.json`` record."""
        fields = {k: v for k, v in record.items() if k != "round"}
        self.emit("round-finished", record["round"], **fields)

    def checkpoint_written(self, round_: int, file: str = "checkpoint.pt") -> None:
        self.emit("checkpoint-written", round_, file=file)


def _bound(site: str, node: int) -> str | None:
    return None if site == f"node-{node}" else site


_TRAIN_KEYS = {"train-loss": "loss", "num-examples": "num-examples", "seconds": "seconds"}
_EVAL_KEYS = {k: k for k in ("ssim", "nrmse", "psnr", "num-examples")}


def _metrics(phase: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    keys = _TRAIN_KEYS if phase == "train" else _EVAL_KEYS
    out: dict[str, Any] = {}
    for src, dst in keys.items():
        value = metrics.get(src)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[dst] = value
    return out


__all__ = ["EVENTS", "VERSION", "RunEvents"]

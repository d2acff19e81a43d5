"""Reading a run: ``<run dir>/events.jsonl`` (written by :mod:`server.events`) or, for runs
without events, ``results.json`` -> one summary dict for the dashboard and ``fedunroll report``.

:func:`read_events` tolerates a line being written (the last one may be partial) and skips
anything that is not a version-1 event. :func:`summarize` folds the events into::

    {"name", "source": "events" | "results", "status": "running" | "completed" | "failed: ..."
     | "stopped", "live": bool, "round" (rounds done), "rounds" (planned), "started", "updated"
     (unix times), "elapsed", "eta" (seconds or None), "current": {"round", "phase", "since"}
     | None, "nodes" (connected), "sites": {site: {"status", "last_round", "loss", "ssim",
     "nrmse", "psnr", "seconds", "bytes", "rejections"}}, "curves": {"loss" | "ssim" | "nrmse"
     | "psnr": {site: [[round, value], ...]}}, "timeline": [{"round", "seconds", "site_seconds",
     "train", "evaluate", "checkpoint", "bytes_sent", "bytes_received"}], "rejections":
     [{"round", "phase", "site", "reason"}], "config": {...}, "final": {...}, "dp": {"records":
     [{"round", "privacy"}], "section": {...} | None}}

``dp`` holds the differential-privacy figures as the server wrote them: ``records`` the
non-empty ``privacy`` dict of each round record (``server.privacy.round_privacy``), in round
order and, like every per-round figure, without the rounds a resume redoes; ``section`` the
``privacy`` section of ``results.json`` (``server.privacy.privacy_summary``) of a run that is
over (:func:`load_run`), else ``None``. ``fedunroll.dashboard.privacy`` makes its epsilon
figures of them.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

EVENTS = "events.jsonl"  # server.events.EVENTS (the command line may import server; kept literal)
RESULTS = "results.json"
VERSION = 1
METRICS = ("loss", "ssim", "nrmse", "psnr")


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every well-formed version-1 event of an ``events.jsonl`` file, in order."""
    out: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # being written
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if (
                    isinstance(event, dict)
                    and event.get("v") == VERSION
                    and isinstance(event.get("type"), str)
                    and isinstance(event.get("t"), int | float)
                ):
                    out.append(event)
    except FileNotFoundError:
        pass
    return out


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _new_site() -> dict[str, Any]:
    return {
        "status": "connected",
        "last_round": None,
        "loss": None,
        "ssim": None,
        "nrmse": None,
        "psnr": None,
        "seconds": None,
        "bytes": 0,
        "rejections": 0,
        "_round": None,  # round of the site's last reply or rejection
        "_rejected": None,  # round of its last rejection
    }


def _pid_gone(host: Any, pid: Any) -> bool:
    """True when the run's server lived on this machine and its process is gone."""
    if host != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: a check, nothing is sent
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def summarize(
    events: Iterable[Mapping[str, Any]], name: str = "", now: float | None = None
) -> dict[str, Any]:
    """Fold a run's events into the summary dict of the module docstring."""
    now = time.time() if now is None else now
    s: dict[str, Any] = {
        "name": name,
        "source": "events",
        "status": "running",
        "live": True,
        "round": 0,
        "rounds": None,
        "started": None,
        "updated": None,
        "elapsed": 0.0,
        "eta": None,
        "current": None,
        "nodes": 0,
        "sites": {},
        "curves": {m: {} for m in METRICS},
        "timeline": [],
        "rejections": [],
        "config": {},
        "final": {},
        "dp": {"records": [], "section": None},
    }
    sites: dict[str, dict[str, Any]] = s["sites"]
    timeline: dict[int, dict[str, Any]] = {}
    marks: dict[int, dict[str, float]] = {}  # round -> event times
    privacy: dict[int, dict[str, Any]] = {}  # round -> the privacy dict of its record
    origin = {"host": None, "pid": None}
    prior = 0.0  # seconds of earlier invocations (resume)
    segment_start: float | None = None
    last_t: float | None = None

    def site(name_: Any) -> dict[str, Any] | None:
        if not isinstance(name_, str) or not name_:
            return None
        return sites.setdefault(name_, _new_site())

    for e in events:
        t = float(e["t"])
        kind = e["type"]
        r = e.get("round") if isinstance(e.get("round"), int) else None
        s["updated"] = t
        if kind == "run-started":
            start = r or 0
            if segment_start is not None and s["started"] is not None:
                prior += max(0.0, (last_t or t) - segment_start)
            segment_start = t
            s["started"] = s["started"] or t
            s.update(status="running", live=True, round=start, current=None)
            s["name"] = e.get("name") or s["name"]
            if isinstance(e.get("config"), dict):
                s["config"] = e["config"]
            if isinstance(e.get("rounds"), int):
                s["rounds"] = e["rounds"]
            origin = {"host": e.get("host"), "pid": e.get("pid")}
            # a resume redoes the rounds after its checkpoint: drop what a killed run left
            for by_round in (timeline, marks, privacy):
                for k in [k for k in by_round if k > start]:
                    del by_round[k]
            s["rejections"] = [x for x in s["rejections"] if x["round"] <= start]
            for curve in s["curves"].values():
                for pts in curve.values():
                    pts[:] = [p for p in pts if p[0] <= start]
        elif kind in ("site-connected", "site-lost"):
            st = site(e.get("site"))
            if st is not None:
                st["status"] = "connected" if kind == "site-connected" else "lost"
            if kind == "site-connected":
                s["nodes"] += 1
            else:
                s["nodes"] = max(0, s["nodes"] - 1)
        elif kind == "round-started" and r is not None:
            if isinstance(e.get("nodes"), int):
                s["nodes"] = e["nodes"]
            s["current"] = {"round": r, "phase": "train", "since": t}
            marks[r] = {"start": t}
        elif kind == "reply-accepted" and r is not None:
            st = site(e.get("site"))
            if st is None:
                continue
            metrics = _dict(e.get("metrics"))
            phase = e.get("phase")
            st.update(_round=max(r, st["_round"] or 0), last_round=r)
            if st["status"] in ("lost", "connected"):
                st["status"] = "ok"
            keys: tuple[str, ...]
            if phase == "train":
                keys = ("loss", "seconds")
                nbytes = e.get("bytes")
                if isinstance(nbytes, int) and nbytes > 0:
                    st["bytes"] += nbytes
            else:
                keys = ("ssim", "nrmse", "psnr")
            for key in keys:
                value = _num(metrics.get(key))
                st[key] = value
                if key in s["curves"] and value is not None:
                    pts = s["curves"][key].setdefault(e["site"], [])
                    pts[:] = [p for p in pts if p[0] != r] + [[r, value]]
        elif kind == "reply-rejected":
            st = site(e.get("site"))
            reason = e.get("reason") if isinstance(e.get("reason"), str) else ""
            s["rejections"].append(
                {
                    "round": r if r is not None else 0,
                    "phase": str(e.get("phase", "")),
                    "site": str(e.get("site", "")),
                    "reason": reason,
                }
            )
            if st is not None:
                st["rejections"] += 1
                if r is not None:
                    st.update(_round=max(r, st["_round"] or 0), _rejected=r)
        elif kind == "phase-finished" and r is not None:
            phase = str(e.get("phase", ""))
            marks.setdefault(r, {})[phase] = t
            if s["current"] is not None and phase == "train":
                s["current"]["phase"] = "evaluate"
        elif kind == "round-finished" and r is not None:
            s["round"] = max(s["round"], r)
            marks.setdefault(r, {})["end"] = t
            train = _dict(e.get("train"))
            site_secs = [
                v for v in (_num(m.get("seconds")) for m in train.values() if isinstance(m, dict))
            ]
            timeline[r] = {
                "round": r,
                "seconds": _num(e.get("seconds")),
                "site_seconds": max([x for x in site_secs if x is not None], default=None),
                "bytes_sent": e.get("bytes_sent") if isinstance(e.get("bytes_sent"), int) else 0,
                "bytes_received": (
                    e.get("bytes_received") if isinstance(e.get("bytes_received"), int) else 0
                ),
            }
            privacy[r] = _dict(e.get("privacy"))
            s["current"] = {"round": r, "phase": "checkpoint", "since": t}
        elif kind == "checkpoint-written" and r is not None:
            marks.setdefault(r, {})["checkpoint"] = t
            s["current"] = None
        elif kind in ("run-finished", "run-failed"):
            s["status"] = str(
                e.get("status") or ("completed" if kind == "run-finished" else "failed")
            )
            s["live"] = False
            s["current"] = None
            if isinstance(e.get("final"), dict):
                s["final"] = e["final"]
        last_t = t

    # the round-time breakdown from the marks
    for r, row in timeline.items():
        m = marks.get(r, {})
        start, train_end = m.get("start"), m.get("train")
        end, ckpt = m.get("end"), m.get("checkpoint")
        row["train"] = train_end - start if start is not None and train_end is not None else None
        row["evaluate"] = end - train_end if end is not None and train_end is not None else None
        row["checkpoint"] = ckpt - end if ckpt is not None and end is not None else None
    s["timeline"] = [timeline[k] for k in sorted(timeline)]
    s["dp"]["records"] = [{"round": k, "privacy": p} for k, p in sorted(privacy.items()) if p]
    if s["live"] and _pid_gone(origin["host"], origin["pid"]):
        s.update(status="stopped", live=False, current=None)
    if segment_start is not None:
        last = now if s["live"] else (s["updated"] or segment_start)
        s["elapsed"] = prior + max(0.0, last - segment_start)
    s["eta"] = _eta(s, marks, now)
    for name_, st in sites.items():
        rejected_last = st["_rejected"] is not None and st["_rejected"] == st["_round"]
        if st["status"] in ("ok", "connected") and rejected_last:
            st["status"] = "rejected"
        cur = s["current"]
        if s["live"] and cur is not None and st["status"] not in ("lost",):
            if st["_round"] != cur["round"]:
                st["status"] = "training" if cur["phase"] == "train" else st["status"]
            elif cur["phase"] == "evaluate" and not rejected_last:
                st["status"] = "evaluating"
        if not s["live"] and st["status"] in ("ok", "training", "evaluating"):
            st["status"] = "done" if s["status"] == "completed" else "idle"
        st.pop("_round")
        st.pop("_rejected")
        sites[name_] = st
    s["sites"] = dict(sorted(sites.items()))
    return s


def _eta(s: Mapping[str, Any], marks: Mapping[int, Mapping[str, float]], now: float) -> Any:
    """Seconds left: the mean duration of the last 3 finished rounds x the rounds left, less
    the time the current round has run. ``None`` if not live or no round finished yet."""
    if not s["live"] or not s["rounds"]:
        return None
    spans = [
        m.get("checkpoint", m["end"]) - m["start"]
        for _, m in sorted(marks.items())
        if "start" in m and "end" in m
    ][-3:]
    if not spans:
        return None
    per_round = sum(spans) / len(spans)
    left = (s["rounds"] - s["round"]) * per_round
    cur = s["current"]
    if cur is not None and cur["round"] > s["round"]:
        left -= max(0.0, now - marks.get(cur["round"], {}).get("start", now))
    return max(0.0, left)


def summarize_results(results: Mapping[str, Any], name: str = "") -> dict[str, Any]:
    """The same summary from a ``results.json`` (a run without events)."""
    events: list[dict[str, Any]] = []
    config = _dict(results.get("config"))
    t = 0.0
    events.append(
        {
            "t": t,
            "type": "run-started",
            "name": results.get("name") or name,
            "config": config,
            "round": 0,
            "rounds": config.get("num-server-rounds"),
        }
    )
    for rec in results.get("rounds") or []:
        if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
            continue
        r = rec["round"]
        events.append({"t": t, "type": "round-started", "round": r})
        for phase, key in (("train", "train"), ("evaluate", "eval")):
            for site_, m in (rec.get(key) or {}).items():
                if isinstance(m, dict):
                    events.append(
                        {"t": t, "type": "reply-accepted", "round": r, "phase": phase,
                         "site": site_, "metrics": m}
                    )  # fmt: skip
        for x in rec.get("rejected") or []:
            reason = str(x.get("reason", ""))
            phase, _, rest = reason.partition(": ")
            known = phase in ("evaluate", "final", "search", "personalize")
            events.append(
                {"t": t, "type": "reply-rejected", "round": r, "site": x.get("site"),
                 "phase": phase if known else "train", "reason": rest if known else reason}
            )  # fmt: skip
        seconds = _num(rec.get("seconds")) or 0.0
        events.append({"t": t, "type": "phase-finished", "round": r, "phase": "train"})
        t += seconds
        events.append({**rec, "t": t, "type": "round-finished"})
    status = str(results.get("status") or "unknown")
    final = _dict(results.get("final"))
    kind = "run-finished" if status == "completed" else "run-failed"
    events.append({"t": t, "type": kind, "status": status, "final": final})
    s = summarize(events, name=name, now=t)
    s["source"] = "results"
    s["started"] = s["updated"] = None
    timings = _dict(results.get("timings"))
    s["elapsed"] = _num(timings.get("total_seconds")) or s["elapsed"]
    for row in s["timeline"]:
        row["train"] = row["evaluate"] = row["checkpoint"] = None  # not recorded
    s["dp"]["section"] = _dict(results.get("privacy")) or None
    return s


def load_run(run_dir: str | os.PathLike[str], now: float | None = None) -> dict[str, Any]:
    """The summary of a run directory: from its events, else its ``results.json``.

    Each file is read once. With events, ``results.json`` is read only for a run that is over
    and only when needed: for the final metrics its events lack, or for the privacy section
    when its rounds carry privacy figures. Raises ``FileNotFoundError`` when it holds neither.
    """
    run = Path(run_dir)
    events = read_events(run / EVENTS)
    if events:
        s = summarize(events, name=run.name, now=now)
        if not s["live"] and (not s["final"] or s["dp"]["records"]):
            _over_from_results(s, run)
        return s
    path = run / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {EVENTS} or {RESULTS}")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise FileNotFoundError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise FileNotFoundError(f"{path}: not a results object")
    return summarize_results(data, name=run.name)


def _over_from_results(s: dict[str, Any], run: Path) -> None:
    """From the ``results.json`` of a run (shown from its events) that is over: the final
    metrics when its events lack them, and the privacy section (``s["dp"]["section"]``)."""
    try:
        data = json.loads((run / RESULTS).read_text())
    except (OSError, ValueError):
        return
    data = _dict(data)
    if not s["final"] and isinstance(data.get("final"), dict):
        s["final"] = data["final"]
    s["dp"]["section"] = _dict(data.get("privacy")) or None


def is_run_dir(path: Path) -> bool:
    return (path / EVENTS).is_file() or (path / RESULTS).is_file()


def rejections_table(run_dir: str | os.PathLike[str]) -> str | None:
    """Markdown table of a run's rejected replies (round, phase, site, reason) from its
    events; ``None`` without events or rejections."""
    events = read_events(Path(run_dir) / EVENTS)
    rows = summarize(events)["rejections"] if events else []
    if not rows:
        return None
    lines = ["| round | phase | site | reason |", "|---:|---|---|---|"]
    for x in rows:
        reason = x["reason"].replace("|", "/")
        lines.append(f"| {x['round']} | {x['phase']} | {x['site']} | {reason} |")
    return "\n".join(lines)


__all__ = [
    "EVENTS",
    "is_run_dir",
    "load_run",
    "read_events",
    "rejections_table",
    "summarize",
    "summarize_results",
]

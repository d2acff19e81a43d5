"""A run's differential privacy for the dashboard (README "Privacy"): epsilon per site and
round, from the ``privacy`` dict of each round record (``server.privacy.round_privacy``: in
the ``round-finished`` events of a live run, in the ``rounds`` of ``results.json`` of a
finished one) and, once the run is over, the ``privacy`` section of ``results.json``
(``server.privacy.privacy_summary``: accountant, budget, why the budget stopped the run).

:func:`run_privacy` gives ``None`` for a run without DP (its config has neither
``dp.enabled`` nor ``dp.site-clip``; nothing more is read then), else::

    {"delta", "accountant", "epsilon_budget", "slice_level" (bool), "site_level" (bool),
     "round" (of the last record with privacy figures), "epsilon": {site: latest epsilon},
     "epsilon_max" (the largest so far), "epsilon_next_max" (the largest one more round would
     give), "site_level_epsilon" (latest), "curves": {"epsilon": {site: [[round, eps], ...]},
     "site_level": [[round, eps], ...]}, "stopped" (str or None)}

Only scalars the server already wrote; anything that is not a finite number is ``None``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedunroll.events import EVENTS, RESULTS, read_events


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def dp_on(config: Mapping[str, Any]) -> tuple[bool, bool]:
    """``(slice_level, site_level)`` from a flat run config."""
    enabled = config.get("dp.enabled")
    slice_level = enabled is True or (isinstance(enabled, str) and enabled.lower() == "true")
    site_clip = config.get("dp.site-clip")
    if isinstance(site_clip, str):
        try:
            site_clip = float(site_clip)
        except ValueError:
            site_clip = None
    return slice_level, bool(_num(site_clip))


def _records_of_events(events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ``round-finished`` events in round order; a resume (``run-started`` at round k)
    drops what the killed run left after k, as :func:`fedunroll.events.summarize` does."""
    records: dict[int, Mapping[str, Any]] = {}
    for e in events:
        r = e.get("round")
        if e["type"] == "run-started":
            start = r if isinstance(r, int) else 0
            for k in [k for k in records if k > start]:
                del records[k]
        elif e["type"] == "round-finished" and isinstance(r, int):
            records[r] = e
    return [records[k] for k in sorted(records)]


def _read_results(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / RESULTS).read_text())
    except (OSError, ValueError):
        return {}
    return _dict(data)


def privacy_of(
    config: Mapping[str, Any],
    records: Iterable[Mapping[str, Any]],
    section: Mapping[str, Any] | None = None,
    upto: int | None = None,
) -> dict[str, Any] | None:
    """The dashboard's privacy dict (module docstring) from a flat run config, the round
    records (each with ``round`` and, with DP, ``privacy``) and the ``privacy`` section of
    ``results.json`` (``None`` while the run lives). ``upto``: ignore records after it."""
    slice_level, site_level = dp_on(config)
    section = _dict(section)
    if not (slice_level or site_level):
        return None
    out: dict[str, Any] = {
        "delta": _num(section.get("delta")),
        "accountant": None,
        "epsilon_budget": None,
        "slice_level": slice_level,
        "site_level": site_level,
        "round": None,
        "epsilon": {},
        "epsilon_max": None,
        "epsilon_next_max": None,
        "site_level_epsilon": None,
        "curves": {"epsilon": {}, "site_level": []},
        "stopped": None,
    }
    latest: dict[str, float | None] = {}
    curves: dict[str, list[list[float]]] = {}
    next_max: float | None = None
    for rec in records:
        r = rec.get("round")
        p = _dict(rec.get("privacy"))
        if not isinstance(r, int) or not p or (upto is not None and r > upto):
            continue
        out["round"] = r
        if out["delta"] is None:
            out["delta"] = _num(p.get("delta"))
        for site, value in sorted(_dict(p.get("epsilon")).items()):
            eps = _num(value)
            latest[str(site)] = eps
            if eps is not None:
                curves.setdefault(str(site), []).append([r, eps])
        nxt = [_num(v) for v in _dict(p.get("epsilon_next")).values()]
        next_max = max((v for v in nxt if v is not None), default=None)
        if "site_level_epsilon" in p:
            out["site_level_epsilon"] = _num(p.get("site_level_epsilon"))
            if out["site_level_epsilon"] is not None:
                out["curves"]["site_level"].append([r, out["site_level_epsilon"]])
    out["epsilon"] = dict(sorted(latest.items()))
    out["curves"]["epsilon"] = dict(sorted(curves.items()))
    out["epsilon_max"] = max((v for v in latest.values() if v is not None), default=None)
    out["epsilon_next_max"] = next_max
    if out["delta"] is None:
        out["delta"] = _num(config.get("dp.delta"))
    accountant = section.get("accountant", config.get("dp.accountant"))
    out["accountant"] = accountant if isinstance(accountant, str) and accountant else None
    budget = _num(section.get("epsilon_budget", config.get("dp.epsilon-budget")))
    out["epsilon_budget"] = budget if budget else None  # 0: no budget
    stopped = section.get("stopped")
    out["stopped"] = stopped if isinstance(stopped, str) and stopped else None
    return out


def run_privacy(run_dir: str | Path, s: Mapping[str, Any]) -> dict[str, Any] | None:
    """The privacy dict of the run in ``run_dir`` whose summary is ``s``
    (:func:`fedunroll.events.load_run`); ``None`` without DP (nothing is read then).

    A live run: its ``round-finished`` events. A finished one also reads ``results.json``
    for the accountant, the budget and the stop reason (only if that file covers the rounds
    of the summary: a stale file from an earlier attempt is not believed). A run shown from
    ``results.json``: that file's round records. Records after the summary's round are
    ignored, so the figures match the rest of the page even if the run moved on meanwhile.
    """
    config = _dict(s.get("config"))
    if not any(dp_on(config)):
        return None
    run = Path(run_dir)
    results = _read_results(run) if (s.get("source") == "results" or not s.get("live")) else {}
    section = _dict(results.get("privacy"))
    if section and section.get("rounds") != s.get("round"):
        section = {}
    records: list[Mapping[str, Any]]
    if s.get("source") == "results":
        records = [r for r in results.get("rounds") or [] if isinstance(r, dict)]
    else:
        records = _records_of_events(read_events(run / EVENTS))
    return privacy_of(config, records, section or None, upto=s.get("round"))


__all__ = ["dp_on", "privacy_of", "run_privacy"]

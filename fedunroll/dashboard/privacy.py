"""A run's differential privacy for the dashboard (README "Privacy"): epsilon per site and
round, from the ``privacy`` dict of each round record (``server.privacy.round_privacy``) and,
once the run is over, the ``privacy`` section of ``results.json``
(``server.privacy.privacy_summary``: accountant, budget, why the budget stopped the run). Both
come in the run's summary (``s["dp"]`` of :func:`fedunroll.events.load_run`, which reads the
run's files and drops the rounds a resume redoes): nothing is read here.

:func:`run_privacy` gives ``None`` for a run without DP (its config has neither
``dp.enabled`` nor ``dp.site-clip > 0``: :func:`dp_on`), else::

    {"delta", "accountant", "epsilon_budget", "slice_level" (bool), "site_level" (bool),
     "round" (of the last record with privacy figures), "epsilon": {site: latest epsilon},
     "epsilon_max" (the largest so far), "epsilon_next_max" (the largest one more round would
     give), "site_level_epsilon" (latest), "curves": {"epsilon": {site: [[round, eps], ...]},
     "site_level": [[round, eps], ...]}, "stopped" (str or None)}

Only scalars the server already wrote; anything that is not a finite number is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def dp_on(config: Mapping[str, Any]) -> tuple[bool, bool]:
    """``(slice_level, site_level)``: ``dp.enabled`` and ``dp.site-clip > 0`` (the server's
    rule, ``server.privacy.round_privacy``) of a flat run config as the project parses it
    (:func:`fedunroll.report.recorded_run_config`: ``recon.config.parse_run_config``, keys of
    other versions dropped). A config it refuses (a bad value, a foreign or partial config
    that does not validate) counts as no DP: ``(False, False)``."""
    from fedunroll.report import recorded_run_config  # torch, through recon.config
    from recon.config import ConfigError

    try:
        dp = recorded_run_config(config).dp
    except ConfigError:
        return False, False
    return dp.enabled, dp.site_clip > 0


def privacy_of(
    config: Mapping[str, Any],
    records: Iterable[Mapping[str, Any]],
    section: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The dashboard's privacy dict (module docstring) from a flat run config, the round
    records (each with ``round`` and, with DP, ``privacy``) and the ``privacy`` section of
    ``results.json`` (``None`` while the run lives)."""
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
        if not isinstance(r, int) or not p:
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


def run_privacy(s: Mapping[str, Any]) -> dict[str, Any] | None:
    """The privacy dict of the run whose summary is ``s`` (:func:`fedunroll.events.load_run`:
    its ``config`` and ``dp``); ``None`` without DP.

    The round records are those of the summary's rounds (a resume's redone rounds replace the
    killed run's). The ``results.json`` section of a run that is over (the accountant, the
    budget, the stop reason) is believed only if it covers the rounds of the summary: a stale
    file from an earlier attempt is not.
    """
    config = _dict(s.get("config"))
    if not any(dp_on(config)):
        return None
    dp = _dict(s.get("dp"))
    section = _dict(dp.get("section"))
    if section and section.get("rounds") != s.get("round"):
        section = {}
    return privacy_of(config, dp.get("records") or [], section or None)


__all__ = ["dp_on", "privacy_of", "run_privacy"]

"""The server's view of a run's differential privacy (README "Privacy"): per-round epsilon
records, the stop at ``dp.epsilon-budget`` and the ``privacy`` section of ``results.json``.

Slice-level epsilon is what each site reports (``dp-epsilon``: Opacus's accountant over
``round x local steps`` Poisson-subsampled Gaussian steps at ``q = batch-size / N``; the site
computes it from the run config and its slice count, so anyone with both can recompute it).
Site-level epsilon (``dp.site-noise-multiplier``) is computed here from the config alone: one
Gaussian mechanism per round, every site counted in every round (no sampling amplification).
Both are recomputed from the checkpointed round records on resume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from recon.config import RunConfig
from recon.train.privacy import epsilon
from strategies.protocol import DP_EPSILON, DP_EPSILON_NEXT


def site_level_epsilon(cfg: RunConfig, rounds: int) -> float | None:
    """Epsilon of the server's site-level noise after ``rounds`` rounds (None: not enabled)."""
    dp = cfg.dp
    if not dp.site_clip:
        return None
    return epsilon(dp.site_noise_multiplier, 1.0, rounds, dp.delta, dp.accountant)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def round_privacy(
    cfg: RunConfig, server_round: int, train_sites: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """``{"privacy": {...}}`` for round ``server_round``'s record (``{}`` without DP)."""
    if not (cfg.dp.enabled or cfg.dp.site_clip):
        return {}
    out: dict[str, Any] = {"delta": cfg.dp.delta}
    if cfg.dp.enabled:
        eps = {s: float(m[DP_EPSILON]) for s, m in train_sites.items() if DP_EPSILON in m}
        nxt = {s: float(m[DP_EPSILON_NEXT]) for s, m in train_sites.items() if DP_EPSILON_NEXT in m}
        out.update(
            epsilon=dict(sorted(eps.items())),
            epsilon_next=dict(sorted(nxt.items())),
            epsilon_max=max(eps.values(), default=None),
        )
    if cfg.dp.site_clip:
        out["site_level_epsilon"] = _finite(site_level_epsilon(cfg, server_round))
    return {"privacy": out}


def budget_stop(cfg: RunConfig, rounds: list[dict[str, Any]]) -> str | None:
    """Why the next round must not start (``dp.epsilon-budget``), or None."""
    budget = cfg.dp.epsilon_budget
    if not budget or not rounds:
        return None
    last = rounds[-1]
    done, nxt = int(last["round"]), last["round"] + 1
    privacy = last.get("privacy", {})
    for site, eps in sorted(privacy.get("epsilon_next", {}).items()):
        if eps > budget:
            return (
                f"privacy budget: round {nxt} would take {site} to epsilon {eps:.3g} > "
                f"dp.epsilon-budget {budget:g} (delta {cfg.dp.delta:g}; after round {done}: "
                f"{privacy.get('epsilon', {}).get(site, float('nan')):.3g})"
            )
    site_eps = site_level_epsilon(cfg, nxt) if cfg.dp.site_noise_multiplier else None
    if site_eps is not None and site_eps > budget:
        return (
            f"privacy budget: round {nxt} would take the site-level epsilon to {site_eps:.3g} > "
            f"dp.epsilon-budget {budget:g} (delta {cfg.dp.delta:g})"
        )
    return None


def privacy_summary(
    cfg: RunConfig, rounds: list[dict[str, Any]], stopped: str | None
) -> dict[str, Any]:
    """The ``privacy`` section of ``results.json``."""
    dp = cfg.dp
    last: dict[str, Any] = next((r["privacy"] for r in reversed(rounds) if "privacy" in r), {})
    out: dict[str, Any] = {
        "delta": dp.delta,
        "accountant": dp.accountant,
        "epsilon_budget": dp.epsilon_budget or None,
        "rounds": len(rounds),
        "stopped": stopped,
    }
    if dp.enabled:
        out["slice_level"] = {
            "clip": dp.clip,
            "noise_multiplier": dp.noise_multiplier,
            "sampling": "Poisson, q = train.batch-size / site training slices",
            "epsilon": last.get("epsilon", {}),
            "epsilon_max": last.get("epsilon_max"),
        }
    if dp.site_clip:
        out["site_level"] = {
            "clip": dp.site_clip,
            "noise_multiplier": dp.site_noise_multiplier,
            "epsilon": _finite(site_level_epsilon(cfg, len(rounds))),
        }
    return out

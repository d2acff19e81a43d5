"""The server side of the personalization phase (issue 5; Levac et al. 2023 Sec. 3.4, 4.3, Table 1).

Held-out ("unseen") sites: with ``data.unseen-sites`` > 0, :class:`server.grid.TrainingGrid`
(which asks every node which site it serves before round 1) hides the unseen nodes from the
round loop, so they never get a train or evaluate message.

After the last round (``personalize.enabled``), :func:`personalization_phase` sends the final
global arrays and the CV grid in a ``train.personalize`` message to every connected node, seen
and unseen; each site fine-tunes locally, keeps the weights and replies scalar metrics only.
The replies become ``results.json["personalization"]``::

    {site: {"seen": bool, "before": {"ssim", "nrmse", "psnr"}, "after": {...},
            "r_fine": float | null, "n_fine": int, "fine_tune": bool, "decision": str,
            "num-examples": int, "seconds": float}}

A site that fails is recorded as ``{"seen": bool, "error": reason}``; the run stays completed.
The reason is the kind of failure (``protocol.error_kind``) or why its reply was refused, never
the reply's text. Site-query and personalization replies are checked like every other reply
(``protocol.QUERY_SCHEMA`` / ``PERSONALIZE_SCHEMA``) and named by the run's node -> site
binding (:class:`strategies.flower.SiteNames`): a node cannot report for another site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from recon.config import RunConfig
from server.federation import exchange
from strategies.flower import SiteNames
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    METRIC_KEYS,
    NUM_EXAMPLES,
    P_FOLDS,
    P_LRS,
    P_MAX_EPOCHS,
    P_MIN_GAIN,
    P_PATIENCE,
    PERSONALIZE,
    PERSONALIZE_SCHEMA,
    RUN_UID,
    ReplyError,
    bounded,
    check_content,
    get_float,
    get_int,
    parse_error,
    site_claim,
)


def personalize_config_record(
    cfg: RunConfig, run_uid: str, extra: Mapping[str, Any] | None = None
) -> ConfigRecord:
    """What a ``train.personalize`` message tells the sites besides the arrays.

    ``extra`` carries what the training messages carried too (a searched denoiser's genotype),
    so a site rebuilds the same architecture.
    """
    p = cfg.personalize
    return ConfigRecord(
        {
            RUN_UID: run_uid,
            P_LRS: p.lrs,
            P_MAX_EPOCHS: p.max_epochs,
            P_FOLDS: p.folds,
            P_PATIENCE: p.patience,
            P_MIN_GAIN: p.min_gain,
            **dict(extra or {}),
        }
    )


def decision_text(entry: Mapping[str, Any]) -> str:
    """One line for the report: what the site did with the global model."""
    if entry["fine_tune"]:
        return f"fine-tuned: r_fine={entry['r_fine']:g}, N_fine={entry['n_fine']} epochs"
    return "kept the global model: cross-validation found no gain from fine-tuning"


def personalization_entry(metrics: Mapping[str, Any], seen: bool) -> dict[str, Any]:
    """A site's ``results.json["personalization"]`` entry from its reply metrics."""
    fine_tune = bool(get_int(metrics, "fine-tune"))
    entry: dict[str, Any] = {
        "seen": seen,
        "before": {k: get_float(metrics, f"before-{k}") for k in METRIC_KEYS},
        "after": {k: get_float(metrics, f"after-{k}") for k in METRIC_KEYS},
        "r_fine": get_float(metrics, "r-fine") if fine_tune else None,
        "n_fine": get_int(metrics, "n-fine"),
        "fine_tune": fine_tune,
        "num-examples": get_int(metrics, NUM_EXAMPLES),
        "seconds": get_float(metrics, "seconds", math.nan),
    }
    for key in ("cv-ssim-global", "cv-ssim-best"):
        if key in metrics:
            entry[key.replace("-", "_")] = get_float(metrics, key)
    entry["decision"] = decision_text(entry)
    return entry


def personalization_phase(
    grid: Grid,
    arrays: ArrayRecord,
    cfg: RunConfig,
    run_uid: str,
    unseen: Mapping[int, bool] | None = None,
    sites: Mapping[int, str] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Ask every connected node (seen and unseen) to personalize ``arrays``; collect metrics.

    Parameters
    ----------
    grid : Grid
        The full grid (not the :class:`TrainingGrid` view): unseen sites personalize too.
    unseen, sites : mapping node -> bool / site name, optional
        What :class:`TrainingGrid` and the rounds learned; a node missing from ``unseen`` took
        part in training (``seen``). ``sites`` are the run's bindings (a :class:`SiteNames`
        is used, and extended, as it is): a reply is named by its node's binding.
    """
    unseen = dict(unseen or {})
    known = sites if isinstance(sites, SiteNames) else SiteNames(sites)
    nodes = list(grid.get_node_ids())
    known.connected(nodes)
    config = personalize_config_record(cfg, run_uid, extra_config)
    msgs = [
        Message(
            RecordDict({ARRAYS: arrays, CONFIG: config}),
            dst_node_id=n,
            message_type=PERSONALIZE,
        )
        for n in nodes
    ]
    log(INFO, "personalization: %d site(s), CV grid lrs=%s", len(nodes), cfg.personalize.lrs)
    pairs, missing = exchange(grid, msgs, cfg.personalize.timeout)
    out: dict[str, dict[str, Any]] = {}
    for reply, node in sorted(pairs, key=lambda p: p[1]):
        seen = not unseen.get(node, False)
        site = known.name(node)
        if reply.has_error():
            kind, claim = parse_error(reply.error.code, reply.error.reason)
            site, why = known.resolve(node, claim) if claim else (site, None)
            reason = why or f"client error: {kind}"
            log(WARNING, "personalization: %s failed: %s", site, reason)
            out[site] = {"seen": seen, "error": reason}
            continue
        try:
            site, why = known.resolve(node, site_claim(reply.content))
            if why is not None:
                raise ReplyError(why)
            metrics = check_content(reply.content, PERSONALIZE_SCHEMA)
            out[site] = personalization_entry(metrics, seen)
        except (KeyError, ValueError, ReplyError) as err:  # only ReplyError's text is kept
            reason = bounded(f"bad reply: {err}" if isinstance(err, ReplyError) else "bad reply")
            log(WARNING, "personalization: %s sent a bad reply: %s", site, reason)
            out[site] = {"seen": seen, "error": reason}
            continue
        kind = "seen" if seen else "unseen"
        log(INFO, "personalization: %s (%s): %s", site, kind, out[site]["decision"])
    for node in missing:
        site = known.name(node)
        reason = f"no reply within personalize.timeout ({cfg.personalize.timeout:.0f} s)"
        log(WARNING, "personalization: %s: %s", site, reason)
        out[site] = {"seen": not unseen.get(node, False), "error": reason}
    return dict(sorted(out.items()))


__all__ = [
    "decision_text",
    "personalization_entry",
    "personalization_phase",
    "personalize_config_record",
]

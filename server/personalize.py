"""The server side of the personalization phase (issue 5; Levac et al. 2023 Sec. 3.4, 4.3, Table 1).

Held-out ("unseen") sites: with ``data.unseen-sites`` > 0 the server asks every node once which
site it serves and whether it is held out (a ``query.site`` message, answered by
:func:`client.personalize.site_query_handler`). :class:`TrainingGrid` then hides the unseen
nodes from the round loop, so they never get a train or evaluate message; nodes that connect
later are asked when they first appear.

After the last round (``personalize.enabled``), :func:`personalization_phase` sends the final
global arrays and the CV grid in a ``train.personalize`` message to every connected node, seen
and unseen; each site fine-tunes locally, keeps the weights and replies scalar metrics only.
The replies become ``results.json["personalization"]``::

    {site: {"seen": bool, "before": {"ssim", "nrmse", "psnr"}, "after": {...},
            "r_fine": float | null, "n_fine": int, "fine_tune": bool, "decision": str,
            "num-examples": int, "seconds": float}}

A site that fails is recorded as ``{"seen": bool, "error": reason}``; the run stays completed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from recon.config import RunConfig
from server.federation import exchange
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    METRIC_KEYS,
    METRICS,
    NUM_EXAMPLES,
    P_FOLDS,
    P_LRS,
    P_MAX_EPOCHS,
    P_MIN_GAIN,
    P_PATIENCE,
    PERSONALIZE,
    RUN_UID,
    SITE_ID,
    SITE_QUERY,
    UNSEEN,
    ReplyError,
    get_float,
    get_int,
    validate_metrics,
)


class TrainingGrid(Grid):
    """``grid`` without its unseen nodes; every other call goes to ``grid`` unchanged.

    ``unseen`` (node -> bool) and ``sites`` (node -> site id) are filled by asking each new
    node once (``query.site``). A node that cannot answer counts as a training node (a broken
    site then fails its train message and is excluded there, with the reason).
    """

    def __init__(self, grid: Grid, cfg: RunConfig) -> None:
        self.grid = grid
        self.timeout = cfg.federation.round_timeout
        self.unseen: dict[int, bool] = {}
        self.sites: dict[int, str] = {}

    def classify(self, nodes: Iterable[int]) -> None:
        """Ask the nodes not asked yet which site they serve and whether it is held out."""
        new = [n for n in nodes if n not in self.unseen]
        if not new:
            return
        msgs = [
            Message(RecordDict({CONFIG: ConfigRecord()}), dst_node_id=n, message_type=SITE_QUERY)
            for n in new
        ]
        pairs, missing = exchange(self.grid, msgs, self.timeout)
        for reply, node in pairs:
            self.unseen[node] = False
            if reply.has_error():
                log(WARNING, "site query: node %d failed: %s", node, reply.error.reason)
                continue
            config = reply.content.config_records.get(CONFIG, ConfigRecord())
            self.unseen[node] = bool(config.get(UNSEEN, False))
            if SITE_ID in config:
                self.sites[node] = str(config[SITE_ID])
        for node in missing:
            self.unseen[node] = False
            log(WARNING, "site query: no reply from node %d; treated as a training site", node)
        held_out = sorted(self.sites.get(n, f"node-{n}") for n in new if self.unseen[n])
        if held_out:
            log(INFO, "held out of training (unseen): %s", ", ".join(held_out))

    # --- Grid API -------------------------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self.grid.get_node_ids())
        self.classify(nodes)
        return [n for n in nodes if not self.unseen.get(n, False)]

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


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
    unseen, sites : mapping node -> bool / site id, optional
        What :class:`TrainingGrid` and the rounds learned; a node missing from ``unseen`` took
        part in training (``seen``).
    """
    unseen = dict(unseen or {})
    known = dict(sites or {})
    nodes = list(grid.get_node_ids())
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
    for reply, node in pairs:
        seen = not unseen.get(node, False)
        site = known.get(node, f"node-{node}")
        if reply.has_error():
            log(WARNING, "personalization: %s failed: %s", site, reply.error.reason)
            out[site] = {"seen": seen, "error": reply.error.reason}
            continue
        config_rec = reply.content.config_records.get(CONFIG, ConfigRecord())
        site = str(config_rec.get(SITE_ID, site))
        try:
            if reply.content.array_records:
                raise ReplyError("personalization replies must not carry arrays")
            metrics = dict(reply.content.metric_records[METRICS])
            validate_metrics(metrics)
            out[site] = personalization_entry(metrics, seen)
        except (KeyError, ValueError, ReplyError) as err:
            log(WARNING, "personalization: %s sent a bad reply: %s", site, err)
            out[site] = {"seen": seen, "error": f"bad reply: {err}"}
            continue
        kind = "seen" if seen else "unseen"
        log(INFO, "personalization: %s (%s): %s", site, kind, out[site]["decision"])
    for node in missing:
        site = known.get(node, f"node-{node}")
        reason = f"no reply within personalize.timeout ({cfg.personalize.timeout:.0f} s)"
        log(WARNING, "personalization: %s: %s", site, reason)
        out[site] = {"seen": not unseen.get(node, False), "error": reason}
    return dict(sorted(out.items()))


__all__ = [
    "TrainingGrid",
    "decision_text",
    "personalization_entry",
    "personalization_phase",
    "personalize_config_record",
]

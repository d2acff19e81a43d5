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
The reason is the kind of failure (``protocol.error_kind``) or why its reply was refused, never
the reply's text. Site-query and personalization replies are checked like every other reply
(``protocol.QUERY_SCHEMA`` / ``PERSONALIZE_SCHEMA``) and named by the run's node -> site
binding (:class:`strategies.flower.SiteNames`): a node cannot report for another site.
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
    QUERY_SCHEMA,
    RUN_UID,
    SITE_QUERY,
    UNSEEN,
    ReplyError,
    bounded,
    check_content,
    get_float,
    get_int,
    parse_error,
    site_claim,
)


class TrainingGrid(Grid):
    """``grid`` without its unseen nodes; every other call goes to ``grid`` unchanged.

    ``unseen`` (node -> bool) and ``sites`` (node -> site name, bound on the node's first
    reply: pass the training strategy's ``sites`` so that both share one binding) are filled by
    asking each new node once (``query.site``). A node that cannot answer counts as a training
    node (a broken site then fails its train message and is excluded there, with the reason).
    """

    def __init__(self, grid: Grid, cfg: RunConfig, sites: SiteNames | None = None) -> None:
        self.grid = grid
        self.timeout = cfg.federation.round_timeout
        # once min-fit-clients answered, the rest get the round's grace period (round-grace):
        # a silent node costs seconds here, not round-timeout
        self.needed = cfg.federation.min_fit_clients
        self.grace = cfg.federation.round_grace
        self.unseen: dict[int, bool] = {}
        self.sites = SiteNames() if sites is None else sites

    def classify(self, nodes: Iterable[int]) -> None:
        """Ask the nodes not asked yet which site they serve and whether it is held out."""
        nodes = list(nodes)
        self.sites.connected(nodes)
        new = [n for n in nodes if n not in self.unseen]
        if not new:
            return
        msgs = [
            Message(RecordDict({CONFIG: ConfigRecord()}), dst_node_id=n, message_type=SITE_QUERY)
            for n in new
        ]
        pairs, missing = exchange(
            self.grid, msgs, self.timeout, needed=min(len(new), self.needed), grace=self.grace
        )
        for reply, node in sorted(pairs, key=lambda p: p[1]):
            self.unseen[node] = False
            site, why = self._read(reply, node)
            if why is not None:
                log(WARNING, "site query: reply from %s refused: %s", site, why)
                continue
            config = reply.content.config_records.get(CONFIG, ConfigRecord())
            self.unseen[node] = config.get(UNSEEN, False) is True
        for node in missing:
            self.unseen[node] = False
            log(WARNING, "site query: no reply from node %d; treated as a training site", node)
        held_out = sorted(self.sites.get(n, f"node-{n}") for n in new if self.unseen[n])
        if held_out:
            log(INFO, "held out of training (unseen): %s", ", ".join(held_out))

    def _read(self, reply: Message, node: int) -> tuple[str, str | None]:
        """(the node's site, why the query reply is refused or None)."""
        if reply.has_error():
            kind, claim = parse_error(reply.error.code, reply.error.reason)
            site, why = self.sites.resolve(node, claim) if claim else (self.sites.name(node), None)
            return site, why or f"client error: {kind}"
        try:
            claim = site_claim(reply.content)
            site, why = self.sites.resolve(node, claim)
            if why is None:
                check_content(reply.content, QUERY_SCHEMA)
            return site, why
        except ReplyError as err:
            return self.sites.name(node), bounded(str(err))

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
    "TrainingGrid",
    "decision_text",
    "personalization_entry",
    "personalization_phase",
    "personalize_config_record",
]

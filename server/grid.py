"""Which site each node serves, asked before round 1 (``query.site``), and the round loop's view of
the nodes.

Before round 1 of every run the ServerApp asks each node which site it serves and whether that
site is held out (``data.unseen-sites``), in a ``query.site`` message answered from the node's
config alone (:func:`client.personalize.site_query_handler`). That binds node -> site for the whole
run (:class:`strategies.flower.SiteNames`) and starts each simulated node's actor before round 1's
clock. :class:`TrainingGrid` then hides the unseen nodes from the rounds; nodes that connect later
are asked when they first appear. Replies are checked like every other reply
(``protocol.QUERY_SCHEMA``), refused with a reason that never echoes their content.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from recon.config import RunConfig
from server.federation import exchange
from strategies.flower import SiteNames
from strategies.protocol import (
    CONFIG,
    QUERY_SCHEMA,
    SITE_QUERY,
    UNSEEN,
    ReplyError,
    bounded,
    check_content,
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


__all__ = ["TrainingGrid"]

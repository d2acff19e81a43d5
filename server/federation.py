"""The round loop: a strategy's four methods driven round by round, with checkpoints.

Flower's ``Strategy.start`` always counts from round 1 and keeps nothing on disk; a resumed run
must continue at round k+1 with the strategy state, RNG state and per-round records of round k.
So this module drives the same four strategy methods (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) and adds, around them:

- a bounded wait for nodes before each phase (Flower's sampling waits forever),
- per-site train/eval metrics, rejected replies (errors, invalid arrays, no reply in time) and
  bytes on the wire for every round,
- streaming train replies: each is handed to the strategy's :class:`TrainReplies` as it is
  pulled (checked, decoded, its arrays spilled to a scratch directory in the run directory,
  removed after the round), so the server holds O(1) replies' arrays, not every sampled site's,
- an atomic checkpoint after every round (:mod:`server.checkpoint`),
- a final evaluation of the global model on the sites' test slices (and zero-filled; every
  site up to 32, else a seeded sample of ``final-eval-sites``, :func:`final_eval_nodes`); its
  replies are checked like every other (identity, ``protocol.FINAL_SCHEMA``): a bad one is
  rejected and logged, never an exception that ends the run.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from recon.config import RunConfig
from server import checkpoint
from server.events import RunEvents
from server.privacy import budget_stop, round_privacy
from server.results import eval_entry, metric_triplet, train_entry
from strategies.flower import NotEnoughReplies, SiteNames, site_order
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    EVAL_GLOBAL,
    EVAL_SPLIT,
    FINAL_SCHEMA,
    GLOBAL_METRIC_KEYS,
    GLOBAL_PREFIX,
    RUN_DONE,
    RUN_UID,
    ReplyError,
    check_content,
    records_of,
    to_numpy,
)
from strategies.spill import SCRATCH_PREFIX

# Seconds without a new node, once min-available-clients are connected, after which the run
# stops waiting for data.num-sites (Federation.wait_for_expected_sites).
SETTLE_SECONDS = 5.0


# Once the needed replies are in, the stragglers get at least this many seconds (a SuperNode
# polls the SuperLink every few seconds, so a finished reply can lag its node's work that much).
GRACE_FLOOR = 3.0
# Pull interval: short after a reply came, growing while none does (one SuperLink call each).
POLL_MIN, POLL_MAX = 0.05, 1.0


@dataclass
class Replies:
    """What :func:`collect` got back.

    ``pairs`` are (reply, node) in arrival order (empty when an ``on_reply`` consumed them);
    ``sizes`` node -> bytes of its reply's ArrayRecords (:func:`reply_bytes`), for every
    reply; ``missing`` the nodes without a reply, of which ``late`` are those cut off by the
    grace period (the others hit the timeout or could not be pushed); ``grace`` the grace
    period applied, in seconds (None: all replies came before it started, or no grace was
    asked); ``stale`` the replies ignored as answering no message of this exchange;
    ``reply_seconds`` node -> seconds from the push to its reply.
    """

    pairs: list[tuple[Message, int]] = field(default_factory=list)
    sizes: dict[int, int] = field(default_factory=dict)
    reply_seconds: dict[int, float] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    grace: float | None = None
    stale: int = 0
    seconds: float = 0.0


def grace_seconds(reply_seconds: list[float], factor: float) -> float:
    """The grace period: ``max(GRACE_FLOOR, factor * median(reply_seconds))``."""
    if not reply_seconds:
        return GRACE_FLOOR
    return max(GRACE_FLOOR, factor * statistics.median(reply_seconds))


def collect(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    *,
    needed: int | None = None,
    grace: float = 0.0,
    on_reply: Callable[[Message, int], None] | None = None,
) -> Replies:
    """Push ``messages``, then pull their replies until all are in or the wait is over.

    The wait ends at ``timeout`` s after the push at the latest. With ``needed`` and ``grace``
    > 0 it ends earlier: once ``needed`` replies without an error are in (at time ``t_n``),
    the rest get until ``t_n + max(GRACE_FLOOR, grace * m)``, where ``m`` is the median time
    from the push to each error-free reply received so far (re-evaluated as replies come), so
    one dead site costs the grace period, not ``timeout``. Every reply is attributed to the
    node its message was sent to (``reply_to_message_id``, see
    :func:`strategies.flower.reply_node`), not to its ``src_node_id``: the SuperLink answers for
    a dead node with an error reply of its own. A reply to no message of this exchange (a
    stale reply of an earlier round, a duplicate) is logged and ignored.

    With ``on_reply``, each reply is passed to ``on_reply(reply, node)`` as it is pulled and
    then dropped (``pairs`` stays empty; ``sizes`` has its bytes), so a consumer that keeps
    only what it needs (:class:`strategies.flower.TrainReplies`) holds one reply at a time
    beyond those one pull returned together.
    """
    t0 = time.monotonic()
    out = Replies()
    if not messages:
        return out
    ids = list(grid.push_messages(messages))
    if len(ids) != len(messages):  # a grid that does not return one id per message
        ids = [m.metadata.message_id for m in messages]
    sent: dict[str, int] = {}
    for msg, mid in zip(messages, ids, strict=True):
        if mid:
            sent[str(mid)] = msg.metadata.dst_node_id
        else:
            log(WARNING, "message to node %d could not be pushed", msg.metadata.dst_node_id)
    pending = set(sent)
    need = len(sent) if needed is None or grace <= 0 else min(needed, len(sent))
    ok_seconds: list[float] = []
    t_needed: float | None = None
    deadline = t0 + timeout
    poll = POLL_MIN
    while pending:
        got = list(grid.pull_messages(sorted(pending)))
        now = time.monotonic()
        pulled = len(got)
        got.reverse()
        while got:
            reply = got.pop()  # the list lets go of each reply once it is handled
            rid = reply.metadata.reply_to_message_id
            if rid not in pending:
                out.stale += 1
                log(
                    WARNING,
                    "ignored a reply from node %d to message %s: not one of this exchange's "
                    "(stale or duplicate)",
                    reply.metadata.src_node_id,
                    rid[:12] or "(none)",
                )
                continue
            pending.discard(rid)
            node = sent[rid]
            out.sizes[node] = out.sizes.get(node, 0) + reply_bytes(reply)
            out.reply_seconds[node] = now - t0
            if not reply.has_error():
                ok_seconds.append(now - t0)
            if on_reply is None:
                out.pairs.append((reply, node))
            else:
                on_reply(reply, node)
            del reply
        if t_needed is None and len(ok_seconds) >= need:
            t_needed = now
        if not pending:
            break
        stop = deadline
        if t_needed is not None:
            out.grace = grace_seconds(ok_seconds, grace)
            stop = min(deadline, t_needed + out.grace)
        if now >= stop:
            break
        time.sleep(min(poll, stop - now))
        poll = POLL_MIN if pulled else min(POLL_MAX, poll * 1.5)
    replied = set(out.sizes)
    out.missing = [
        m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in replied
    ]
    cut = out.grace is not None and t_needed is not None and t_needed + out.grace < deadline
    out.late = [sent[mid] for mid in sorted(pending)] if cut else []
    out.seconds = time.monotonic() - t0
    return out


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    *,
    needed: int | None = None,
    grace: float = 0.0,
) -> tuple[list[tuple[Message, int]], list[int]]:
    """Send ``messages`` and wait for the replies (:func:`collect`).

    Returns the (reply, node) pairs and the nodes that did not reply. Without ``needed`` it
    waits for every reply, at most ``timeout`` s.
    """
    got = collect(grid, messages, timeout, needed=needed, grace=grace)
    return got.pairs, got.missing


def robust_options(cfg: RunConfig) -> dict[str, Any]:
    """The strategy keyword options of the run config's ``robust`` section."""
    r = cfg.robust
    return {
        "max_examples_factor": r.max_examples_factor,
        "norm_factor": r.norm_factor,
        "aggregator": r.aggregator,
        "trim_beta": r.trim_beta,
        "byzantine": r.byzantine,
        "clip_norm": r.clip_norm,
    }


class NodesUnavailable(RuntimeError):
    """Fewer nodes connected than the run needs, after the bounded wait."""


@dataclass
class Progress:
    """Mutable state of a run between rounds (checkpointed)."""

    round: int
    arrays: ArrayRecord
    rounds: list[dict[str, Any]] = field(default_factory=list)
    elapsed_seconds: float = 0.0  # wall time of earlier invocations (resume)


def reply_bytes(message: Message) -> int:
    """Bytes of the ArrayRecords in one message's content (what dominates the wire)."""
    if not message.has_content():
        return 0
    arrays = records_of(message.content, ArrayRecord)  # no RecordDict view: no cycle
    return int(sum(rec.count_bytes() for rec in arrays.values()))


def payload_bytes(messages: Iterable[Message]) -> int:
    """Bytes of all ArrayRecords in the messages' content (what dominates the wire)."""
    return sum(reply_bytes(m) for m in messages)


def wait_for_nodes(grid: Grid, needed: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Node ids once ``needed`` are connected; :class:`NodesUnavailable` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if time.monotonic() >= deadline:
            raise NodesUnavailable(
                f"only {len(nodes)} node(s) connected after {timeout:.0f} s, need {needed} "
                "(min-available-clients); are the SuperNodes running? (node-wait-timeout)"
            )
        log(INFO, "waiting for nodes: %d connected, need %d", len(nodes), needed)
        time.sleep(poll)


class Federation:
    """Run rounds ``progress.round + 1 .. num-server-rounds`` of ``strategy`` on ``grid``.

    Parameters
    ----------
    grid : Grid
        Flower's grid (or :class:`inprocess.InProcessGrid` in tests).
    strategy : strategies.flower._Base
        A fedunroll strategy (validates replies, keeps ``rejected`` and per-site metrics).
    cfg : RunConfig
        The parsed run config.
    run_dir : Path
        Where ``checkpoint.pt`` is written after every round.
    run_uid : str
        Stable id of the run across resumes (sent to clients as ``run.uid``).
    after_round : callable, optional
        ``after_round(round_record)`` after each checkpoint (progress printing, tests).
    extra_config : dict, optional
        Entries added to the config of every message (``nas.genotype`` of a searched net).
    """

    def __init__(
        self,
        grid: Grid,
        strategy: Any,
        cfg: RunConfig,
        run_dir: Path,
        run_uid: str,
        after_round: Callable[[dict[str, Any]], None] | None = None,
        extra_config: dict[str, Any] | None = None,
        events: RunEvents | None = None,
    ) -> None:
        self.grid = grid
        self.events = events or RunEvents(None)  # run events (server.events); none by default
        self.extra_config = dict(extra_config or {})  # added to every message's config
        self.strategy = strategy
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_uid = run_uid
        self.after_round = after_round
        # node id -> bound site name: the strategy's (strategy state, so resume keeps it)
        self.sites: SiteNames = strategy.sites
        self._late: dict[int, str] = {}  # node -> reason, cut off by the last exchange's grace
        self.stopped: str | None = None  # why the rounds stopped early (dp.epsilon-budget)

    # --- helpers ------------------------------------------------------------------------------
    def _needed(self) -> int:
        return self.cfg.federation.min_available_clients

    def _exchange(
        self, messages: list[Message], on_reply: Callable[[Message, int], None] | None = None
    ) -> Replies:
        """:func:`collect` on the run's grid: at most ``round-timeout``, and once the strategy's
        minimum of valid replies is in, at most the grace period (``round-grace``) more.
        Nodes cut off by the grace period get their reason in :meth:`_why_missing`."""
        fed = self.cfg.federation
        needed = getattr(self.strategy, "min_valid_replies", fed.min_fit_clients)
        got = collect(
            self.grid,
            messages,
            fed.round_timeout,
            needed=needed,
            grace=fed.round_grace,
            on_reply=on_reply,
        )
        self._late = {
            node: f"no reply within the grace period ({got.grace or 0:.1f} s after the {needed} "
            f"needed replies, round-grace {fed.round_grace:g}), i.e. no reply within "
            f"round-timeout ({fed.round_timeout:.0f} s) shortened by round-grace"
            for node in got.late
        }
        return got

    def _why_missing(self, node: int, timed_out: str) -> str:
        """Why ``node`` did not reply in the last exchange: the grace period, else ``timed_out``."""
        return self._late.get(node, timed_out)

    def _site(self, node: int) -> str:
        return self.sites.name(node)

    def _config(self, split: str | None = None) -> ConfigRecord:
        config = ConfigRecord({**self.extra_config, RUN_UID: self.run_uid})
        if split is not None:
            config[EVAL_SPLIT] = split
        return config

    # --- one round ----------------------------------------------------------------------------
    def run_round(self, progress: Progress) -> dict[str, Any]:
        """Train, aggregate, evaluate; returns the round's ``results.json`` record."""
        r = progress.round + 1
        fed = self.cfg.federation
        t0 = time.perf_counter()
        nodes = wait_for_nodes(self.grid, self._needed(), fed.node_wait_timeout)
        self.events.round_started(r, nodes, self._site)
        piggyback = fed.eval_mode == "piggyback" and self._can_piggyback()
        # piggyback: the sites evaluate the global model of round r - 1 (what they receive) on
        # their validation slices before training; that round's record is still waiting for it
        pending = piggyback and bool(progress.rounds) and not progress.rounds[-1]["eval"]
        train_config = self._config()
        if pending:
            train_config[EVAL_GLOBAL] = True
        train_msgs = list(
            self.strategy.configure_train(r, progress.arrays, train_config, self.grid)
        )
        sent = payload_bytes(train_msgs)
        first_rejection = len(self.strategy.rejected)
        # each reply is checked and spilled to the run directory as it comes (scratch removed
        # after the round, also when it fails); the strategy keeps no reply's arrays
        with self.strategy.train_replies(self.run_dir) as stream:
            got = self._exchange(train_msgs, on_reply=stream.add)
            received = sum(got.sizes.values())
            for node in got.missing:
                reason = self._why_missing(
                    node, f"no reply within round-timeout ({fed.round_timeout:.0f} s)"
                )
                self.strategy.reject(r, self._site(node), reason, "train")
            new_arrays, _ = self.strategy.aggregate_train(r, stream)  # or NotEnoughReplies
        if new_arrays is not None:
            progress.arrays = new_arrays
        train_sites = self.strategy.train_site_metrics.get(self.strategy.round, {})
        self.events.replies(r, "train", train_sites, self.strategy.rejected, got.sizes, self._site)
        if pending:
            self._previous_evaluation(progress.rounds[-1], train_sites)

        eval_sites: dict[str, dict[str, Any]] = {}
        # separate: every round; piggyback: the last round only (no later train message)
        if not piggyback or r >= fed.num_server_rounds:
            wait_for_nodes(self.grid, self._needed(), fed.node_wait_timeout)
            eval_msgs = list(
                self.strategy.configure_evaluate(r, progress.arrays, self._config("val"), self.grid)
            )
            sent += payload_bytes(eval_msgs)
            evals = self._exchange(eval_msgs)  # metrics only: kept as they are
            received += sum(evals.sizes.values())
            for node in evals.missing:
                reason = self._why_missing(node, "no evaluate reply within round-timeout")
                self.strategy.reject(r, self._site(node), reason, "evaluate")
            self.strategy.aggregate_evaluate(r, [m for m, _ in evals.pairs])
            eval_sites = self.strategy.evaluate_site_metrics.get(self.strategy.round, {})
            self.events.replies(
                r, "evaluate", eval_sites, self.strategy.rejected, evals.sizes, self._site
            )

        rejected = [
            {
                "site": rej.site,
                "reason": rej.reason if rej.phase == "train" else f"{rej.phase}: {rej.reason}",
            }
            for rej in self.strategy.rejected[first_rejection:]
        ]
        record = {
            "round": r,
            **round_privacy(self.cfg, r, train_sites),  # "privacy" with DP (README "Privacy")
            "seconds": time.perf_counter() - t0,
            "bytes_sent": sent,
            "bytes_received": received,
            "train": {s: train_entry(m) for s, m in sorted(train_sites.items())},
            "eval": {s: eval_entry(m) for s, m in sorted(eval_sites.items())},
            "rejected": rejected,
        }
        progress.round = r
        progress.rounds.append(record)
        return record

    def _can_piggyback(self) -> bool:
        """Whether the strategy's train replies may carry the global model's metrics (the
        search phase's may not: its evaluation needs the architecture weights)."""
        schema = getattr(self.strategy, "train_schema", None)
        return schema is not None and set(GLOBAL_METRIC_KEYS) <= set(schema.metrics)

    def _previous_evaluation(
        self, record: dict[str, Any], train_sites: dict[str, dict[str, Any]]
    ) -> None:
        """Fill the previous round's ``eval`` from this round's train replies (their
        ``global-*`` metrics: the global model they received, on their validation slices).

        A reply without them (a site that skipped the evaluation) leaves its site out, as a
        missing evaluate reply would."""
        evals: dict[str, dict[str, Any]] = {}
        for site, metrics in train_sites.items():
            if all(k in metrics for k in GLOBAL_METRIC_KEYS):
                n = len(GLOBAL_PREFIX)
                evals[site] = {k[n:]: metrics[k] for k in GLOBAL_METRIC_KEYS}
        record["eval"] = {s: eval_entry(m) for s, m in sorted(evals.items())}
        self.strategy.evaluate_site_metrics[record["round"]] = evals
        self.events.replies(record["round"], "evaluate", evals, self.strategy.rejected)

    def checkpoint(self, progress: Progress, started: float) -> None:
        """Write ``checkpoint.pt`` for ``progress`` (atomic)."""
        checkpoint.save(
            self.run_dir,
            checkpoint.ServerState(
                round=progress.round,
                arrays=to_numpy(progress.arrays),
                strategy=self.strategy.state_dict(),
                run_uid=self.run_uid,
                config=self.cfg.flat(),
                rounds=progress.rounds,
                elapsed_seconds=progress.elapsed_seconds + time.perf_counter() - started,
                rng=checkpoint.rng_state(),
            ),
        )

    # --- the run ------------------------------------------------------------------------------
    def wait_for_expected_sites(self, poll: float = 0.5, settle: float = SETTLE_SECONDS) -> None:
        """Wait for the sites that are coming, at most ``node-wait-timeout``.

        Without this, round 1 starts as soon as ``min-available-clients`` nodes are up and a
        site that connects a moment later misses it. Returns at once when ``data.num-sites``
        nodes are connected. The federation actually running may have fewer nodes (``flwr run
        .`` on Flower's default simulation of 2 SuperNodes, a deployment with a site down):
        once ``min-available-clients`` are connected and their number has not changed for
        ``settle`` s, the run starts with them (a later site joins the next round). After
        ``node-wait-timeout`` the run starts with what it has; the per-round wait then
        enforces ``min-available-clients``.
        """
        expected = self.cfg.data.num_sites
        timeout = self.cfg.federation.node_wait_timeout
        now = time.monotonic()
        deadline = now + timeout
        count, changed = len(list(self.grid.get_node_ids())), now
        while count < expected and now < deadline:
            if count >= self._needed() and now - changed >= settle:
                break
            time.sleep(poll)
            now = time.monotonic()
            latest = len(list(self.grid.get_node_ids()))
            if latest != count:
                count, changed = latest, now
        if count < expected:
            why = (
                f"node-wait-timeout {timeout:.0f} s"
                if now >= deadline
                else f"no other node connected for {settle:.0f} s"
            )
            log(
                WARNING,
                "starting with %d of %d expected sites (data.num-sites; %s). In a simulation "
                "the number of SuperNodes sets the sites: flwr run . --federation-config "
                '"num-supernodes=%d"',
                count,
                expected,
                why,
                expected,
            )

    def run(self, progress: Progress) -> Progress:
        """All remaining rounds; a checkpoint after each one."""
        started = time.perf_counter()
        total = self.cfg.federation.num_server_rounds
        for stale in self.run_dir.glob(f"{SCRATCH_PREFIX}*"):  # a killed server's round scratch
            shutil.rmtree(stale, ignore_errors=True)
        if progress.round < total:
            self.wait_for_expected_sites()
        while progress.round < total:
            self.stopped = budget_stop(self.cfg, progress.rounds)  # DP: epsilon budget
            if self.stopped is not None:
                break
            record = self.run_round(progress)
            self.events.round_finished(record)
            self.checkpoint(progress, started)
            self.events.checkpoint_written(progress.round)
            log(
                INFO,
                "round %d/%d done in %.1f s: %d sites trained, %d rejected",
                record["round"],
                total,
                record["seconds"],
                len(record["train"]),
                len(record["rejected"]),
            )
            if self.after_round is not None:
                self.after_round(record)
        progress.elapsed_seconds += time.perf_counter() - started
        return progress

    def final_evaluation(self, arrays: ArrayRecord) -> tuple[dict[str, Any], dict[str, Any]]:
        """Global model and zero-filled metrics on every connected site's test slices."""
        nodes = wait_for_nodes(self.grid, self._needed(), self.cfg.federation.node_wait_timeout)
        self.sites.connected(nodes)
        # final-eval-sites: a seeded sample, by site name (the nodes are named when sampling)
        nodes = final_eval_nodes(nodes, self.cfg, self.sites)
        config = self._config("test")
        config[RUN_DONE] = True  # sites drop this run's Scaffold files
        content = RecordDict({ARRAYS: arrays, CONFIG: config})
        msgs = [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        got = self._exchange(msgs)
        pairs, missing = got.pairs, got.missing
        federated: dict[str, Any] = {}
        zero_filled: dict[str, Any] = {}
        round_ = self.strategy.round
        for msg, node in sorted(pairs, key=lambda p: p[1]):
            try:  # whatever a site sends, the run (and its final model) goes on
                site = self.strategy.identify_one(msg, node, round_, "final")
                if site is None:
                    continue
                try:
                    metrics = check_content(msg.content, FINAL_SCHEMA)
                except ReplyError as err:
                    self.strategy.reject(round_, site, str(err), "final")
                    continue
                federated[site] = metric_triplet(metrics)
                zero_filled[site] = metric_triplet(metrics, "zf-")
            except Exception as exc:  # a reply no check foresaw: its type only, never its text
                why = f"unreadable reply ({type(exc).__name__})"
                self.strategy.reject(round_, self._site(node), why, "final")
        for node in missing:
            log(WARNING, "final evaluation: no reply from %s", self._site(node))
        return dict(sorted(federated.items())), dict(sorted(zero_filled.items()))


def final_eval_nodes(
    nodes: Iterable[int], cfg: RunConfig, names: Mapping[int, str] | None = None
) -> list[int]:
    """The nodes of the final evaluation: ``final-eval-sites`` of them (0: all up to 32, else
    32), drawn without replacement by a Generator seeded with ``train.seed`` (its own stream:
    the round sampling's state is not touched) from the nodes ordered by their site names in
    ``names`` (named ones first; the rest by id), so a rerun whose nodes got new ids evaluates
    the same sites."""
    ordered = site_order(nodes, names or {})
    want = cfg.federation.final_eval_sites or (len(ordered) if len(ordered) <= 32 else 32)
    if want >= len(ordered):
        return ordered
    rng = np.random.default_rng([cfg.train.seed, FINAL_EVAL_STREAM])
    return [ordered[int(i)] for i in sorted(rng.choice(len(ordered), size=want, replace=False))]


FINAL_EVAL_STREAM = 0xF1  # SeedSequence entropy next to train.seed for final_eval_nodes


__all__ = [
    "Federation",
    "NodesUnavailable",
    "NotEnoughReplies",
    "Progress",
    "Replies",
    "collect",
    "exchange",
    "final_eval_nodes",
]

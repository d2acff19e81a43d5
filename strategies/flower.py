"""Flower strategies (Message API) that validate replies, move records and call ``maths``.

Shared behaviour (``_Base``):

- a reply's site is the name bound to its node (:class:`SiteNames`: the first name the node
  claimed, never changed; a claim of another name or of another node's name is a rejection);
- every train reply is checked against its phase's schema (``protocol.check_content``) and
  its arrays against what the server sent (``protocol.validate_reply``); an error reply (only
  its kind is kept, ``protocol.error_kind``) or a malformed, undeclared or non-finite one is
  dropped, logged and appended to ``self.rejected`` with a short reason that never quotes the
  reply; fewer than ``min_valid_replies`` valid replies raises ``NotEnoughReplies``;
- bounds on one site's influence (README "Security and robustness"): each ``num-examples`` is
  capped at ``max_examples_factor`` x the round's lower median, an update whose norm
  ||y_k - x|| (or ||Delta c_k||) exceeds ``norm_factor`` x the round's lower median is
  rejected, ``clip_norm`` clips every y_k - x, and ``aggregator`` picks the model statistic
  (the example-weighted mean, or a robust one of :mod:`strategies.robust`);
- reply arrays are cast to the global model's dtypes and aggregated in site order, so the
  result does not depend on reply arrival order;
- replies stream (:class:`TrainReplies`): each is checked and decoded as it arrives, its
  update norms and ``num-examples`` recorded and its arrays written to a per-round scratch
  file; the bounds are decided from what was recorded and the accepted replies are read back
  one at a time into a float64 running sum (:class:`strategies.maths.WeightedSum`), so the
  server holds O(1) replies' arrays for the weighted mean, FedOpt and Scaffold. The robust
  statistics load the round's accepted replies together (they need them all);
- ``self.round`` counts completed rounds and is part of ``state_dict()``: the round sent as
  ``server-round`` and used by the maths is ``self.round + 1``, not the ``server_round``
  argument, so a resumed ``start()`` (which counts from 1 again) continues the same sequence;
- the ConfigRecord passed in is copied, never mutated;
- sampling (``sites_per_round`` or ``fraction_*``) draws from a seeded numpy Generator whose
  state is part of ``state_dict()`` (``sampling/rng``), over the connected sites ordered by
  name, so a resumed run draws the same sites even where the nodes got new ids.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, NamedTuple

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as _FlowerFedAvg

from strategies import maths, privacy, robust
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    EVALUATE_SCHEMA,
    FEDPROX_MU,
    NUM_EXAMPLES,
    SCAFFOLD_ACCEPTED,
    SCAFFOLD_C_DELTA,
    SCAFFOLD_C_GLOBAL,
    SCAFFOLD_OPTION,
    SCAFFOLD_OPTIONS,
    SCAFFOLD_TOKEN,
    SERVER_ROUND,
    TRAIN_SCHEMA,
    ReplyError,
    ReplySchema,
    bounded,
    check_content,
    parse_error,
    records_of,
    site_claim,
    to_numpy,
    to_record,
    validate_reply,
)
from strategies.spill import SCRATCH_PREFIX, Lazy, Scratch

State = dict[str, Any]
SAMPLE_RNG = "sampling/rng"  # state_dict key: the sampling Generator's state (JSON)
Arrays = dict[str, np.ndarray]


class NotEnoughReplies(RuntimeError):
    """Too few valid train replies to aggregate; the server should stop the run."""


class Rejection(NamedTuple):
    """A reply that was dropped: round, site (``site-id`` or ``node-<id>``), reason, phase."""

    round: int
    site: str
    reason: str
    phase: str = "train"


@dataclass
class Reply:
    """A validated reply: arrays already cast to the reference dtypes."""

    site: str
    node_id: int
    num_examples: int
    arrays: Arrays
    metrics: dict[str, Any]
    extra: dict[str, Arrays] = field(default_factory=dict)


class _Claim(NamedTuple):
    """Who a reply says it is, read when it arrives and resolved later in node order:
    ``invalid`` (an empty reply, a malformed claim: the reason), else ``error`` (an error
    reply: ``client error: <kind>``) with the name it may claim, else the claimed name."""

    claim: str | None = None
    error: str | None = None
    invalid: str | None = None


@dataclass
class _Arrival:
    """One train reply of a :class:`TrainReplies` round, after it was consumed.

    ``reply`` has the metrics and ``num-examples`` but no arrays (they are in ``files``, one
    scratch file per record) and no site until the round identifies it; ``error`` is why
    decoding rejected it; ``norms`` are ||y_k - x|| (``arrays``) and ||Delta c_k||.
    """

    order: int  # arrival index: ties between two replies of one node keep arrival order
    node: int
    claim: _Claim
    reply: Reply | None = None
    files: dict[str, Path] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class TrainReplies:
    """One round's train replies, consumed one at a time as they arrive (streaming).

    :meth:`add` (``on_reply`` of :func:`server.federation.collect`) reads the reply's claimed
    site, checks its content against the phase's schema and decodes it exactly as a list of
    replies is (same checks, same rejection reasons), records its update norms and
    ``num-examples`` and writes its arrays, cast to the global model's dtypes, to a scratch
    file; neither the Message nor its arrays are kept. :meth:`_Base.aggregate_train` then
    identifies the replies in node order (which node binds a contested site name does not
    depend on arrival), decides the norm check and example cap from what was recorded, and
    reads the accepted replies back one at a time in (site, node) order. ``close`` (or the end
    of a ``with`` block) removes the scratch directory, also when the round fails.

    Parameters
    ----------
    strategy : _Base
        The strategy whose round this is (after its ``configure_train``).
    scratch_dir : path, optional
        Where the round's scratch directory is made (:class:`strategies.spill.Scratch`).
    """

    def __init__(self, strategy: _Base, scratch_dir: str | os.PathLike[str] | None = None) -> None:
        self.strategy = strategy
        self.round = strategy.round + 1
        self.arrivals: list[_Arrival] = []
        self.keys: dict[str, list[str]] = {}  # record -> array keys in saved order
        self._sent = sent_nodes(strategy._sent)
        self.scratch = Scratch(scratch_dir, prefix=f"{SCRATCH_PREFIX}r{self.round}-")

    def add(self, msg: Message, node: int | None = None) -> None:
        """Consume one reply; ``node`` defaults to the one its message went to
        (:func:`reply_node`)."""
        node = reply_node(msg, self._sent) if node is None else node
        arrival = _Arrival(len(self.arrivals), node, self.strategy._claim(msg))
        self.arrivals.append(arrival)
        if arrival.claim.invalid is not None or arrival.claim.error is not None:
            return  # rejected by its identity: nothing to decode
        try:
            reply = self.strategy._decode_train_reply(msg, node)
        except ReplyError as err:
            arrival.error = str(err)
            return
        arrival.norms = self.strategy._reply_norms(reply)
        for name, arrays in {ARRAYS: reply.arrays, **reply.extra}.items():
            self.keys.setdefault(name, list(arrays))
            arrival.files[name] = self.scratch.save(arrays)
        reply.arrays, reply.extra = {}, {}  # on disk now
        arrival.reply = reply

    def load(self, arrival: _Arrival, records: Iterable[str]) -> dict[str, Arrays]:
        """The ``records`` of a consumed reply, read back from its scratch files."""
        return {name: Scratch.load(arrival.files[name], self.keys[name]) for name in records}

    def close(self) -> None:
        """Remove the scratch files."""
        self.scratch.close()

    def __enter__(self) -> TrainReplies:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SpilledReplies(Lazy[Reply]):
    """The accepted replies of a :class:`TrainReplies` round, in aggregation order, each read
    from disk when accessed (with ``clip_norm`` applied to its model, as the bounds say).

    ``headers`` have everything but the arrays (no disk access); :meth:`models` and
    :meth:`records` are lazy sequences of one record each, for maths that iterate once.
    """

    def __init__(self, strategy: _Base, stream: TrainReplies, accepted: list[_Arrival]) -> None:
        self.strategy = strategy
        self.stream = stream
        self.accepted = accepted
        self.headers: list[Reply] = [a.reply for a in accepted if a.reply is not None]
        super().__init__(len(accepted), self._reply)

    def _model(self, i: int) -> Arrays:
        return self.strategy._bounded(self.stream.load(self.accepted[i], [ARRAYS])[ARRAYS])

    def _reply(self, i: int) -> Reply:
        head, arrival = self.headers[i], self.accepted[i]
        extra = self.stream.load(arrival, [n for n in arrival.files if n != ARRAYS])
        return Reply(
            head.site, head.node_id, head.num_examples, self._model(i), head.metrics, extra
        )

    def models(self) -> Lazy[Arrays]:
        """The y_k (``arrays``), clipped where ``clip_norm`` is set."""
        return Lazy(len(self), self._model)

    def records(self, name: str) -> Lazy[Arrays]:
        """The extra record ``name`` (e.g. Delta c_k) of each reply."""
        return Lazy(len(self), lambda i: self.stream.load(self.accepted[i], [name])[name])


def _headers(replies: Sequence[Reply]) -> Sequence[Reply]:
    """Sites, counts and metrics of ``replies`` without reading any arrays from disk."""
    return replies.headers if isinstance(replies, SpilledReplies) else replies


def _models(replies: Sequence[Reply]) -> Sequence[Arrays]:
    """The replies' y_k; lazily loaded one at a time for :class:`SpilledReplies`."""
    return replies.models() if isinstance(replies, SpilledReplies) else [r.arrays for r in replies]


def _records(replies: Sequence[Reply], name: str) -> Sequence[Arrays]:
    """The replies' extra record ``name``; lazily loaded for :class:`SpilledReplies`."""
    if isinstance(replies, SpilledReplies):
        return replies.records(name)
    return [r.extra[name] for r in replies]


def reply_node(reply: Message, sent: Mapping[str, int]) -> int:
    """The node a reply is about: the ``dst_node_id`` of the message it answers.

    ``sent`` maps the message ids of the sent messages (set by the grid when it pushes them) to
    their destination. An error reply made by the SuperLink for a dead node has the SuperLink's
    own id as ``src_node_id``; only ``reply_to_message_id`` names the message, hence the node.
    Falls back to ``src_node_id`` for a reply to no known message.
    """
    node = sent.get(reply.metadata.reply_to_message_id)
    return reply.metadata.src_node_id if node is None else node


def sent_nodes(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of messages the grid has pushed (ids are set on push)."""
    return {
        m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id
    }


def site_order(nodes: Iterable[int], names: Mapping[int, str]) -> list[int]:
    """``nodes`` in the order a seeded draw takes them from: the named ones by site name, then
    the ones not named yet by id. Node ids change when a simulation restarts; names do not."""
    return sorted(nodes, key=lambda n: (0, names[n], n) if n in names else (1, "", n))


class SiteNames(Mapping[int, str]):
    """Which site each node is: a name bound to the node id the first time the node replies.

    The node id is the transport's (in deployment the SuperNode's authenticated key's, in
    simulation the partition's); the name is the ``site-id`` its first reply with content
    claims (``node-<id>`` if it claims none, or one another node holds). It never changes: a
    later reply claiming another name is rejected and recorded under the bound name, and two
    nodes never share a name. A node not bound yet (no reply, or error replies only) is
    ``node-<id>``. A mapping node -> bound name; :meth:`state` / :meth:`load` are part of the
    strategy state, so a resumed run keeps every binding.

    Node ids last as long as the SuperLink's state: a restarted simulation (or a deployment
    whose SuperLink lost its database) gives every node a new id. So a binding restored from a
    checkpoint is confirmed or released the first time the connected nodes are known
    (:meth:`connected`): one whose node is not connected frees its name for the node that
    claims it next (logged); one whose node is connected holds as any other.
    """

    PREFIX = "sites/"

    def __init__(self, bound: Mapping[int, str] | None = None) -> None:
        self._names: dict[int, str] = {}
        self._owners: dict[str, int] = {}
        self._restored: set[int] = set()  # loaded from a checkpoint, not yet confirmed
        for node, name in (bound or {}).items():
            self._names[int(node)] = str(name)
            self._owners[str(name)] = int(node)

    def __getitem__(self, node: int) -> str:
        return self._names[node]

    def __iter__(self) -> Iterator[int]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def name(self, node: int) -> str:
        """The node's bound name, else ``node-<id>``."""
        return self._names.get(node, f"node-{node}")

    def _bind(self, node: int, name: str) -> str:
        self._names[node] = name
        self._owners[name] = node
        log(INFO, "node %d is site %s (bound for the rest of the run)", node, name)
        return name

    def resolve(self, node: int, claim: str | None) -> tuple[str, str | None]:
        """(the node's name, why its reply must be rejected or None) for a reply with content
        claiming ``claim`` (already a valid site name, :func:`protocol.site_claim`); binds the
        node on its first such reply."""
        bound = self._names.get(node)
        if bound is not None:
            if claim is not None and claim != bound:
                other = "another node's site name" if claim in self._owners else "a new name"
                return bound, f"identity: claims {other}, not the one bound to its node"
            return bound, None
        if claim is not None and claim in self._owners:
            return self._bind(node, f"node-{node}"), (
                "identity: claims a site name bound to another node"
            )
        return self._bind(node, f"node-{node}" if claim is None else claim), None

    def connected(self, nodes: Iterable[int]) -> None:
        """The nodes connected now: confirms or releases the bindings restored from a
        checkpoint (see the class docstring); a no-op once they are settled."""
        if not self._restored:
            return
        now = set(nodes)
        for node in sorted(self._restored - now):
            name = self._names.pop(node)
            self._owners.pop(name, None)
            log(
                WARNING,
                "site %s: node %d of the checkpoint is not connected; its name is free for the "
                "node that claims it (node ids change when the SuperLink's state does)",
                name,
                node,
            )
        self._restored.clear()

    def state(self) -> State:
        """``sites/<node id>`` -> name."""
        return {f"{self.PREFIX}{node}": name for node, name in self._names.items()}

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (values may come back as 0-d arrays)."""
        self._names.clear()
        self._owners.clear()
        for key, value in state.items():
            if key.startswith(self.PREFIX):
                node, name = int(key[len(self.PREFIX) :]), str(_scalar(value))
                self._names[node] = name
                self._owners[name] = node
        self._restored = set(self._names)


def _site_of(arrival: _Arrival) -> str:
    return "" if arrival.reply is None else arrival.reply.site


def _aggregate_metrics(replies: Sequence[Reply]) -> MetricRecord:
    """Example-weighted mean of the (scalar, checked) metrics every reply has;
    ``num-examples`` is summed."""
    total = sum(r.num_examples for r in replies)
    common = [k for k in replies[0].metrics if all(k in r.metrics for r in replies)]
    out: dict[str, Any] = {NUM_EXAMPLES: total}
    weights = np.asarray([r.num_examples for r in replies], dtype=np.float64) / total
    for key in common:
        if key != NUM_EXAMPLES:
            values = np.asarray([float(r.metrics[key]) for r in replies], dtype=np.float64)
            out[key] = float(np.dot(weights, values))
    return MetricRecord(out)


def _lower_median(values: Iterable[float]) -> float:
    """The ceil(n/2)-th smallest value (one honest majority controls it, also for n = 2)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def _flatten(prefix: str, arrays: Mapping[str, np.ndarray]) -> State:
    return {f"{prefix}/{k}": np.array(v, copy=True) for k, v in arrays.items()}


def _unflatten(prefix: str, state: Mapping[str, Any]) -> Arrays:
    start = f"{prefix}/"
    return {
        k[len(start) :]: np.array(v, copy=True) for k, v in state.items() if k.startswith(start)
    }


def _scalar(value: Any) -> Any:
    """Unwrap 0-d arrays (what ``np.load`` gives back for saved scalars and strings)."""
    return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


AGGREGATORS = ("fedavg", "median", "trimmed-mean", "multi-krum")
# Strategies whose server step is not a plain mean of the y_k (Scaffold's c moves with the mean
# of the same sites' updates; fairfedavg's weights are its method): fedavg aggregation only.
MEAN_ONLY = ("scaffold", "fairfedavg")
# Reply records that are deltas (their norm is checked against 0, not against what was sent).
DELTA_RECORDS = (SCAFFOLD_C_DELTA,)


class _Base(_FlowerFedAvg):
    """Validation, identity, influence bounds, round bookkeeping, state and sampling shared by
    all fedunroll strategies.

    Parameters
    ----------
    max_examples_factor : float
        Cap each reply's ``num-examples`` at this multiple of the round's lower median (0: off).
    norm_factor : float
        Reject a reply whose ||y_k - x|| (or ||Delta c_k||) exceeds this multiple of the round's
        lower median (0: off). A lower median of 0 (half the sites sent x back) is replaced by
        ||x|| / ``norm_factor`` for the model (no update may then move farther than ||x||).
    aggregator : {"fedavg", "median", "trimmed-mean", "multi-krum"}
        The model statistic: the example-weighted mean, or a robust (unweighted) one.
    trim_beta : float
        trimmed-mean: fraction trimmed at each end.
    byzantine : int
        multi-krum: f; the mean of the n - f best-scored updates; needs n > 2f + 2.
    clip_norm : float
        Clip every y_k - x to this L2 norm before aggregation (0: off).
    """

    name: ClassVar[str] = ""
    train_schema: ClassVar[ReplySchema] = TRAIN_SCHEMA
    # Whether _aggregate takes the round's replies as a SpilledReplies (read from disk one at a
    # time) or as a list with every reply's arrays loaded (a strategy written for a list).
    streams: ClassVar[bool] = True

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        min_valid_replies: int | None = None,
        max_examples_factor: float = 10.0,
        norm_factor: float = 50.0,
        aggregator: str = "fedavg",
        trim_beta: float = 0.1,
        byzantine: int = 1,
        clip_norm: float = 0.0,
        site_clip: float = 0.0,
        site_noise_multiplier: float = 0.0,
        site_noise_seed: int | None = None,
        sites_per_round: int = 0,
        sample_seed: int = 0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=ARRAYS,
            configrecord_key=CONFIG,
        )
        self.min_valid_replies = (
            self.min_train_nodes if min_valid_replies is None else min_valid_replies
        )
        _check_bounds(max_examples_factor, norm_factor, trim_beta, byzantine, clip_norm)
        if aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {aggregator!r}")
        if aggregator != "fedavg" and self.name in MEAN_ONLY:
            raise ValueError(
                f"strategy {self.name!r} aggregates by its own rule: aggregator "
                f"{aggregator!r} does not apply (norm_factor and clip_norm do)"
            )
        self.max_examples_factor = float(max_examples_factor)
        self.norm_factor = float(norm_factor)
        self.aggregator = aggregator
        self.trim_beta = float(trim_beta)
        self.byzantine = int(byzantine)
        self.clip_norm = float(clip_norm)
        # site-level DP (strategies.privacy): clipped, noised mean of the updates
        if site_noise_multiplier and not site_clip:
            raise ValueError("site_noise_multiplier needs site_clip > 0")
        if site_clip and (aggregator != "fedavg" or self.name in MEAN_ONLY):
            raise ValueError(f"site_clip needs the plain mean, not {self.name}/{aggregator}")
        self.site_clip = float(site_clip)
        self.site_noise_multiplier = float(site_noise_multiplier)
        self._dp_rng = np.random.default_rng(site_noise_seed)
        # partial participation: a fixed number of nodes per round (0: ``fraction_*``), drawn
        # by a seeded Generator that is strategy state (a resumed run draws the same nodes)
        if sites_per_round < 0:
            raise ValueError(f"sites_per_round must be >= 0, got {sites_per_round}")
        self.sites_per_round = int(sites_per_round)
        self._sample_rng = np.random.default_rng(sample_seed)
        self.round = 0
        self.rejected: list[Rejection] = []
        self.train_site_metrics: dict[int, dict[str, dict[str, Any]]] = {}
        self.evaluate_site_metrics: dict[int, dict[str, dict[str, Any]]] = {}
        self.num_nodes = 0  # connected nodes at the last configure_train
        self.sites = SiteNames()  # node id -> bound site name (strategy state)
        self._global: Arrays | None = None
        self._sent: list[Message] = []  # the last configure_* messages (ids set by the grid)

    # --- hooks for subclasses ---------------------------------------------------------
    def _train_config(self, config: ConfigRecord) -> None:
        """Add strategy entries to this round's (already copied) train config."""

    def _extra_records(self) -> dict[str, ArrayRecord]:
        """Extra ArrayRecords sent with the model in configure_train."""
        return {}

    def _extra_references(self) -> dict[str, Arrays]:
        """Extra ArrayRecords expected in every train reply, with their reference arrays."""
        return {}

    def _evaluate_records(self) -> dict[str, ArrayRecord]:
        """Extra ArrayRecords sent with the model in configure_evaluate."""
        return {}

    def _aggregate(self, global_arrays: Arrays, replies: Sequence[Reply]) -> Arrays:
        """New global arrays from validated replies (:meth:`_combine_models` by default).

        ``replies`` is a :class:`SpilledReplies` for a streaming strategy: iterate it (or
        :func:`_models`) once to hold one reply at a time; :func:`_headers` reads no arrays.
        """
        return self._combine_models(replies)

    def _combine_models(self, replies: Sequence[Reply]) -> Arrays:
        """The y_k's statistic of ``aggregator``: FedAvg's example-weighted mean (McMahan et
        al. 2017), the coordinate-wise median or trimmed mean (Yin et al., ICML 2018), or
        multi-Krum with m = n - f (Blanchard et al., NeurIPS 2017).

        The mean and the site-level DP mean run over the y_k once, one at a time; the robust
        statistics need every y_k of the round at once and load them all."""
        ys = _models(replies)
        if self.site_clip:  # site-level DP: unweighted, clipped, noised (README "Privacy")
            assert self._global is not None
            clip, sigma = self.site_clip, self.site_noise_multiplier
            return privacy.dp_mean(ys, self._global, clip, sigma, self._dp_rng)
        if self.aggregator == "median":
            return robust.coordinate_median(list(ys))
        if self.aggregator == "trimmed-mean":
            return robust.trimmed_mean(list(ys), self.trim_beta)
        if self.aggregator == "multi-krum":
            return robust.multi_krum(list(ys), self.byzantine, len(ys) - self.byzantine)
        return maths.fedavg(ys, [r.num_examples for r in _headers(replies)])

    def _settings(self) -> dict[str, Any]:
        """Strategy hyperparameters, for ``summary``."""
        return {}

    def _state(self) -> State:
        return {}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        pass

    def summary(self) -> None:
        """Log the strategy's name and settings, then Flower's sampling summary."""
        log(INFO, "\t├──> %s %s", self.name, self._settings())
        log(INFO, "\t│\t└── min valid train replies: %d", self.min_valid_replies)
        bounds = ("max_examples_factor", "norm_factor", "aggregator", "clip_norm")
        log(INFO, "\t│\t└── influence bounds: %s", {k: getattr(self, k) for k in bounds})
        super().summary()

    # --- state ------------------------------------------------------------------------
    def state_dict(self) -> State:
        """Strategy state: ``strategy`` (name), ``round``, the site bindings (``sites/<node>``)
        and arrays under ``<record>/<key>``."""
        sampling = {SAMPLE_RNG: json.dumps(self._sample_rng.bit_generator.state)}
        return {
            "strategy": self.name,
            "round": self.round,
            **sampling,
            **self.sites.state(),
            **self._state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (scalars may come back as 0-d arrays)."""
        name = _scalar(state.get("strategy"))
        if name != self.name:
            raise ValueError(f"state is for strategy {name!r}, this is {self.name!r}")
        self.round = int(_scalar(state["round"]))
        if SAMPLE_RNG in state:  # absent in checkpoints older than partial participation
            self._sample_rng.bit_generator.state = json.loads(str(_scalar(state[SAMPLE_RNG])))
        self.sites.load(state)
        self._load_state(state)

    # --- train ------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, min_nodes: int, phase: str) -> list[int]:
        """``sites_per_round`` nodes (0: ``fraction`` of the connected ones, at least
        ``min_nodes``), drawn without replacement by the strategy's seeded Generator from the
        connected nodes in :meth:`_draw_order`; waits for ``min_available_nodes`` as Flower
        does.

        The draw depends only on the Generator's state (checkpointed) and the order of the
        connected sites, which is by site name once the nodes are named: a resumed run samples
        the same sites even where its nodes got new ids (a restarted Ray simulation). The
        ServerApp names every node before the first draw when sampling is partial (it asks
        each new node ``query.site``, :class:`server.grid.TrainingGrid`); all nodes
        (``fraction`` 1) use no draw.
        """
        all_nodes = self._draw_order(grid.get_node_ids())
        while len(all_nodes) < self.min_available_nodes:
            log(INFO, "waiting for nodes: %d of %d", len(all_nodes), self.min_available_nodes)
            time.sleep(1)
            all_nodes = self._draw_order(grid.get_node_ids())
        if self.sites_per_round:
            size = self.sites_per_round
        else:
            size = max(int(len(all_nodes) * fraction), min_nodes)
        size = min(size, len(all_nodes))
        if size >= len(all_nodes):
            node_ids = all_nodes
        else:
            picked = self._sample_rng.choice(len(all_nodes), size=size, replace=False)
            node_ids = [all_nodes[i] for i in sorted(int(i) for i in picked)]
        self.num_nodes = len(all_nodes)
        self.sites.connected(all_nodes)
        log(INFO, "configure_%s: sampled %s of %s nodes", phase, len(node_ids), len(all_nodes))
        return node_ids

    def _draw_order(self, nodes: Iterable[int]) -> list[int]:
        """The connected nodes in the order the sampling draws from (:func:`site_order`)."""
        return site_order(nodes, self.sites)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes; send the model, a copied config and the strategy's extra records."""
        self._global = to_numpy(arrays)
        if self.fraction_train == 0.0:
            return []
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes, "train")
        train_config = ConfigRecord(dict(config))
        train_config[SERVER_ROUND] = self.round + 1
        self._train_config(train_config)
        content = RecordDict({ARRAYS: arrays, CONFIG: train_config, **self._extra_records()})
        self._sent = list(self._construct_messages(content, node_ids, MessageType.TRAIN))
        return self._sent

    def identify(
        self, replies: Iterable[Message], round_: int, phase: str
    ) -> list[tuple[Message, int, str]]:
        """(reply, node, site) of the replies that may be checked further, in node order.

        The node is the one the answered message went to (:func:`reply_node`); the site is the
        name bound to it (:class:`SiteNames`). An error reply (recorded by its kind only) or a
        reply claiming a name that is not its node's is rejected here, under the node's name.
        """
        sent = sent_nodes(self._sent)
        out = []
        for msg, node in sorted(((m, reply_node(m, sent)) for m in replies), key=lambda p: p[1]):
            checked = self.identify_one(msg, node, round_, phase)
            if checked is not None:
                out.append((msg, node, checked))
        return out

    def identify_one(self, msg: Message, node: int, round_: int, phase: str) -> str | None:
        """The site of ``node``'s reply ``msg``, or None after rejecting it (see
        :meth:`identify`)."""
        return self._identify(node, self._claim(msg), round_, phase)

    @staticmethod
    def _claim(msg: Message) -> _Claim:
        """What ``msg`` says about who sent it (nothing is resolved or recorded yet)."""
        if msg.has_error():  # named by the claim in its reason, bound as any first claim
            kind, claim = parse_error(msg.error.code, msg.error.reason)
            return _Claim(claim, error=f"client error: {kind}")
        if not msg.has_content():
            return _Claim(invalid="empty reply")
        try:
            return _Claim(site_claim(msg.content))
        except ReplyError as err:
            return _Claim(invalid=str(err))

    def _identify(self, node: int, claim: _Claim, round_: int, phase: str) -> str | None:
        """The site of ``node``'s reply that made ``claim``, or None after rejecting it."""
        if claim.invalid is not None:
            self.reject(round_, self.sites.name(node), claim.invalid, phase)
            return None
        if claim.error is not None:
            site, problem = (
                self.sites.resolve(node, claim.claim)
                if claim.claim
                else (self.sites.name(node), None)
            )
            self.reject(round_, site, problem or claim.error, phase)
            return None
        site, problem = self.sites.resolve(node, claim.claim)
        if problem is not None:
            self.reject(round_, site, problem, phase)
            return None
        return site

    def _decode_train_reply(self, msg: Message, node: int) -> Reply:
        """The checked, decoded reply (its site is set once the round identifies it);
        ``ReplyError`` says why it must be rejected."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        content = msg.content
        metrics = check_content(content, self.train_schema)
        extra_refs = self._extra_references()
        expected = [ARRAYS, *extra_refs]
        records = records_of(content, ArrayRecord)  # no view: the reply can be freed at once
        missing = [k for k in expected if k not in records]
        unexpected = [k for k in records if k not in expected]
        if missing or unexpected:  # names declared in the schema (check_content)
            what = [f"missing {k!r}" for k in missing] + [f"unexpected {k!r}" for k in unexpected]
            raise ReplyError(
                f"array records: {', '.join(what)} (is the client running the same strategy?)"
            )
        num_examples = int(metrics[NUM_EXAMPLES])
        parsed = {}
        for name, ref in {ARRAYS: self._global, **extra_refs}.items():
            try:
                arrays = to_numpy(records[name])
            except Exception as err:  # undecodable bytes are a reply fault; never quoted
                raise ReplyError(f"{name}: cannot decode arrays ({type(err).__name__})") from err
            validate_reply(arrays, ref, record=name)
            cast = {k: arrays[k].astype(ref[k].dtype, copy=False) for k in ref}
            if any(cast[k].dtype != arrays[k].dtype for k in ref):
                validate_reply(cast, ref, record=name)  # e.g. float64 beyond float32 range
            parsed[name] = cast
        arrays = parsed.pop(ARRAYS)
        return Reply("", node, num_examples, arrays, metrics, parsed)

    def reject(self, round_: int, site: str, reason: str, phase: str = "train") -> None:
        """Record (and log) that ``site``'s ``phase`` reply of ``round_`` was dropped.

        Also for replies that never came (the server's round loop calls it on a timeout).
        """
        reason = bounded(reason)
        log(WARNING, "round %s: %s reply from %s rejected: %s", round_, phase, site, reason)
        self.rejected.append(Rejection(round_, site, reason, phase))

    # --- bounds on one site's influence -------------------------------------------------
    def _reply_norms(self, reply: Reply) -> dict[str, float]:
        """||y_k - x|| and ||Delta c_k|| of one reply (what :meth:`_check_norms` compares)."""
        if not self.norm_factor:
            return {}
        assert self._global is not None
        norms = {ARRAYS: float(robust.update_norms([reply.arrays], self._global)[0])}
        for name in DELTA_RECORDS:
            if name in reply.extra:
                delta = reply.extra[name]
                zeros = {k: np.zeros_like(v) for k, v in delta.items()}
                norms[name] = float(robust.update_norms([delta], zeros)[0])
        return norms

    def _bounded(self, arrays: Arrays) -> Arrays:
        """A reply's model as it is aggregated: clipped to ``clip_norm`` around x if set."""
        if not self.clip_norm:
            return arrays
        assert self._global is not None
        return _clipped(arrays, self._global, self.clip_norm)

    def _bound_influence(self, round_: int, replies: list[_Arrival]) -> list[_Arrival]:
        """Norm check and example cap (README "Security and robustness"); clipping is applied
        when each model is read back (:meth:`_bounded`)."""
        replies = self._check_norms(round_, replies)
        heads = [r.reply for r in replies if r.reply is not None]
        if self.max_examples_factor and heads:
            claims = [r.num_examples for r in heads]
            for r, n in zip(heads, robust.cap_examples(claims, self.max_examples_factor)):
                if n < r.num_examples:
                    log(
                        WARNING,
                        "round %s: %s claims %d examples; weighted as %d (robust."
                        "max-examples-factor %g x the round's lower median)",
                        round_,
                        r.site,
                        r.num_examples,
                        n,
                        self.max_examples_factor,
                    )
                    r.num_examples = n
                    r.metrics[NUM_EXAMPLES] = n
        return replies

    def _check_norms(self, round_: int, replies: list[_Arrival]) -> list[_Arrival]:
        """Reject replies whose ||y_k - x|| (or ||Delta c_k||) exceeds ``norm_factor`` x the
        round's lower median of that norm (:func:`strategies.robust.norm_outliers`'s rule),
        from the norms recorded as the replies arrived."""
        if not self.norm_factor or len(replies) < 2:
            return replies
        assert self._global is not None
        floor = robust.global_norm(self._global) / self.norm_factor  # x never moves past ||x||
        checks = [(ARRAYS, floor)] + [(n, 0.0) for n in DELTA_RECORDS if n in replies[0].norms]
        flagged: dict[int, str] = {}
        for name, floor in checks:
            norms = [r.norms[name] for r in replies]
            lmed = _lower_median(norms) or floor
            if lmed <= 0:
                continue  # nothing moved in most replies and there is no scale: no check
            for i, norm in enumerate(norms):
                if i not in flagged and not norm <= self.norm_factor * lmed:
                    flagged[i] = (
                        f"{name}: update norm {norm / lmed:.3g} x the round's lower median "
                        f"(robust.norm-factor {self.norm_factor:g})"
                    )
        for i, reason in sorted(flagged.items()):
            head = replies[i].reply
            assert head is not None
            self.reject(round_, head.site, reason, "train")
        return [r for i, r in enumerate(replies) if i not in flagged]

    def train_replies(self, scratch_dir: str | os.PathLike[str] | None = None) -> TrainReplies:
        """A streaming round (:class:`TrainReplies`): pass its ``add`` each train reply as it
        arrives, then the stream itself to :meth:`aggregate_train`; close it (``with``)."""
        return TrainReplies(self, scratch_dir)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message] | TrainReplies
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, drop bad ones, aggregate the rest; advances ``self.round``.

        ``replies`` is a :class:`TrainReplies` that consumed the round's replies as they
        arrived, or the reply Messages, which are fed to one here (scratch in the system's
        temporary directory) one at a time, so an iterator of replies streams too. Either way
        arrival order does not change the result.
        """
        if isinstance(replies, TrainReplies):
            return self._finish_train(replies)
        with self.train_replies() as stream:
            for msg in replies:
                stream.add(msg)
            return self._finish_train(stream)

    def _finish_train(self, stream: TrainReplies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Identify (node order), reject, bound and aggregate the replies ``stream`` took."""
        round_ = self.round + 1
        valid: list[_Arrival] = []
        identified = []
        for arrival in sorted(stream.arrivals, key=lambda a: (a.node, a.order)):
            site = self._identify(arrival.node, arrival.claim, round_, "train")
            if site is not None:
                identified.append((arrival, site))
        for arrival, site in identified:
            if arrival.reply is None:
                self.reject(round_, site, arrival.error or "unreadable reply", "train")
                continue
            arrival.reply.site = site
            valid.append(arrival)
        valid.sort(key=lambda a: (_site_of(a), a.node))  # arrival order must not matter
        valid = self._bound_influence(round_, valid)
        log(INFO, "aggregate_train: %s valid replies", len(valid))
        needed = self.min_valid_replies
        if self.aggregator == "multi-krum" and valid:
            needed = max(needed, 2 * self.byzantine + 3)  # Krum needs n > 2f + 2
        if len(valid) < needed:
            reasons = "; ".join(f"{r.site}: {r.reason}" for r in self.rejected if r.round == round_)
            raise NotEnoughReplies(
                f"round {round_}: {len(valid)} valid train replies, need "
                f"{needed}. Rejected: {reasons or 'none'}"
            )
        if not valid:
            return None, None
        assert self._global is not None
        spilled = SpilledReplies(self, stream, valid)
        new_global = self._aggregate(self._global, spilled if self.streams else list(spilled))
        heads = spilled.headers
        self.train_site_metrics[round_] = {r.site: r.metrics for r in heads}
        self.round = round_
        return to_record(new_global), _aggregate_metrics(heads)

    # --- evaluate ---------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Like FedAvg's, with a copied config whose ``server-round`` is ``self.round``."""
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, "evaluate")
        eval_config = ConfigRecord(dict(config))
        eval_config[SERVER_ROUND] = self.round
        content = RecordDict({ARRAYS: arrays, CONFIG: eval_config, **self._evaluate_records()})
        self._sent = list(self._construct_messages(content, node_ids, MessageType.EVALUATE))
        return self._sent

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted metrics of the valid evaluate replies; bad ones are recorded."""
        valid: list[Reply] = []
        for msg, node_id, site in self.identify(replies, self.round, "evaluate"):
            try:
                metrics = check_content(msg.content, EVALUATE_SCHEMA)
                valid.append(Reply(site, node_id, int(metrics[NUM_EXAMPLES]), {}, metrics))
            except ReplyError as err:
                self.reject(self.round, site, str(err), "evaluate")
        if not valid:
            log(WARNING, "aggregate_evaluate: no valid replies in round %s", self.round)
            return None
        valid.sort(key=lambda r: (r.site, r.node_id))
        self.evaluate_site_metrics[self.round] = {r.site: r.metrics for r in valid}
        return _aggregate_metrics(valid)


def _check_bounds(
    max_examples_factor: float, norm_factor: float, trim_beta: float, byzantine: int, clip: float
) -> None:
    for key, value in (("max_examples_factor", max_examples_factor), ("norm_factor", norm_factor)):
        if not (math.isfinite(value) and (value == 0 or value >= 1)):
            raise ValueError(f"{key} must be 0 (off) or a finite number >= 1, got {value}")
    if not 0 <= trim_beta < 0.5:
        raise ValueError(f"trim_beta must be in [0, 0.5), got {trim_beta}")
    if byzantine < 0:
        raise ValueError(f"byzantine must be >= 0, got {byzantine}")
    if not (math.isfinite(clip) and clip >= 0):
        raise ValueError(f"clip_norm must be finite and >= 0, got {clip}")


def _clipped(y: Arrays, x: Arrays, max_norm: float) -> Arrays:
    """x + clip(y - x) over the float arrays (Sun et al. 2019 norm bounding); others as sent."""
    keys = [k for k, a in x.items() if maths.is_float(a)]
    delta = robust.clip_to_norm({k: np.asarray(y[k], np.float64) - x[k] for k in keys}, max_norm)
    out = dict(y)
    for k in keys:
        out[k] = (x[k] + delta[k]).astype(x[k].dtype)
    return out


class FedAvg(_Base):
    """FedAvg (McMahan et al. 2017): example-weighted mean of the client models."""

    name = "fedavg"


class FedProx(_Base):
    """FedProx (Li et al. 2020): FedAvg on the server; sends ``fedprox.mu`` to the clients.

    The client minimises ``loss + mu/2 * ||w - w_global||^2`` (``maths.proximal_term``).
    """

    name = "fedprox"

    def __init__(self, *, proximal_mu: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be finite and >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    def _settings(self) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}

    def _train_config(self, config: ConfigRecord) -> None:
        config[FEDPROX_MU] = float(self.proximal_mu)


class _FedOpt(_Base):
    """Server-side adaptive optimiser over the averaged client change (Reddi et al. 2021).

    Keeps float32 models float32 (Flower's FedAdam returns float64), initialises
    v = tau^2 (``v_init`` overrides; Flower uses 0) and, by default, applies no Adam bias
    correction, as in the paper's Algorithm 2 (``bias_correction=True`` applies it with
    t = round).
    """

    kind: ClassVar[maths.FedOptKind]

    def __init__(
        self,
        *,
        eta: float = 1e-2,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        v_init: float | None = None,
        bias_correction: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.v_init = v_init
        self.bias_correction = bias_correction
        self.m: Arrays | None = None
        self.v: Arrays | None = None

    def _settings(self) -> dict[str, Any]:
        names = ("eta", "beta_1", "beta_2", "tau", "v_init", "bias_correction")
        return {n: getattr(self, n) for n in names}

    def _aggregate(self, global_arrays: Arrays, replies: Sequence[Reply]) -> Arrays:
        avg = super()._aggregate(global_arrays, replies)
        if self.m is None or self.v is None:
            self.m, self.v = maths.fedopt_init(global_arrays, self.tau, self.v_init)
        new, self.m, self.v = maths.fedopt_step(
            global_arrays,
            avg,
            self.m,
            self.v,
            kind=self.kind,
            eta=self.eta,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            tau=self.tau,
            step=self.round + 1 if self.bias_correction else None,
        )
        return new

    def _state(self) -> State:
        if self.m is None or self.v is None:
            return {}
        return {**_flatten("fedopt.m", self.m), **_flatten("fedopt.v", self.v)}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        m, v = _unflatten("fedopt.m", state), _unflatten("fedopt.v", state)
        self.m, self.v = (m, v) if m else (None, None)


class FedAdam(_FedOpt):
    """FedAdam (Reddi et al. 2021, Alg. 2)."""

    name = "fedadam"
    kind = "adam"


class FedYogi(_FedOpt):
    """FedYogi (Reddi et al. 2021, Alg. 2)."""

    name = "fedyogi"
    kind = "yogi"


class FedAdagrad(_FedOpt):
    """FedAdagrad (Reddi et al. 2021, Alg. 2); beta_1 defaults to 0 (no momentum), as Flower."""

    name = "fedadagrad"
    kind = "adagrad"

    def __init__(self, *, beta_1: float = 0.0, **kwargs: Any) -> None:
        super().__init__(beta_1=beta_1, **kwargs)


class Scaffold(_Base):
    """Scaffold (Karimireddy et al. 2020; Levac et al. 2023 Algorithm 1).

    Sends c as ArrayRecord ``scaffold.c-global`` and ``scaffold.option`` in the config; each
    reply carries the trained model y_k in ``arrays`` and Delta c_k in ``scaffold.c-delta``.

    Invariant: c = (1/N) sum_k c_k over the sites' *committed* c_k. A site keeps c_k^+ pending
    until the server has accepted the reply that carried its Delta c_k (:mod:`client.control`):
    the reply's config has the token of c_k^+ (``scaffold.token``, 16 to 64 hex characters, or
    none from a site that commits at once), ``accepted`` keeps the token of each site's last
    aggregated reply, and every train config lists them all (``scaffold.accepted``: tokens
    only, the same list for every node, so a node id that changes on resume does not matter).
    ``accepted`` is part of ``state_dict()``; train messages go out after the checkpoint of
    the round before, so the list names what the checkpointed c contains. A reply that is
    rejected or never arrives leaves ``accepted`` (and c) as they were: its site discards its
    pending c_k^+ at its next train message.

    Parameters
    ----------
    eta_g : float
        Global step size (1.0: the model update is the mean of the y_k).
    option : {"i", "ii"}
        Control-variate rule the clients use (sent to them).
    num_clients : int, optional
        N in c <- c + |S|/N mean(Delta c_k), the federation's sites (the server passes
        ``data.num-sites``); None = nodes connected at sampling time. Never below |S|.
    control_keys : sequence of str, optional
        Model keys that carry control variates (the trainable parameters); None = every
        float array of the model. Clients must send Delta c for exactly these keys.
    weighted : bool
        Weight the model update by examples instead of the paper's uniform mean.
    **kwargs
        Sampling options of the base strategy.
    """

    name = "scaffold"

    def __init__(
        self,
        *,
        eta_g: float = 1.0,
        option: str = "ii",
        num_clients: int | None = None,
        control_keys: Iterable[str] | None = None,
        weighted: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if option not in SCAFFOLD_OPTIONS:
            raise ValueError(f"scaffold option must be one of {SCAFFOLD_OPTIONS}, got {option!r}")
        self.eta_g = eta_g
        self.option = option
        self.num_clients = num_clients
        self.control_keys = None if control_keys is None else list(control_keys)
        self.weighted = weighted
        self.c_global: Arrays | None = None
        self.accepted: dict[str, str] = {}  # site -> token of its last aggregated reply
        self._tokens: dict[int, str] = {}  # node -> token of its reply, this round

    def _init_c(self) -> Arrays:
        if self.c_global is None:
            assert self._global is not None
            keys = self.control_keys
            if keys is None:
                keys = [k for k, a in self._global.items() if maths.is_float(a)]
            unknown = [k for k in keys if k not in self._global]
            if unknown:
                raise ValueError(f"control_keys not in the model: {unknown}")
            self.c_global = {k: np.zeros_like(self._global[k]) for k in keys}
        return self.c_global

    def _settings(self) -> dict[str, Any]:
        names = ("eta_g", "option", "num_clients", "weighted")
        return {n: getattr(self, n) for n in names}

    def _train_config(self, config: ConfigRecord) -> None:
        config[SCAFFOLD_OPTION] = self.option
        config[SCAFFOLD_ACCEPTED] = sorted(set(self.accepted.values()))
        self._tokens = {}  # a new round: tokens of this round's replies

    def _extra_records(self) -> dict[str, ArrayRecord]:
        return {SCAFFOLD_C_GLOBAL: to_record(self._init_c())}

    def _decode_train_reply(self, msg: Message, node: int) -> Reply:
        reply = super()._decode_train_reply(msg, node)
        config = records_of(msg.content, ConfigRecord).get(CONFIG)
        token = None if config is None else config.get(SCAFFOLD_TOKEN)
        if token is not None:
            hexdigits = set("0123456789abcdef")
            if not (isinstance(token, str) and 16 <= len(token) <= 64 and set(token) <= hexdigits):
                raise ReplyError(f"{CONFIG}[{SCAFFOLD_TOKEN!r}]: expected 16-64 hex characters")
            self._tokens[node] = token
        return reply

    def _extra_references(self) -> dict[str, Arrays]:
        return {SCAFFOLD_C_DELTA: self._init_c()}

    def _aggregate(self, global_arrays: Arrays, replies: Sequence[Reply]) -> Arrays:
        # N: the federation's sites (data.num-sites), not the nodes sampled or connected
        num_clients = max(self.num_clients or self.num_nodes, len(replies))
        heads = _headers(replies)
        new, self.c_global = maths.scaffold_server_update(  # y_k, then Delta c_k, streamed
            global_arrays,
            _models(replies),
            self._init_c(),
            _records(replies, SCAFFOLD_C_DELTA),
            eta_g=self.eta_g,
            num_clients=num_clients,
            weights=[r.num_examples for r in heads] if self.weighted else None,
        )
        for r in heads:  # their Delta c_k are in c now: their sites may commit c_k^+
            token = self._tokens.get(r.node_id)
            if token is None:
                self.accepted.pop(r.site, None)
            else:
                self.accepted[r.site] = token
        return new

    def _state(self) -> State:
        if self.c_global is None:
            return {}
        tokens = {f"{SCAFFOLD_ACCEPTED}/{site}": t for site, t in sorted(self.accepted.items())}
        return {**_flatten(SCAFFOLD_C_GLOBAL, self.c_global), **tokens}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.c_global = _unflatten(SCAFFOLD_C_GLOBAL, state) or None
        start = f"{SCAFFOLD_ACCEPTED}/"
        self.accepted = {
            k[len(start) :]: str(_scalar(v)) for k, v in state.items() if k.startswith(start)
        }


STRATEGIES: dict[str, type[_Base]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, Scaffold)
}


def _accepted_kwargs(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is _FlowerFedAvg:
            break
        init = vars(klass).get("__init__")  # an inherited one was read with its class
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    return names


def build_strategy(name: str, **kwargs: Any) -> _Base:
    """Build a strategy by name (fedavg, fedprox, fedadam, fedyogi, fedadagrad, scaffold).

    Raises
    ------
    ValueError
        For an unknown name or an option the strategy does not take; both list the valid ones.
    """
    from strategies.nas import NAS_STRATEGIES  # fairfedavg, nas-search (imports this module)

    known = {**STRATEGIES, **NAS_STRATEGIES}
    if name not in known:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(known)}")
    cls = known[name]
    accepted = _accepted_kwargs(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"strategy {name!r} takes no option(s) {unknown}; valid: {', '.join(sorted(accepted))}"
        )
    return cls(**kwargs)

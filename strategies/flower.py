"""Flower strategies (Message API) that validate replies, move records and call ``maths``.

Shared behaviour (``_Base``):

- every train reply is validated (``records.validate_reply`` / ``validate_metrics``) against
  what the server sent; an error reply or a malformed or non-finite one is dropped, logged and
  appended to ``self.rejected``; fewer than ``min_valid_replies`` valid replies raises
  ``NotEnoughReplies``;
- reply arrays are cast to the global model's dtypes and aggregated in site order, so the
  result does not depend on reply arrival order;
- ``self.round`` counts completed rounds and is part of ``state_dict()``: the round sent as
  ``server-round`` and used by the maths is ``self.round + 1``, not the ``server_round``
  argument, so a resumed ``start()`` (which counts from 1 again) continues the same sequence;
- the ConfigRecord passed in is copied, never mutated.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
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
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from strategies import maths
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    FEDPROX_MU,
    METRICS,
    NUM_EXAMPLES,
    SCAFFOLD_ACCEPTED,
    SCAFFOLD_C_DELTA,
    SCAFFOLD_C_GLOBAL,
    SCAFFOLD_OPTION,
    SCAFFOLD_OPTIONS,
    SCAFFOLD_TOKEN,
    SERVER_ROUND,
    SITE_ID,
    ReplyError,
    to_numpy,
    to_record,
    validate_metrics,
    validate_reply,
)

State = dict[str, Any]
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


def site_of(reply: Message, node: int, known: dict[int, str]) -> str:
    """The reply's ``site-id`` (learned into ``known``), else the node's known site, else
    ``node-<id>``."""
    if reply.has_content() and CONFIG in reply.content.config_records:
        site = reply.content.config_records[CONFIG].get(SITE_ID)
        if site is not None:
            known[node] = str(site)
    return known.get(node, f"node-{node}")


def _aggregate_metrics(replies: list[Reply]) -> MetricRecord:
    """Example-weighted mean of the metrics every reply has; ``num-examples`` is summed."""
    total = sum(r.num_examples for r in replies)
    common = [k for k in replies[0].metrics if all(k in r.metrics for r in replies)]
    out: dict[str, Any] = {NUM_EXAMPLES: total}
    for key in common:
        if key == NUM_EXAMPLES:
            continue
        values = [r.metrics[key] for r in replies]
        try:
            stacked = np.asarray(values, dtype=np.float64)
        except ValueError:  # lists of different lengths
            log(WARNING, "metric %r has inconsistent lengths; not aggregated", key)
            continue
        weights = np.asarray([r.num_examples for r in replies], dtype=np.float64) / total
        mean = np.tensordot(weights, stacked, axes=1)
        out[key] = mean.tolist() if isinstance(values[0], list) else float(mean)
    return MetricRecord(out)


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


class _Base(_FlowerFedAvg):
    """Validation, round bookkeeping, state and sampling shared by all fedunroll strategies."""

    name: ClassVar[str] = ""

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        min_valid_replies: int | None = None,
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
        self.round = 0
        self.rejected: list[Rejection] = []
        self.train_site_metrics: dict[int, dict[str, dict[str, Any]]] = {}
        self.evaluate_site_metrics: dict[int, dict[str, dict[str, Any]]] = {}
        self.num_nodes = 0  # connected nodes at the last configure_train
        self.node_sites: dict[int, str] = {}  # node id -> site id, learned from replies
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

    def _aggregate(self, global_arrays: Arrays, replies: list[Reply]) -> Arrays:
        """New global arrays from validated replies (FedAvg by default)."""
        return maths.fedavg([r.arrays for r in replies], [r.num_examples for r in replies])

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
        super().summary()

    # --- state ------------------------------------------------------------------------
    def state_dict(self) -> State:
        """Strategy state: ``strategy`` (name), ``round`` and arrays under ``<record>/<key>``."""
        return {"strategy": self.name, "round": self.round, **self._state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (scalars may come back as 0-d arrays)."""
        name = _scalar(state.get("strategy"))
        if name != self.name:
            raise ValueError(f"state is for strategy {name!r}, this is {self.name!r}")
        self.round = int(_scalar(state["round"]))
        self._load_state(state)

    # --- train ------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, min_nodes: int, phase: str) -> list[int]:
        """Sample as Flower's FedAvg does (waits for ``min_available_nodes``)."""
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, all_nodes = sample_nodes(
            grid, self.min_available_nodes, max(num_nodes, min_nodes)
        )
        self.num_nodes = len(all_nodes)
        log(INFO, "configure_%s: sampled %s of %s nodes", phase, len(node_ids), len(all_nodes))
        return node_ids

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

    def _who(self, msg: Message) -> tuple[int, str]:
        """(node, site) a reply is about, via ``reply_to_message_id`` (see :func:`reply_node`)."""
        node = reply_node(msg, sent_nodes(self._sent))
        return node, site_of(msg, node, self.node_sites)

    def _parse_train_reply(self, msg: Message, node: int, site: str) -> Reply:
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        content = msg.content
        extra_refs = self._extra_references()
        expected = {ARRAYS, *extra_refs}
        got = set(content.array_records)
        if got != expected:
            raise ReplyError(
                f"array records {sorted(got)} != expected {sorted(expected)} "
                "(is the client running the same strategy?)"
            )
        if METRICS not in content.metric_records:
            raise ReplyError(f"missing MetricRecord {METRICS!r}")
        metrics = dict(content.metric_records[METRICS])
        num_examples = validate_metrics(metrics)
        parsed = {}
        for name, ref in {ARRAYS: self._global, **extra_refs}.items():
            try:
                arrays = to_numpy(content.array_records[name])
            except Exception as err:  # undecodable bytes are a reply fault
                raise ReplyError(f"{name}: cannot decode arrays ({err})") from err
            validate_reply(arrays, ref, record=name)
            cast = {k: arrays[k].astype(ref[k].dtype, copy=False) for k in ref}
            if any(cast[k].dtype != arrays[k].dtype for k in ref):
                validate_reply(cast, ref, record=name)  # e.g. float64 beyond float32 range
            parsed[name] = cast
        arrays = parsed.pop(ARRAYS)
        return Reply(site, node, num_examples, arrays, metrics, parsed)

    def reject(self, round_: int, site: str, reason: str, phase: str = "train") -> None:
        """Record (and log) that ``site``'s ``phase`` reply of ``round_`` was dropped.

        Also for replies that never came (the server's round loop calls it on a timeout).
        """
        log(WARNING, "round %s: %s reply from %s rejected: %s", round_, phase, site, reason)
        self.rejected.append(Rejection(round_, site, reason, phase))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, drop bad ones, aggregate the rest; advances ``self.round``."""
        round_ = self.round + 1
        valid: list[Reply] = []
        for msg in replies:
            node, site = self._who(msg)
            if msg.has_error():
                self.reject(round_, site, f"client error: {msg.error.reason}", "train")
                continue
            try:
                valid.append(self._parse_train_reply(msg, node, site))
            except ReplyError as err:
                self.reject(round_, site, str(err), "train")
        valid.sort(key=lambda r: (r.site, r.node_id))  # arrival order must not matter
        log(INFO, "aggregate_train: %s valid replies", len(valid))
        if len(valid) < self.min_valid_replies:
            reasons = "; ".join(f"{r.site}: {r.reason}" for r in self.rejected if r.round == round_)
            raise NotEnoughReplies(
                f"round {round_}: {len(valid)} valid train replies, need "
                f"{self.min_valid_replies}. Rejected: {reasons or 'none'}"
            )
        if not valid:
            return None, None
        assert self._global is not None
        new_global = self._aggregate(self._global, valid)
        self.train_site_metrics[round_] = {r.site: r.metrics for r in valid}
        self.round = round_
        return to_record(new_global), _aggregate_metrics(valid)

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
        for msg in replies:
            node_id, site = self._who(msg)
            if msg.has_error():
                self.reject(self.round, site, f"client error: {msg.error.reason}", "evaluate")
                continue
            try:
                if METRICS not in msg.content.metric_records:
                    raise ReplyError(f"missing MetricRecord {METRICS!r}")
                metrics = dict(msg.content.metric_records[METRICS])
                valid.append(Reply(site, node_id, validate_metrics(metrics), {}, metrics))
            except ReplyError as err:
                self.reject(self.round, site, str(err), "evaluate")
        if not valid:
            log(WARNING, "aggregate_evaluate: no valid replies in round %s", self.round)
            return None
        valid.sort(key=lambda r: (r.site, r.node_id))
        self.evaluate_site_metrics[self.round] = {r.site: r.metrics for r in valid}
        return _aggregate_metrics(valid)


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

    def _aggregate(self, global_arrays: Arrays, replies: list[Reply]) -> Arrays:
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
        N in c <- c + |S|/N mean(Delta c_k); None = nodes connected at sampling time.
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
        self._tokens: dict[tuple[str, int], str] = {}  # (site, node) -> token, this round

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

    def _parse_train_reply(self, msg: Message, node: int, site: str) -> Reply:
        reply = super()._parse_train_reply(msg, node, site)
        config = msg.content.config_records.get(CONFIG)
        token = None if config is None else config.get(SCAFFOLD_TOKEN)
        if token is not None:
            hexdigits = set("0123456789abcdef")
            if not (isinstance(token, str) and 16 <= len(token) <= 64 and set(token) <= hexdigits):
                raise ReplyError(f"{CONFIG}[{SCAFFOLD_TOKEN!r}]: expected 16-64 hex characters")
            self._tokens[(site, node)] = token
        return reply

    def _extra_references(self) -> dict[str, Arrays]:
        return {SCAFFOLD_C_DELTA: self._init_c()}

    def _aggregate(self, global_arrays: Arrays, replies: list[Reply]) -> Arrays:
        num_clients = self.num_clients or max(self.num_nodes, len(replies))
        new, self.c_global = maths.scaffold_server_update(
            global_arrays,
            [r.arrays for r in replies],
            self._init_c(),
            [r.extra[SCAFFOLD_C_DELTA] for r in replies],
            eta_g=self.eta_g,
            num_clients=num_clients,
            weights=[r.num_examples for r in replies] if self.weighted else None,
        )
        for r in replies:  # their Delta c_k are in c now: their sites may commit c_k^+
            token = self._tokens.get((r.site, r.node_id))
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

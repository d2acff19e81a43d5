"""Strategies of the architecture-search issue (GAutoMRI, FedAutoMRI).

- :class:`FairFedAvg` (``fairfedavg``): the training phase with fairness-adjusted aggregation
  weights (GAutoMRI Algorithm 2, Eq. 9-11). Every train reply carries the site's empirical risk
  gap ``fair.risk-gap`` (Eq. 9) as a metric; the server updates the per-site weights
  :math:`a_c` with :func:`strategies.nas_maths.fairness_weights` and aggregates
  :math:`\\theta = \\sum_c a_c \\hat\\theta_c` (no :math:`N_c` factor). The weights are keyed
  by site id and are strategy state (``fair.weights/<site>``), so a resumed run continues them.
  A site seen for the first time starts at :math:`1/C` (C = the round's valid replies); when
  only some sites reply, Eq. 10-11 run over those sites and their weights are renormalised
  among themselves (the others keep theirs).
- :class:`NasSearch` (``nas-search``): the search phase (GAutoMRI Algorithm 1, Eq. 8). Sends θ
  (``arrays``) and α (``nas.alpha``) and expects both back; θ is the example-weighted FedAvg and
  α the example-weighted mean over *every* valid reply
  (:func:`strategies.nas_maths.aggregate_alpha`). α is strategy state (``nas.alpha/<key>``).
  A robust ``aggregator`` replaces θ's mean; α keeps Eq. 8.

Both check their train replies against their own schema (``protocol.FAIR_TRAIN_SCHEMA``: the
risk gap is required; ``protocol.SEARCH_SCHEMA``), with the identity and influence bounds of
:class:`strategies.flower._Base`. Their replies stream in and are spilled to disk as every
strategy's are (:class:`strategies.flower.TrainReplies`), but their ``_aggregate`` takes the
accepted replies as a list with all arrays loaded (``streams = False``): the fairness weights
and α's mean are written for a list, and the search phase runs on a few sites.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from strategies import maths, nas_maths
from strategies.flower import (
    Arrays,
    Reply,
    State,
    _Base,
    _flatten,
    _unflatten,
)
from strategies.protocol import (
    FAIR_REPORT,
    FAIR_RISK_GAP,
    FAIR_TRAIN_SCHEMA,
    FAIR_WEIGHTS,
    NAS_ALPHA,
    SEARCH_SCHEMA,
    ReplySchema,
    to_record,
)


class FairFedAvg(_Base):
    """FedAvg with fairness-adjusted, resumable per-site weights (GAutoMRI Eq. 9-11)."""

    name = "fairfedavg"
    train_schema: ClassVar[ReplySchema] = FAIR_TRAIN_SCHEMA  # fair.risk-gap required
    streams = False  # _aggregate takes the round's replies as a list, arrays loaded

    def __init__(self, *, gamma: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
        self.gamma = gamma
        self.weights: dict[str, float] = {}  # a_c^{r}, keyed by site id
        self.weight_history: dict[int, dict[str, float]] = {}

    def _settings(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def _train_config(self, config: ConfigRecord) -> None:
        config[FAIR_REPORT] = True

    def _aggregate(self, global_arrays: Arrays, replies: Sequence[Reply]) -> Arrays:
        sites = [r.site for r in replies]
        prev = [self.weights.get(s, 1.0 / len(replies)) for s in sites]
        gaps = [float(r.metrics[FAIR_RISK_GAP]) for r in replies]
        new = nas_maths.fairness_weights(prev, gaps, self.gamma)
        self.weights.update({s: float(a) for s, a in zip(sites, new)})
        self.weight_history[self.round + 1] = {s: float(a) for s, a in zip(sites, new)}
        return maths.fedavg([r.arrays for r in replies], new.tolist())

    def _state(self) -> State:
        weights = {s: np.asarray(a, np.float64) for s, a in self.weights.items()}
        return _flatten(FAIR_WEIGHTS, weights)

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.weights = {s: float(a) for s, a in _unflatten(FAIR_WEIGHTS, state).items()}


class NasSearch(_Base):
    """Search phase: θ by FedAvg, α by :func:`~strategies.nas_maths.aggregate_alpha` (Eq. 8).

    Parameters
    ----------
    alpha : dict[str, np.ndarray]
        The initial α (the search net's ``alpha_state()``).
    """

    name = "nas-search"
    train_schema: ClassVar[ReplySchema] = SEARCH_SCHEMA
    streams = False  # _aggregate takes the round's replies as a list, arrays loaded

    def __init__(self, *, alpha: Mapping[str, np.ndarray] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha: Arrays | None = (
            None if alpha is None else {k: np.array(v, copy=True) for k, v in alpha.items()}
        )

    def _alpha(self) -> Arrays:
        if self.alpha is None:
            raise RuntimeError("NasSearch needs the initial alpha (alpha=...)")
        return self.alpha

    def _extra_records(self) -> dict[str, ArrayRecord]:
        return {NAS_ALPHA: to_record(self._alpha())}

    def _extra_references(self) -> dict[str, Arrays]:
        return {NAS_ALPHA: self._alpha()}

    def _aggregate(self, global_arrays: Arrays, replies: Sequence[Reply]) -> Arrays:
        n = [r.num_examples for r in replies]
        self.alpha = nas_maths.aggregate_alpha([r.extra[NAS_ALPHA] for r in replies], n)
        return self._combine_models(replies)

    def _evaluate_records(self) -> dict[str, ArrayRecord]:
        """Evaluate the supernet with the current global α (sent as ``nas.alpha``)."""
        return self._extra_records()

    def _state(self) -> State:
        return {} if self.alpha is None else _flatten(NAS_ALPHA, self.alpha)

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.alpha = _unflatten(NAS_ALPHA, state) or self.alpha


NAS_STRATEGIES: dict[str, type[_Base]] = {cls.name: cls for cls in (FairFedAvg, NasSearch)}

__all__ = ["NAS_STRATEGIES", "FairFedAvg", "NasSearch"]

"""A hostile hospital: a ClientApp written from ``strategies/protocol.py`` alone.

It answers every message type of the protocol (train, evaluate, ``query.site``,
``train.personalize``) like a site that trains nothing (it sends the global model back), except
for one configurable fault. Configure it through the node config (``InProcessGrid``'s
``node_configs``) or with :func:`make`:

``fault``
    One of :data:`FAULTS` (default ``"none"``).
``site-id``
    The name it claims for itself (default ``"hostile"``).
``claim``
    The name it claims instead from round ``claim-from-round`` on (faults ``claim`` and
    ``duplicate``; default ``"site0"``, from round 2 for ``claim``, always for ``duplicate``).

Whatever it sends that the server must never store carries :data:`MARKER` (text) or
:data:`MARKER_VALUE` (numbers), so a test can grep the run directory and the logs for them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from strategies.protocol import (
    ARRAYS,
    CONFIG,
    EVAL_SPLIT,
    METRIC_KEYS,
    METRICS,
    NUM_EXAMPLES,
    PERSONALIZE,
    SCAFFOLD_C_DELTA,
    SCAFFOLD_C_GLOBAL,
    SERVER_ROUND,
    SITE_ID,
    SITE_QUERY,
    UNSEEN,
    to_numpy,
    to_record,
)

MARKER = "HOSTILE-MARKER-7f3a"
MARKER_VALUE = 4242.424242  # a number no honest metric takes

FAULTS = {
    "none": "a well-formed reply (the global model sent back)",
    "list-metric": "train: a list-valued train-loss",
    "missing-psnr": "evaluate (every split): no psnr",
    "list-final": "final evaluation (split test): psnr is a list",
    "claim": "from claim-from-round on: claims the name of another (bound) site",
    "duplicate": "always claims the name of another site, from its first reply",
    "examples": "train: num-examples = 10**12",
    "many-examples": "train: num-examples = 10**6 (under the hard limit: capped)",
    "weight": "train: one weight of y_k set to 1e30 (finite float32)",
    "scaffold-dc": "train: one entry of Delta c_k set to 1e30",
    "long-list": "train: num-examples is a 4096-value list of MARKER_VALUE",
    "error-text": "every message: an error reply with 200 kB of text holding MARKER",
    "key-name": "train and evaluate: a metric whose key is 1 MB holding MARKER",
    "site-name": "every reply: a 1 kB site-id holding MARKER",
}


def _metrics(kind: str, split: str) -> dict[str, Any]:
    if kind == MessageType.TRAIN:
        return {NUM_EXAMPLES: 10, "train-loss": 0.5, "ssim": 0.5, "nrmse": 0.3, "psnr": 20.0}
    if kind == PERSONALIZE:
        out: dict[str, Any] = {NUM_EXAMPLES: 10, "n-fine": 0, "fine-tune": 0}
        for k, v in zip(METRIC_KEYS, (0.5, 0.3, 20.0), strict=True):
            out[f"before-{k}"] = out[f"after-{k}"] = v
        return out
    # evaluate: plausible numbers, and zero-filled ones a little worse
    return {NUM_EXAMPLES: 5, "ssim": 0.5, "nrmse": 0.3, "psnr": 20.0} | {
        "zf-ssim": 0.4,
        "zf-nrmse": 0.4,
        "zf-psnr": 18.0,
    }


def _name(config: Any, node_config: dict[str, Any], fault: str, query: bool = False) -> str:
    own = str(node_config.get("site-id", "hostile"))
    if fault == "site-name":
        return MARKER * 60
    claim = str(node_config.get("claim", "site0"))
    if fault == "duplicate":
        return claim
    if fault == "claim":
        start = int(node_config.get("claim-from-round", 2))
        rnd = config.get(SERVER_ROUND)
        # round r's evaluate message carries r too; the final evaluation carries none, and
        # neither does the query that names every node before round 1
        if query:
            return own
        return claim if rnd is None or int(rnd) >= start else own
    return own


def client(msg: Message, context: Context) -> Message:
    """Reply to ``msg`` as a site with the node config's ``fault``."""
    nc = dict(context.node_config)
    fault = str(nc.get("fault", "none"))
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    if fault == "error-text":
        reason = (MARKER + " ") * (200_000 // (len(MARKER) + 1))
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
    kind = msg.metadata.message_type
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    split = str(config.get(EVAL_SPLIT, "val"))
    name = _name(config, nc, fault, query=kind == SITE_QUERY)
    if kind == SITE_QUERY:
        reply = ConfigRecord({SITE_ID: name, UNSEEN: False})
        return Message(RecordDict({CONFIG: reply}), reply_to=msg)

    metrics = _metrics(kind, split)
    content = RecordDict({CONFIG: ConfigRecord({SITE_ID: name})})
    if kind == MessageType.TRAIN:
        y = to_numpy(msg.content.array_records[ARRAYS])  # nothing learned: x sent back
        if fault == "weight":
            key = next(k for k, a in y.items() if a.dtype.kind == "f" and a.size)
            y[key] = y[key].copy()
            y[key].flat[0] = 1e30
        content[ARRAYS] = to_record(y)
        if SCAFFOLD_C_GLOBAL in msg.content.array_records:
            c = to_numpy(msg.content.array_records[SCAFFOLD_C_GLOBAL])
            dc = {k: np.zeros_like(v) for k, v in c.items()}
            if fault == "scaffold-dc":
                key = next(k for k, a in dc.items() if a.size)
                dc[key].flat[0] = 1e30
            content[SCAFFOLD_C_DELTA] = to_record(dc)
        if fault == "list-metric":
            metrics["train-loss"] = [0.1, 0.2]
        elif fault == "examples":
            metrics[NUM_EXAMPLES] = 10**12
        elif fault == "many-examples":
            metrics[NUM_EXAMPLES] = 10**6
        elif fault == "long-list":
            metrics[NUM_EXAMPLES] = [MARKER_VALUE] * 4096
    elif kind == MessageType.EVALUATE:
        if fault == "missing-psnr":
            del metrics["psnr"]
        elif fault == "list-final" and split == "test":
            metrics["psnr"] = [MARKER_VALUE, MARKER_VALUE]
    if fault == "key-name" and kind in (MessageType.TRAIN, MessageType.EVALUATE):
        metrics[MARKER + "k" * 1_000_000] = 1.0
    content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


def make(fault: str, **node_config: Any):
    """``client`` with ``fault`` (and other node-config entries) set, whatever the node config
    says: for a grid whose node configs are the default ones."""

    def configured(msg: Message, context: Context) -> Message:
        context.node_config.update({"fault": fault, **node_config})
        return client(msg, context)

    return configured

"""The message protocol: the only module the ServerApp and the ClientApp share.

Every record name, message type and config key that crosses the network is defined here, with
the record codec (:func:`to_numpy`, :func:`to_record`) and the reply validators. ``server/``
and ``client/`` never import each other; a site written from this module alone can take part.

Records in a train message (server -> client)
---------------------------------------------
``arrays`` (ArrayRecord)
    The global model, ``state_dict`` order and dtypes.
``config`` (ConfigRecord)
    ``server-round`` always; ``fedprox.mu`` (FedProx); ``scaffold.option`` (Scaffold).
``scaffold.c-global`` (ArrayRecord, Scaffold only)
    The server control variate c, float arrays keyed like the model's parameters.

Records in a train reply (client -> server)
-------------------------------------------
``arrays`` (ArrayRecord)
    The locally trained model y_k: exactly the keys, shapes and dtypes received.
``metrics`` (MetricRecord)
    ``num-examples`` (positive int, the aggregation weight) plus finite scalar metrics.
``scaffold.c-delta`` (ArrayRecord, Scaffold only)
    Delta c_k = c_k+ - c_k, same keys/shapes/dtypes as ``scaffold.c-global``.
``config`` (ConfigRecord, optional)
    ``site-id`` (str): a readable site name used in logs and rejection records. The server
    binds it to the sending node the first time it sees the node (identity comes from the
    transport, never from the payload): a node cannot take another site's name.

Every reply, in every phase, is checked against its phase's :class:`ReplySchema`
(:func:`check_content`): declared records, declared metric keys, finite scalars, bounded
counts and text. A site's error reply says only what kind of failure it was
(:data:`ERROR_KINDS`); its own log has the details.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

# Record names (keys of a Message's RecordDict).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SCAFFOLD_C_GLOBAL = "scaffold.c-global"
SCAFFOLD_C_DELTA = "scaffold.c-delta"
NAS_ALPHA = "nas.alpha"
FAIR_RISK_GAP = "fair.risk-gap"

# Metric keys.
NUM_EXAMPLES = "num-examples"

# Config keys (namespaced: never a bare ``mu``).
SERVER_ROUND = "server-round"
SITE_ID = "site-id"
FEDPROX_MU = "fedprox.mu"
SCAFFOLD_OPTION = "scaffold.option"
# Scaffold's acknowledgement (client/control.py): a train reply's config carries the token of
# its c_k^+ (32 hex characters); every train config lists the tokens of the replies the server
# has aggregated (one per site), so a site commits c_k^+ only once its reply was accepted.
SCAFFOLD_TOKEN = "scaffold.token"
SCAFFOLD_ACCEPTED = "scaffold.accepted"
TRAIN_LOCAL_STEPS = "train.local-steps"
TRAIN_LR = "train.lr"

SCAFFOLD_OPTIONS = ("i", "ii")

# Config entries of the round loop.
RUN_UID = "run.uid"  # identifies a run across resumes (site state files are keyed by it)
EVAL_SPLIT = "eval.split"  # "val" every round, "test" for the final evaluation
# On a train message (eval-mode piggyback): evaluate the received global model on the site's
# validation slices before training, reported as the GLOBAL_METRIC_KEYS of the train reply.
EVAL_GLOBAL = "eval.global"
RUN_DONE = "run.done"  # on the final evaluation: sites may delete this run's client state
# The derived genotype (JSON) sent with every message of a training phase with a searched
# denoiser, so that sites build the same network (GAutoMRI Algorithm 2).
NAS_GENOTYPE = "nas.genotype"
# fairfedavg (GAutoMRI Eq. 9-11): a train message with this entry asks the site for
# ``fair.risk-gap`` (record FAIR_RISK_GAP's metric) and ``fair.local-loss``.
FAIR_REPORT = "fair.report-gap"
FAIR_WEIGHTS = "fair.weights"
FAIR_LOCAL_LOSS = "fair.local-loss"

# Personalization phase (Levac et al. 2023 Sec. 3.4): message types and config keys.
PERSONALIZE = "train.personalize"
SITE_QUERY = "query.site"
UNSEEN = "unseen"  # config key of the site-query reply, and the deployment node-config key
P_LRS = "personalize.lrs"
P_MAX_EPOCHS = "personalize.max-epochs"
P_FOLDS = "personalize.folds"
P_PATIENCE = "personalize.patience"
P_MIN_GAIN = "personalize.min-gain"

# Scalar metrics of an evaluation (the ``zf-`` prefix: zero-filled on the same slices).
METRIC_KEYS = ("ssim", "nrmse", "psnr")


R = TypeVar("R", ArrayRecord, MetricRecord, ConfigRecord)


def records_of(content: RecordDict, kind: type[R]) -> dict[str, R]:
    """The records of one kind (ArrayRecord, MetricRecord, ConfigRecord) in ``content``, in
    order, as a plain dict.

    Flower's ``RecordDict.array_records`` (and ``metric_records``, ``config_records``) is a
    view that refers to itself through a bound method: a reference cycle that keeps the whole
    content, every array's bytes, alive until the garbage collector runs. This keeps nothing,
    so a reply the server has consumed is freed at once (streaming aggregation).
    """
    return {k: v for k, v in content.items() if isinstance(v, kind)}


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> dict of numpy arrays (record order)."""
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Dict of numpy arrays -> ArrayRecord (order and dtypes kept)."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _entry(record: Mapping[str, object], key: str, default: object) -> object:
    if key in record:
        return record[key]
    if default is None:
        raise KeyError(key)
    return default


def get_int(record: Mapping[str, object], key: str, default: int | None = None) -> int:
    """``record[key]`` (a ConfigRecord or MetricRecord entry) as an int; ``default`` if absent.

    Takes what ``int()`` takes from a record value (int, bool, float, numeric text); anything
    else is a ``ValueError`` naming the key, so a bad value sent by the other side fails the
    handling of that one message, never the process. Absent without a default: ``KeyError``.
    """
    value = _entry(record, key, default)
    if isinstance(value, int | float | str):
        try:
            return int(value)
        except (ValueError, OverflowError):
            pass
    raise ValueError(f"{key!r}: expected an integer, got {value!r}")


def get_float(record: Mapping[str, object], key: str, default: float | None = None) -> float:
    """``record[key]`` as a float; ``default`` if absent (see :func:`get_int`)."""
    value = _entry(record, key, default)
    if isinstance(value, int | float | str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"{key!r}: expected a number, got {value!r}")


def get_str(record: Mapping[str, object], key: str, default: str | None = None) -> str:
    """``record[key]`` as text (``str()`` of any value, as the apps always read text entries);
    ``default`` if absent."""
    return str(_entry(record, key, default))


class ReplyError(ValueError):
    """A client reply that must not be aggregated; the message names the key and the fault."""


def validate_reply(
    reply_arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    record: str = ARRAYS,
) -> None:
    """Check a reply's arrays against the arrays the server sent.

    Parameters
    ----------
    reply_arrays : Mapping[str, np.ndarray]
        Arrays from the reply (name -> array).
    reference : Mapping[str, np.ndarray]
        What the server sent (global model or control variate).
    record : str
        Record name used in error messages.

    Raises
    ------
    ReplyError
        On missing or extra keys, a non-array value, a shape or dtype-kind mismatch
        (float vs integer vs bool), or NaN/inf values.
    """
    missing = [k for k in reference if k not in reply_arrays]
    if missing:
        listed = missing[:4] + ([f"... {len(missing) - 4} more"] if len(missing) > 4 else [])
        raise ReplyError(f"{record}: missing keys {listed}")
    extra = [k for k in reply_arrays if k not in reference]
    if extra:  # the reply's own names are never quoted
        raise ReplyError(f"{record}: unexpected keys (undeclared array key, {len(extra)} of them)")
    for key, ref in reference.items():
        value = reply_arrays[key]
        where = f"{record}[{key!r}]"
        if not isinstance(value, np.ndarray):
            raise ReplyError(f"{where}: expected a numpy array, got {_type_name(value)}")
        if value.shape != ref.shape:
            shape = value.shape if value.ndim <= 8 else f"({value.ndim} dimensions)"
            raise ReplyError(f"{where}: shape {shape} != expected {ref.shape}")
        if value.dtype.kind != ref.dtype.kind:
            raise ReplyError(
                f"{where}: dtype {_dtype_name(value.dtype)} is not of the kind of {ref.dtype}"
            )
        if value.dtype.kind in "fc":
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            if bad:
                raise ReplyError(f"{where}: {bad} non-finite value(s) (NaN/inf)")


def _type_name(value: object) -> str:
    return type(value).__name__ if type(value).__module__ in ("builtins", "numpy") else "object"


def _dtype_name(dtype: np.dtype) -> str:
    """A plain dtype's name; never a structured dtype's field names (reply content)."""
    return dtype.name if dtype.fields is None and dtype.kind in "biufcmMSUV" else "other"


def _finite(value: Real | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def validate_metrics(metrics: Mapping[str, object]) -> int:
    """Check a reply's metrics for shape alone and return its ``num-examples``.

    Schema-free (any keys, lists of numbers allowed): what a site may check of its own reply.
    The server checks every reply against its phase's schema instead (:func:`check_metrics`).

    Parameters
    ----------
    metrics : Mapping[str, object]
        The reply's MetricRecord as a dict.

    Returns
    -------
    int
        The number of examples (the aggregation weight).

    Raises
    ------
    ReplyError
        If ``num-examples`` is missing or not a positive int, or any metric is non-finite.
    """
    if NUM_EXAMPLES not in metrics:
        raise ReplyError(f"{METRICS}: missing {NUM_EXAMPLES!r}")
    n = metrics[NUM_EXAMPLES]
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise ReplyError(f"{METRICS}[{NUM_EXAMPLES!r}]: expected a positive int")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, Real) or not _finite(v):
                raise ReplyError(f"{METRICS}[{key!r}]: expected finite numbers")
    return int(n)


# --- reply schemas (every phase) ---------------------------------------------------------------
# Bounds on what a reply may carry: whatever the server keeps of a reply (results.json,
# checkpoint.pt, logs) is a declared key, a finite scalar or a bounded site name, and a
# rejection reason never quotes reply content (names a key only if it is a declared one).
MAX_METRIC_KEYS = 64
MAX_CONFIG_KEYS = 16
MAX_TEXT = 64  # longest string config value (a site name)
MAX_NUM_EXAMPLES = 10**9  # more slices than any hospital has; the median cap bounds the rest
MAX_REASON = 240  # longest rejection reason the server stores

# A site name: letters, digits and . _ - @ + :, at most MAX_TEXT, not ``node-<id>`` (what the
# server calls a node whose name is not bound).
_SITE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._@+:-]{{0,{MAX_TEXT - 1}}}")
_NODE_NAME = re.compile(r"node-[0-9]+")

# What kind of failure a site's error reply reports: its ``Error.reason`` is exactly one of
# these (the full message stays in the site's own log). Anything else is ``unrecognised``.
ERROR_DATA = "data"  # the site's data (missing, unreadable, wrong layout)
ERROR_CONFIG = "config"  # the run config, the node config or the message's entries
ERROR_DEVICE = "device"  # the node's torch device (missing, out of memory)
ERROR_INTERNAL = "internal"  # anything else
ERROR_KINDS = (ERROR_DATA, ERROR_CONFIG, ERROR_DEVICE, ERROR_INTERNAL)
UNRECOGNISED = "unrecognised"
# Errors Flower's own infrastructure makes (SuperLink, SuperNode), named by their code.
_FLOWER_ERRORS = {
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "ClientApp did not load",
    ErrorCode.MESSAGE_UNAVAILABLE: "Message Unavailable",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "Reply Message Unavailable",
    ErrorCode.NODE_UNAVAILABLE: "Node Unavailable",
    ErrorCode.MOD_FAILED_PRECONDITION: "mod failed precondition",
    ErrorCode.INVALID_FAB: "invalid FAB",
    ErrorCode.CLIENT_APP_CRASHED: "ClientApp crashed",
}

# Metric keys each phase's replies may carry (what client/app.py, client/nas.py and
# client/personalize.py send).
_ZF_KEYS = tuple(f"zf-{k}" for k in METRIC_KEYS)
# The received global model's metrics on the site's validation slices (eval-mode piggyback):
# the previous round's evaluation, carried by this round's train reply.
GLOBAL_PREFIX = "global-"
GLOBAL_METRIC_KEYS = tuple(GLOBAL_PREFIX + k for k in (*METRIC_KEYS, NUM_EXAMPLES))
TRAIN_METRIC_KEYS = (
    NUM_EXAMPLES,
    "train-loss",
    "train-final-loss",
    "steps",
    "train-seconds",
    "seconds",
    *METRIC_KEYS,  # of y_k on the site's validation slices
    FAIR_RISK_GAP,
    FAIR_LOCAL_LOSS,
    *GLOBAL_METRIC_KEYS,
)
SEARCH_METRIC_KEYS = (
    NUM_EXAMPLES,
    "train-loss",
    "train-final-loss",
    "val-loss",
    "steps",
    "train-seconds",
    "seconds",
)
EVALUATE_METRIC_KEYS = (NUM_EXAMPLES, *METRIC_KEYS, *_ZF_KEYS, "seconds")
PERSONALIZE_METRIC_KEYS = (
    NUM_EXAMPLES,
    *(f"before-{k}" for k in METRIC_KEYS),
    *(f"after-{k}" for k in METRIC_KEYS),
    "r-fine",
    "n-fine",
    "fine-tune",
    "cv-ssim-global",
    "cv-ssim-best",
    "seconds",
)
# Record names a reply may carry, by kind (the strategy checks the exact array records).
_RECORD_NAMES = (ARRAYS, CONFIG, METRICS, SCAFFOLD_C_GLOBAL, SCAFFOLD_C_DELTA, NAS_ALPHA)


# Slice-level DP (README "Privacy"): the site's epsilon after this round and after one more
# round of the same training (the server stops before a round past dp.epsilon-budget).
DP_EPSILON = "dp-epsilon"
DP_EPSILON_NEXT = "dp-epsilon-next"
TRAIN_METRIC_KEYS = (*TRAIN_METRIC_KEYS, DP_EPSILON, DP_EPSILON_NEXT)


@dataclass(frozen=True)
class ReplySchema:
    """What one phase's reply may carry.

    Attributes
    ----------
    phase : str
        Name used in rejection reasons and logs.
    metrics : tuple of str
        Declared metric keys (``()`` with ``needs_metrics=False``: no MetricRecord expected).
    required : tuple of str
        Metric keys every reply must have (``num-examples`` always, when metrics are expected).
    arrays : tuple of str
        Array records it may carry (the strategy checks the exact set it expects).
    config : dict of str -> type
        Declared entries of its ``config`` record, with their type (``str`` or ``bool``).
    needs_metrics : bool
        Whether the ``metrics`` record is required.
    """

    phase: str
    metrics: tuple[str, ...]
    required: tuple[str, ...] = ()
    arrays: tuple[str, ...] = ()
    config: Mapping[str, type] = field(default_factory=lambda: {SITE_ID: str})
    needs_metrics: bool = True


TRAIN_SCHEMA = ReplySchema(
    "train",
    TRAIN_METRIC_KEYS,
    arrays=(ARRAYS, SCAFFOLD_C_DELTA),
    config={SITE_ID: str, SCAFFOLD_TOKEN: str},
)
FAIR_TRAIN_SCHEMA = ReplySchema(
    "train", TRAIN_METRIC_KEYS, required=(FAIR_RISK_GAP,), arrays=(ARRAYS,)
)
SEARCH_SCHEMA = ReplySchema("search", SEARCH_METRIC_KEYS, arrays=(ARRAYS, NAS_ALPHA))
EVALUATE_SCHEMA = ReplySchema("evaluate", EVALUATE_METRIC_KEYS, required=METRIC_KEYS)
FINAL_SCHEMA = ReplySchema("final", EVALUATE_METRIC_KEYS, required=METRIC_KEYS + _ZF_KEYS)
PERSONALIZE_SCHEMA = ReplySchema(
    "personalize",
    PERSONALIZE_METRIC_KEYS,
    required=(
        *(f"before-{k}" for k in METRIC_KEYS),
        *(f"after-{k}" for k in METRIC_KEYS),
        "n-fine",
        "fine-tune",
    ),
)
QUERY_SCHEMA = ReplySchema("query", (), config={SITE_ID: str, UNSEEN: bool}, needs_metrics=False)


def bounded(reason: str, limit: int = MAX_REASON) -> str:
    """``reason`` on one line, printable, at most ``limit`` characters (a last guard: reasons
    are built from declared names and numbers only)."""
    text = "".join(c if c.isprintable() else " " for c in reason)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(keys: Iterable[str], declared: Iterable[str], what: str) -> str:
    """``'a', 'b'`` for declared keys, ``undeclared <what> (n of them)`` for the rest."""
    keys = list(keys)
    known = set(declared)
    named = [repr(k) for k in keys if isinstance(k, str) and k in known][:4]
    others = len(keys) - len(named)
    parts = named + ([f"undeclared {what} ({others} of them)"] if others else [])
    return ", ".join(parts)


def error_reason(kind: str, site: str | None = None) -> str:
    """The reason a site's error reply carries: the kind of failure (:data:`ERROR_KINDS`) and,
    when it knows it, the site's name (``"data site=site1"``), so that a site failing from its
    first message is still named; nothing else of the failure leaves the site."""
    return kind if site is None else f"{kind} site={site}"


def parse_error(code: int, reason: object) -> tuple[str, str | None]:
    """(kind, claimed site name or None) of an error reply (see :func:`error_reason`).

    The kind is a Flower infrastructure error's name (by code), else the reason's kind if it is
    one of :data:`ERROR_KINDS`, else ``unrecognised``; the claim is kept only if it is a valid
    site name. Never the reason's text otherwise (it may carry a site's file names).
    """
    if code in _FLOWER_ERRORS:
        return _FLOWER_ERRORS[code], None
    if not isinstance(reason, str):
        return UNRECOGNISED, None
    kind, _, rest = reason.partition(" site=")
    claim: str | None = None
    if rest:
        try:
            claim = check_site_name(rest)
        except ReplyError:
            claim = None
    return (kind if kind in ERROR_KINDS else UNRECOGNISED), claim


def error_kind(code: int, reason: object) -> str:
    """The kind of failure of an error reply (:func:`parse_error` without the claim)."""
    return parse_error(code, reason)[0]


def check_site_name(name: object) -> str:
    """``name`` if it is a valid site name (see :data:`_SITE_NAME`); :class:`ReplyError` else."""
    if (
        not isinstance(name, str)
        or _SITE_NAME.fullmatch(name) is None
        or _NODE_NAME.fullmatch(name) is not None
    ):
        raise ReplyError(
            f"{CONFIG}[{SITE_ID!r}]: not a valid site name (1-{MAX_TEXT} of A-Z a-z 0-9 . _ - "
            "@ + :, not node-<id>)"
        )
    return name


def site_claim(content: RecordDict) -> str | None:
    """The site name a reply claims (``config['site-id']``), None if it claims none.

    Raises
    ------
    ReplyError
        If the ``config`` record is not a ConfigRecord or the name is not a valid site name.
    """
    if CONFIG not in content:
        return None
    config = content[CONFIG]
    if not isinstance(config, ConfigRecord):
        raise ReplyError(f"record {CONFIG!r} is not a ConfigRecord")
    if SITE_ID not in config:
        return None
    return check_site_name(config[SITE_ID])


def _number(key: str, value: object) -> float | int:
    """A finite real scalar; :class:`ReplyError` (naming only the declared ``key``) else."""
    where = f"{METRICS}[{key!r}]"
    if isinstance(value, list):
        raise ReplyError(f"{where}: expected a finite number, got a list")
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        raise ReplyError(f"{where}: expected a finite number")
    return value


def check_metrics(metrics: Mapping[str, object], schema: ReplySchema) -> dict[str, float | int]:
    """A reply's metrics checked against ``schema``: declared keys only, at most
    :data:`MAX_METRIC_KEYS`, finite scalars, the required keys, and a positive int
    ``num-examples`` of at most :data:`MAX_NUM_EXAMPLES`.

    Returns
    -------
    dict
        The metrics (declared keys, finite scalars), in the reply's order.

    Raises
    ------
    ReplyError
        With a short reason that names declared keys only.
    """
    if len(metrics) > MAX_METRIC_KEYS:
        raise ReplyError(f"{METRICS}: {len(metrics)} keys, at most {MAX_METRIC_KEYS}")
    declared = set(schema.metrics)
    undeclared = [k for k in metrics if k not in declared]
    if undeclared:
        raise ReplyError(
            f"{METRICS} of a {schema.phase} reply: undeclared metric key "
            f"({len(undeclared)} of them)"
        )
    missing = [k for k in (NUM_EXAMPLES, *schema.required) if k not in metrics]
    if missing:
        raise ReplyError(f"{METRICS}: missing {', '.join(repr(k) for k in missing)}")
    out = {k: _number(k, v) for k, v in metrics.items()}
    n = out[NUM_EXAMPLES]
    if not isinstance(n, int | np.integer) or n <= 0:
        raise ReplyError(f"{METRICS}[{NUM_EXAMPLES!r}]: expected a positive int")
    if n > MAX_NUM_EXAMPLES:
        raise ReplyError(f"{METRICS}[{NUM_EXAMPLES!r}]: above the limit {MAX_NUM_EXAMPLES:.0e}")
    out[NUM_EXAMPLES] = int(n)
    return out


def check_content(content: RecordDict, schema: ReplySchema) -> dict[str, float | int]:
    """Check a reply's records against ``schema`` (record names and kinds, ``config`` entries,
    metrics); returns the checked metrics (``{}`` for a phase without).

    Array records are checked against the names the schema allows, not their content (the
    strategy validates them against what it sent, :func:`validate_reply`).

    Raises
    ------
    ReplyError
        With a short reason that never quotes reply content.
    """
    arrays = list(records_of(content, ArrayRecord))
    metric_records = records_of(content, MetricRecord)
    config_records = records_of(content, ConfigRecord)
    extra = [k for k in arrays if k not in schema.arrays]
    if extra:
        if not schema.arrays:
            raise ReplyError(f"{schema.phase} replies carry no arrays")
        raise ReplyError(f"unexpected array record(s) {_names(extra, _RECORD_NAMES, 'record')}")
    for kind, records, allowed in (
        ("MetricRecord", metric_records, (METRICS,)),
        ("ConfigRecord", config_records, (CONFIG,)),
    ):
        bad = [k for k in records if k not in allowed]
        if bad:
            raise ReplyError(f"unexpected {kind}(s) {_names(bad, _RECORD_NAMES, 'record')}")
    if len(content) != len(arrays) + len(metric_records) + len(config_records):
        raise ReplyError("records of an unknown kind")
    if CONFIG in config_records:
        _check_config(config_records[CONFIG], schema)
    if METRICS not in metric_records:
        if schema.needs_metrics:
            raise ReplyError(f"missing MetricRecord {METRICS!r}")
        return {}
    return check_metrics(dict(metric_records[METRICS]), schema)


def _check_config(config: Mapping[str, object], schema: ReplySchema) -> None:
    if len(config) > MAX_CONFIG_KEYS:
        raise ReplyError(f"{CONFIG}: {len(config)} entries, at most {MAX_CONFIG_KEYS}")
    undeclared = [k for k in config if k not in schema.config]
    if undeclared:
        raise ReplyError(
            f"{CONFIG} of a {schema.phase} reply: undeclared key ({len(undeclared)} of them)"
        )
    if SITE_ID in config:
        check_site_name(config[SITE_ID])
    for key, value in config.items():
        kind = schema.config[key]
        if kind is str and (not isinstance(value, str) or len(value) > MAX_TEXT):
            raise ReplyError(f"{CONFIG}[{key!r}]: expected text of at most {MAX_TEXT} characters")
        if kind is bool and not isinstance(value, bool):
            raise ReplyError(f"{CONFIG}[{key!r}]: expected true or false")

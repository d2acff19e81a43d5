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
    ``site-id`` (str): a readable site name used in logs and rejection records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import numpy as np
from flwr.app import Array, ArrayRecord

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
        raise ReplyError(f"{record}: missing keys {missing}")
    extra = [k for k in reply_arrays if k not in reference]
    if extra:
        raise ReplyError(f"{record}: unexpected keys {extra}")
    for key, ref in reference.items():
        value = reply_arrays[key]
        where = f"{record}[{key!r}]"
        if not isinstance(value, np.ndarray):
            raise ReplyError(f"{where}: expected a numpy array, got {type(value).__name__}")
        if value.shape != ref.shape:
            raise ReplyError(f"{where}: shape {value.shape} != expected {ref.shape}")
        if value.dtype.kind != ref.dtype.kind:
            raise ReplyError(f"{where}: dtype {value.dtype} is not of the kind of {ref.dtype}")
        if value.dtype.kind in "fc":
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            if bad:
                raise ReplyError(f"{where}: {bad} non-finite value(s) (NaN/inf)")


def _finite(value: Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def validate_metrics(metrics: Mapping[str, object]) -> int:
    """Check a reply's metrics and return its ``num-examples``.

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
        raise ReplyError(f"{METRICS}[{NUM_EXAMPLES!r}]: expected a positive int, got {n!r}")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, Real) or not _finite(v):
                raise ReplyError(f"{METRICS}[{key!r}]: expected finite numbers, got {value!r}")
    return int(n)

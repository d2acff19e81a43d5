"""Byzantine-robust aggregation maths: pure numpy functions, one per rule.

Every aggregation rule takes the round's client models y_k as dicts name -> array with the same
keys, order, shapes and dtypes, and returns the aggregate in that layout and those dtypes. Float
arrays get the robust statistic, computed in float64 and cast back once. Integer and bool arrays
(BatchNorm ``num_batches_tracked``) get the element-wise majority of the updates the rule keeps,
ties going to the smallest value, so no single site can set them (with equal counters everywhere
this is that counter). Complex arrays have no order and are refused.

Inputs must be finite (the reply validator rejects NaN and inf before aggregation; here they
raise ``ValueError``). Finite inputs never overflow into inf or NaN: a float32 update of 1e30
gives a finite median, trimmed mean, Krum score and norm, since everything is computed in float64
and global norms are scaled by the largest entry before squaring.

Papers: coordinate-wise median and trimmed mean (Yin et al., "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018, Definitions 1-2); Krum and multi-Krum
(Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
NeurIPS 2017, Sec. 4-5; El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML 2018); norm clipping of client updates (Sun et al., "Can You Really Backdoor
Federated Learning?", 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real

import numpy as np

from strategies.maths import check_same_layout, is_float

Arrays = dict[str, np.ndarray]


# --- shared checks and helpers ---------------------------------------------------------------


def _check_arrays(name: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Real or integer arrays only (complex has no order); float arrays finite."""
    for key, a in arrays.items():
        if a.dtype.kind not in "fiub":
            raise ValueError(f"{name}[{key!r}]: dtype {a.dtype} has no order")
        if is_float(a) and not np.isfinite(a).all():
            raise ValueError(f"{name}[{key!r}]: holds non-finite values")


def _check_updates(
    updates: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray] | None = None
) -> None:
    """Same keys, shapes and dtypes (as each other and as ``reference``); see ``_check_arrays``."""
    if len(updates) == 0:
        raise ValueError("nothing to aggregate: no updates")
    check_same_layout(updates)
    first = updates[0] if reference is None else reference
    if reference is not None:
        if list(reference) != list(updates[0]):
            raise ValueError(f"reference has keys {list(reference)}, updates {list(updates[0])}")
        for key, a in reference.items():
            if a.shape != updates[0][key].shape:
                raise ValueError(f"reference[{key!r}]: shape {a.shape} != {updates[0][key].shape}")
        _check_arrays("reference", reference)
    for i, u in enumerate(updates):
        _check_arrays(f"update {i}", u)
        for key, a in u.items():
            if a.dtype != first[key].dtype:
                raise ValueError(f"update {i}[{key!r}]: dtype {a.dtype} != {first[key].dtype}")


def _stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """[n, *shape] float64 stack of one key's arrays."""
    return np.stack([np.asarray(a, dtype=np.float64) for a in arrays])


def _majority(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Element-wise most frequent value of integer/bool arrays; ties go to the smallest value."""
    s = np.sort(np.stack(arrays), axis=0)  # [n, *shape], ascending along the updates
    counts = np.stack([(s == s[k]).sum(axis=0) for k in range(len(s))])  # [n, *shape]
    # argmax returns the first maximum: in sorted order that is the smallest most-frequent value.
    idx = np.expand_dims(counts.argmax(axis=0), 0)
    return np.take_along_axis(s, idx, axis=0)[0].astype(arrays[0].dtype)


def _combine(
    updates: Sequence[Mapping[str, np.ndarray]],
    stat_float: Callable[[np.ndarray], np.ndarray],
    keep: Sequence[int],
) -> Arrays:
    """Apply ``stat_float`` ([n, *shape] float64 -> [*shape]) to float keys, majority to others."""
    out: Arrays = {}
    for key, a0 in updates[0].items():
        arrays = [u[key] for u in updates]
        if is_float(a0):
            out[key] = stat_float(_stack(arrays)).astype(a0.dtype)
        else:
            out[key] = _majority([arrays[i] for i in keep])
    return out


def _scaled_norm(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    r"""``(s, r)`` with :math:`\lVert a\rVert_2 = s\,r` over all entries of all arrays.

    s is the largest absolute entry and :math:`r = \lVert a/s\rVert_2 \in [1, \sqrt{N}]`, so
    neither factor overflows even when :math:`\lVert a\rVert^2` would (LAPACK ``nrm2`` scaling).
    ``(0, 0)`` for an all-zero input.
    """
    scale = max((float(np.max(np.abs(a), initial=0.0)) for a in arrays), default=0.0)
    if scale == 0.0:
        return 0.0, 0.0
    if not math.isfinite(scale):  # a float64 difference beyond the float64 range
        return math.inf, 1.0
    total = math.fsum(float(np.sum(np.square(np.asarray(a, np.float64) / scale))) for a in arrays)
    return scale, math.sqrt(total)


def _lower_median(values: Sequence[float]) -> float:
    """The lower median: the ceil(n/2)-th smallest value (a value of the input, never a mean)."""
    s = sorted(values)
    return s[(len(s) - 1) // 2]


# --- coordinate-wise rules (Yin et al. 2018) ---------------------------------------------------


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> Arrays:
    r"""Coordinate-wise median (Yin et al., ICML 2018, Definition 1).

    :math:`x_j = \mathrm{med}\{y_{1,j}, \dots, y_{n,j}\}` for every coordinate j; for even n the
    mean of the two middle values (``np.median``). Tolerates up to :math:`\lceil n/2\rceil - 1`
    arbitrary updates per coordinate.

    Parameters
    ----------
    updates : sequence of dict[str, np.ndarray]
        Client models y_k, same keys (same order), shapes and dtypes; float arrays finite.

    Returns
    -------
    dict[str, np.ndarray]
        The median, keys and dtypes of ``updates[0]``. Integer and bool arrays: the element-wise
        majority of all updates (ties to the smallest value).
    """
    _check_updates(updates)
    return _combine(updates, lambda s: np.median(s, axis=0), range(len(updates)))


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], beta: float) -> Arrays:
    r"""Coordinate-wise beta-trimmed mean (Yin et al., ICML 2018, Definition 2).

    For every coordinate j, sort :math:`y_{1,j}, \dots, y_{n,j}`, drop the
    :math:`b = \lfloor \beta n\rfloor` largest and b smallest, and average the remaining
    :math:`n - 2b`:
    :math:`x_j = \frac{1}{n-2b}\sum_{i=b+1}^{n-b} y_{(i),j}`. Tolerates b arbitrary updates.
    The paper takes :math:`\beta n` to be an integer; the floor is ``scipy.stats.trim_mean``'s.

    Parameters
    ----------
    updates : sequence of dict[str, np.ndarray]
        Client models y_k, same keys (same order), shapes and dtypes; float arrays finite.
    beta : float
        Fraction trimmed at each end, :math:`0 \le \beta < 1/2` (0 is the plain mean).

    Returns
    -------
    dict[str, np.ndarray]
        The trimmed mean, keys and dtypes of ``updates[0]``. Integer and bool arrays: the
        element-wise majority of all updates (ties to the smallest value).

    Raises
    ------
    ValueError
        If ``beta`` is outside [0, 1/2) or the updates are malformed.
    """
    if not (isinstance(beta, Real) and 0.0 <= float(beta) < 0.5):
        raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
    _check_updates(updates)
    n = len(updates)
    b = math.floor(float(beta) * n)

    def stat(s: np.ndarray) -> np.ndarray:
        return np.sort(s, axis=0)[b : n - b].mean(axis=0)

    return _combine(updates, stat, range(n))


# --- Krum and multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018) ------------------------


def _check_krum(n: int, num_byzantine: int) -> None:
    if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, Integral):
        raise ValueError(f"num_byzantine must be an int, got {num_byzantine!r}")
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
    if not n > 2 * num_byzantine + 2:
        raise ValueError(
            f"Krum needs n > 2 * num_byzantine + 2 updates, "
            f"got n={n}, num_byzantine={num_byzantine}"
        )


def pairwise_sq_distances(updates: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    r"""[n, n] float64 matrix of :math:`\lVert y_i - y_j\rVert_2^2` over the float arrays.

    Differences are formed directly (not via :math:`\lVert a\rVert^2 + \lVert b\rVert^2 -
    2\langle a, b\rangle`, which cancels catastrophically next to a huge update). Finite for
    float32/float16 inputs; a float64 difference beyond the float64 range gives inf, never NaN.
    """
    _check_updates(updates)
    n = len(updates)
    d2 = np.zeros((n, n), dtype=np.float64)
    keys = [k for k, a in updates[0].items() if is_float(a)]
    with np.errstate(over="ignore"):
        for i in range(n):
            for j in range(i + 1, n):
                total = 0.0
                for key in keys:
                    diff = np.asarray(updates[i][key], np.float64) - updates[j][key]
                    total += float(np.sum(np.square(diff)))
                d2[i, j] = d2[j, i] = total
    return d2


def krum_scores(updates: Sequence[Mapping[str, np.ndarray]], num_byzantine: int) -> np.ndarray:
    r"""Krum scores (Blanchard et al., NeurIPS 2017, Sec. 4).

    :math:`s(i) = \sum_{i \to j} \lVert y_i - y_j\rVert_2^2`, where :math:`i \to j` ranges over
    the :math:`n - f - 2` updates closest to :math:`y_i` (f = ``num_byzantine``). Krum picks the
    update of lowest score; it needs :math:`n > 2f + 2`. Computed over the float arrays.

    Parameters
    ----------
    updates : sequence of dict[str, np.ndarray]
        Client models y_k (distances between models equal distances between their deltas).
    num_byzantine : int
        f, the number of arbitrary (Byzantine) updates tolerated.

    Returns
    -------
    np.ndarray
        [n] float64 scores, lower is more central.

    Raises
    ------
    ValueError
        If ``num_byzantine`` is negative or not an int, or :math:`n \le 2f + 2`.
    """
    _check_krum(len(updates), num_byzantine)
    d2 = pairwise_sq_distances(updates)
    n = len(updates)
    closest = n - num_byzantine - 2
    # Row i without its own zero distance, ascending: the n - f - 2 nearest neighbours of y_i.
    others = np.sort(d2[~np.eye(n, dtype=bool)].reshape(n, n - 1), axis=1)
    return others[:, :closest].sum(axis=1)


def multi_krum_selection(scores: Sequence[float] | np.ndarray, m: int) -> list[int]:
    """Indices of the ``m`` lowest Krum scores, ascending score; ties go to the lower index."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    return [int(i) for i in order[:m]]


def multi_krum(updates: Sequence[Mapping[str, np.ndarray]], num_byzantine: int, m: int) -> Arrays:
    r"""Multi-Krum: the mean of the m best-scored updates (Blanchard et al., NeurIPS 2017,
    Sec. 5; El Mhamdi et al., ICML 2018, Sec. 3).

    :math:`x = \frac{1}{m}\sum_{i \in S_m} y_i`, with :math:`S_m` the m updates of lowest
    :func:`krum_scores`. ``m = 1`` is Krum; ``m = n - f`` averages every update that may be
    honest.

    Parameters
    ----------
    updates : sequence of dict[str, np.ndarray]
        Client models y_k, same keys (same order), shapes and dtypes; float arrays finite.
    num_byzantine : int
        f; needs :math:`n > 2f + 2`.
    m : int
        How many updates to average, :math:`1 \le m \le n - f`.

    Returns
    -------
    dict[str, np.ndarray]
        The uniform mean of the selected updates, keys and dtypes of ``updates[0]``. Integer and
        bool arrays: the element-wise majority of the selected updates (ties to the smallest
        value).

    Raises
    ------
    ValueError
        If ``num_byzantine`` or ``m`` is out of range or the updates are malformed.
    """
    n = len(updates)
    _check_krum(n, num_byzantine)
    if isinstance(m, bool) or not isinstance(m, Integral) or not 1 <= m <= n - num_byzantine:
        raise ValueError(
            f"m must be an int in [1, n - num_byzantine] = [1, {n - num_byzantine}], got {m!r}"
        )
    keep = multi_krum_selection(krum_scores(updates, num_byzantine), int(m))
    return _combine(updates, lambda s: s[keep].mean(axis=0), keep)


# --- norms: clipping and outliers ---------------------------------------------------------------


def _check_factor(factor: float, name: str = "factor") -> float:
    if not (isinstance(factor, Real) and math.isfinite(float(factor)) and float(factor) >= 1.0):
        raise ValueError(f"{name} must be a finite number >= 1, got {factor!r}")
    return float(factor)


def global_norm(arrays: Mapping[str, np.ndarray]) -> float:
    r""":math:`\lVert a\rVert_2` over all entries of all float arrays (integer arrays ignored).

    Scaled by the largest entry before squaring, so a finite input has a finite norm unless the
    norm itself exceeds the float64 range (impossible for float32 arrays below ~1e300 entries).
    """
    _check_arrays("arrays", arrays)
    scale, rest = _scaled_norm([a for a in arrays.values() if is_float(a)])
    return scale * rest


def clip_to_norm(delta: Mapping[str, np.ndarray], max_norm: float) -> Arrays:
    r"""Server-side norm clipping of an update delta (Sun et al. 2019, "norm bounding").

    :math:`\Delta \leftarrow \Delta \cdot \min\!\left(1, \frac{C}{\lVert\Delta\rVert_2}\right)`,
    with :math:`\Delta = y_k - x` and :math:`\lVert\cdot\rVert_2` the global L2 norm over all
    float arrays; the clipped model is :math:`x + \Delta`. The factor is formed from the scaled
    norm (:func:`global_norm`), so a 1e30 delta is clipped to norm C, not to zero or NaN.

    Parameters
    ----------
    delta : dict[str, np.ndarray]
        :math:`y_k - x`; float arrays finite.
    max_norm : float
        C > 0.

    Returns
    -------
    dict[str, np.ndarray]
        The clipped delta, same keys and dtypes; integer and bool arrays are copied unchanged.

    Raises
    ------
    ValueError
        If ``max_norm`` is not finite and positive, or ``delta`` holds non-finite values.
    """
    if not (isinstance(max_norm, Real) and math.isfinite(float(max_norm)) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    _check_arrays("delta", delta)
    scale, rest = _scaled_norm([a for a in delta.values() if is_float(a)])
    if scale * rest <= max_norm:
        return {k: a.copy() for k, a in delta.items()}
    factor = (float(max_norm) / rest) / scale  # = C / ||delta||, without forming ||delta||
    return {
        k: (np.asarray(a, np.float64) * factor).astype(a.dtype) if is_float(a) else a.copy()
        for k, a in delta.items()
    }


def update_norms(
    updates: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray]
) -> np.ndarray:
    r"""Global L2 norm of each update's change, :math:`\lVert y_k - x\rVert_2`, over float arrays.

    Differences are formed in float64 (finite for float32 inputs) and the norm is scaled
    (:func:`global_norm`).

    Parameters
    ----------
    updates : sequence of dict[str, np.ndarray]
        Client models y_k.
    reference : dict[str, np.ndarray]
        x, the model the clients started from; same layout.

    Returns
    -------
    np.ndarray
        [n] float64 norms.
    """
    _check_updates(updates, reference)
    keys = [k for k, a in reference.items() if is_float(a)]
    norms = []
    with np.errstate(over="ignore"):
        for u in updates:
            diffs = [np.asarray(u[k], np.float64) - reference[k] for k in keys]
            norms.append(math.prod(_scaled_norm(diffs)))
    return np.array(norms, dtype=np.float64)


def norm_outliers(norms: Sequence[float] | np.ndarray, factor: float) -> list[int]:
    r"""Indices k with :math:`\lVert \Delta_k\rVert > \text{factor} \cdot \mathrm{lmed}`.

    lmed is the LOWER median of the norms (the :math:`\lceil n/2\rceil`-th smallest), a value one
    honest majority controls: for n = 2 it is the smaller norm, so a single hostile site cannot
    drag the reference up even in a two-site round (the mean, or the usual median
    :math:`(a + b)/2`, would follow it to 1e30 / 2). Non-finite norms are always outliers. If the
    lower median is 0 (half the sites sent the model back unchanged), every site that moved is
    flagged.

    Parameters
    ----------
    norms : sequence of float
        :func:`update_norms`; non-negative.
    factor : float
        Tolerated ratio to the lower median, >= 1. With ``factor >= r``, updates whose norms are
        all within a ratio r of each other are never flagged.

    Returns
    -------
    list[int]
        Flagged indices, ascending (empty for no norms).
    """
    f = _check_factor(factor)
    values = [float(v) for v in norms]
    if any(v < 0 for v in values):
        raise ValueError(f"norms must be >= 0, got {values}")
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return list(range(len(values)))
    # Non-finite norms count as +inf when taking the median (they are the largest).
    ref = _lower_median([v if math.isfinite(v) else math.inf for v in values])
    return [k for k, v in enumerate(values) if not math.isfinite(v) or v > f * ref]


def cap_examples(num_examples: Sequence[int], factor: float) -> list[int]:
    r"""Cap each claimed example count at factor x the round's lower median.

    :math:`\tilde n_k = \min(n_k, \lfloor \text{factor}\cdot\mathrm{lmed}(n)\rfloor)`. FedAvg
    weighs site k by :math:`n_k / \sum n`, and :math:`n_k` is the site's own claim: one site
    claiming 1e12 examples would otherwise take the average over. The lower median (see
    :func:`norm_outliers`) is a count one honest majority controls, also with two sites.

    Parameters
    ----------
    num_examples : sequence of int
        Claimed counts, positive ints.
    factor : float
        Largest tolerated ratio to the lower median, >= 1.

    Returns
    -------
    list[int]
        Capped counts, same order.
    """
    f = _check_factor(factor)
    counts = list(num_examples)
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, Integral) or c <= 0:
            raise ValueError(f"num_examples must be positive ints, got {counts}")
    if not counts:
        return []
    ref = int(_lower_median([int(c) for c in counts]))
    cap = max(ref, math.floor(f * ref))
    return [min(int(c), cap) for c in counts]

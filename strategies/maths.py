"""Aggregation maths as pure functions: dicts of numpy arrays in, dicts of numpy arrays out.

Dicts map parameter names to arrays in ``state_dict`` order; outputs keep that order and each
array's dtype (float32 stays float32). Sums are accumulated in float64 (complex128) and cast
back once, so the result does not depend on float32 rounding of partial sums.

Papers: FedAvg (McMahan et al. 2017; Levac et al. 2023 eq. 10), FedOpt (Reddi et al. 2021,
"Adaptive Federated Optimization", Algorithm 2), Scaffold (Karimireddy et al. 2020, Algorithm 1;
Levac et al. 2023 Algorithm 1), FedProx (Li et al. 2020, eq. 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

Arrays = dict[str, np.ndarray]
FedOptKind = Literal["adam", "yogi", "adagrad"]
FEDOPT_KINDS: tuple[str, ...] = ("adam", "yogi", "adagrad")


def is_float(a: np.ndarray) -> bool:
    """Return True for real floating arrays: the ones optimisers and control variates touch."""
    return a.dtype.kind == "f"


def _normalized(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise ValueError(f"got {n} updates but {len(weights)} weights")
    if n == 0:
        raise ValueError("nothing to aggregate: no updates")
    w = [float(x) for x in weights]
    if not all(math.isfinite(x) and x > 0 for x in w):
        raise ValueError(f"weights must be finite and positive, got {w}")
    total = math.fsum(w)
    return [x / total for x in w]


def check_same_layout(updates: Sequence[Mapping[str, np.ndarray]]) -> None:
    shapes = _shapes(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        check_layout(i, u, shapes)


def _shapes(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: np.shape(a) for k, a in arrays.items()}


def check_layout(
    i: int, update: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """``update`` (the i-th) has the keys (same order) and ``shapes`` of update 0."""
    if list(update) != list(shapes):
        raise ValueError(f"update {i} has keys {list(update)}, update 0 has {list(shapes)}")
    for key, a in update.items():
        if a.shape != shapes[key]:
            raise ValueError(f"update {i}[{key!r}]: shape {a.shape} != {shapes[key]}")


class WeightedSum:
    r"""Running :math:`\sum_k w_k a_k` of same-layout dicts of arrays, fed one at a time.

    Each key is accumulated in float64 (complex128 for complex input, as the first update
    decides), starting from zeros and adding ``w_k a_k`` in the order :meth:`add` is called,
    so it holds one float64 copy of the layout and never an update; summing the same updates
    in the same order gives the same bits as a list-based sum. Keys, order and shapes must
    match the first update (or ``reference``, counted as update 0).
    """

    def __init__(self, reference: Mapping[str, np.ndarray] | None = None) -> None:
        self.count = 0
        self._shapes = None if reference is None else _shapes(reference)
        self._offset = 0 if reference is None else 1  # numbering in layout errors
        self._acc: Arrays = {}
        self.dtypes: dict[str, np.dtype] = {}  # of the first update: the cast-back dtypes

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """acc += weight * update (each key in the accumulator's dtype)."""
        if self._shapes is None:
            self._shapes = _shapes(update)
        check_layout(self.count + self._offset, update, self._shapes)
        if self.count == 0:
            for key, a in update.items():
                acc_dtype = np.complex128 if a.dtype.kind == "c" else np.float64
                self._acc[key] = np.zeros(a.shape, dtype=acc_dtype)
                self.dtypes[key] = a.dtype
        for key, a in update.items():
            acc = self._acc[key]
            term = np.array(a, dtype=acc.dtype)  # a copy, scaled in place: one temporary
            term *= weight
            acc += term
        self.count += 1

    def total(self) -> Arrays:
        """The float64 (complex128) sums."""
        return self._acc

    def cast(self) -> Arrays:
        """The sums cast back to the first update's dtypes (:func:`_cast_like`)."""
        return {key: _cast_like(acc, self.dtypes[key]) for key, acc in self._acc.items()}


def _cast_like(acc: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast an accumulator back; integer and bool arrays are rounded to the nearest integer."""
    if dtype.kind in "fc":
        return acc.astype(dtype)
    # Integer buffers (BatchNorm ``num_batches_tracked``) stay integer: round-half-even of the
    # weighted mean. With equal counters at every site this returns that counter exactly.
    return np.rint(acc.real).astype(dtype)


def fedavg(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
    r"""Weighted average of client models.

    :math:`x = \sum_k \frac{n_k}{n} y_k`, :math:`n = \sum_k n_k` (McMahan et al. 2017,
    Algorithm 1; Levac et al. 2023 eq. 10 is the equal-weight case).

    Parameters
    ----------
    updates : sequence of dict[str, np.ndarray]
        Client models y_k, all with the same keys (same order) and shapes. Iterated once, in
        order, one update at a time (:class:`WeightedSum`): a lazy sequence that loads each
        y_k on demand keeps one model in memory.
    weights : sequence of float
        Positive weights n_k (number of examples); normalised here.

    Returns
    -------
    dict[str, np.ndarray]
        The average, with the keys and dtypes of ``updates[0]``. Integer and bool arrays get
        the rounded weighted mean (``np.rint``), cast back to their dtype.
    """
    w = _normalized(weights, len(updates))
    total = WeightedSum()
    for k in range(len(updates)):  # by index: no loop variable keeps y_k while y_k+1 loads
        total.add(updates[k], w[k])
    return total.cast()


def fedopt_init(
    global_arrays: Mapping[str, np.ndarray], tau: float, v_init: float | None = None
) -> tuple[Arrays, Arrays]:
    r"""Initial FedOpt moments: :math:`m_{-1} = 0`, :math:`v_{-1} = \tau^2` (Reddi et al. Alg. 2).

    Only real floating arrays get moments; integer buffers are not optimised.

    Parameters
    ----------
    global_arrays : dict[str, np.ndarray]
        The initial global model x_0.
    tau : float
        Adaptivity constant; ``v_init`` defaults to ``tau**2`` (Alg. 2 asks v_{-1} >= tau^2).
    v_init : float, optional
        Override of the initial second moment (Flower's built-in FedOpt uses 0).

    Returns
    -------
    tuple[dict, dict]
        ``(m, v)`` with the dtypes of the global arrays.
    """
    v0 = tau**2 if v_init is None else v_init
    m = {k: np.zeros_like(a) for k, a in global_arrays.items() if is_float(a)}
    v = {k: np.full_like(a, v0) for k, a in global_arrays.items() if is_float(a)}
    return m, v


def fedopt_step(
    global_arrays: Mapping[str, np.ndarray],
    averaged: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray],
    v: Mapping[str, np.ndarray],
    *,
    kind: FedOptKind,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
    step: int | None = None,
) -> tuple[Arrays, Arrays, Arrays]:
    r"""One server step of FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, Algorithm 2).

    With :math:`\Delta_t = \bar y_t - x_t` (the averaged client change):

    - :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1)\Delta_t`
    - Adagrad: :math:`v_t = v_{t-1} + \Delta_t^2`
    - Yogi: :math:`v_t = v_{t-1} - (1-\beta_2)\Delta_t^2\,\mathrm{sign}(v_{t-1}-\Delta_t^2)`
    - Adam: :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2)\Delta_t^2`
    - :math:`x_{t+1} = x_t + \eta\, m_t / (\sqrt{v_t} + \tau)`

    Parameters
    ----------
    global_arrays : dict[str, np.ndarray]
        x_t, the model the clients started from.
    averaged : dict[str, np.ndarray]
        The weighted average of the client models (``fedavg``), same keys and dtypes.
    m, v : dict[str, np.ndarray]
        Moments from the previous step (``fedopt_init`` for the first); keys = float arrays.
    kind : {"adam", "yogi", "adagrad"}
        Which second-moment rule.
    eta, beta_1, beta_2, tau : float
        Server learning rate, moment decays, adaptivity constant.
    step : int, optional
        If given (1-based), scale eta by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` (Adam bias
        correction, Kingma & Ba; Flower's FedAdam applies it with t = round + 1). None (the
        default) follows Reddi et al. Algorithm 2, which has no bias correction.

    Returns
    -------
    tuple[dict, dict, dict]
        ``(x_{t+1}, m_t, v_t)``, dtypes kept. Arrays without moments (integer buffers) take
        their value from ``averaged``.
    """
    if kind not in FEDOPT_KINDS:
        raise ValueError(f"unknown FedOpt kind {kind!r}; valid: {', '.join(FEDOPT_KINDS)}")
    lr = eta
    if step is not None:
        lr = eta * math.sqrt(1.0 - beta_2**step) / (1.0 - beta_1**step)
    new_x: Arrays = {}
    new_m: Arrays = {}
    new_v: Arrays = {}
    for key, x in global_arrays.items():
        if key not in m:
            new_x[key] = np.array(averaged[key], dtype=x.dtype)
            continue
        delta = (averaged[key] - x).astype(x.dtype)
        delta_sq = delta * delta
        new_m[key] = (beta_1 * m[key] + (1.0 - beta_1) * delta).astype(x.dtype)
        if kind == "adam":
            v_t = beta_2 * v[key] + (1.0 - beta_2) * delta_sq
        elif kind == "yogi":
            v_t = v[key] - (1.0 - beta_2) * delta_sq * np.sign(v[key] - delta_sq)
        else:
            v_t = v[key] + delta_sq
        new_v[key] = v_t.astype(x.dtype)
        new_x[key] = (x + lr * new_m[key] / (np.sqrt(new_v[key]) + tau)).astype(x.dtype)
    return new_x, new_m, new_v


def scaffold_server_update(
    global_arrays: Mapping[str, np.ndarray],
    client_arrays: Sequence[Mapping[str, np.ndarray]],
    c_global: Mapping[str, np.ndarray],
    c_deltas: Sequence[Mapping[str, np.ndarray]],
    *,
    eta_g: float,
    num_clients: int,
    weights: Sequence[float] | None = None,
) -> tuple[Arrays, Arrays]:
    r"""Scaffold server step (Karimireddy et al. 2020, Alg. 1 lines 16-17; Levac et al. 2023 Alg. 1
    l. 9-10).

    - :math:`x \leftarrow x + \eta_g \frac{1}{|S|}\sum_{k\in S} \Delta y_k`,
      :math:`\Delta y_k = y_k - x` (uniform mean as in the paper; ``weights`` makes it
      a weighted mean instead)
    - :math:`c \leftarrow c + \frac{|S|}{N}\frac{1}{|S|}\sum_{k\in S} \Delta c_k` (always
      uniform: c estimates the mean of the N clients' c_k)

    Parameters
    ----------
    global_arrays : dict[str, np.ndarray]
        x, the model sent to the clients.
    client_arrays : sequence of dict
        The clients' trained models y_k (the server forms Delta y_k = y_k - x itself).
        Iterated once, one at a time (:class:`WeightedSum`), as is ``c_deltas``.
    c_global : dict[str, np.ndarray]
        c; its keys are the float arrays that carry control variates.
    c_deltas : sequence of dict
        Delta c_k, keyed like ``c_global``.
    eta_g : float
        Global step size; 1.0 makes the model update equal to FedAvg of the y_k.
    num_clients : int
        N, the number of clients in the federation (>= |S|).
    weights : sequence of float, optional
        Per-client weights for the model update (e.g. examples); None = uniform.

    Returns
    -------
    tuple[dict, dict]
        ``(x_new, c_new)``, dtypes kept. Integer buffers take the (rounded) mean of the y_k.
    """
    n = len(client_arrays)
    if len(c_deltas) != n:
        raise ValueError(f"got {n} client models but {len(c_deltas)} control deltas")
    if not 0 < n <= num_clients:
        raise ValueError(f"need 0 < |S| <= N, got |S|={n}, N={num_clients}")
    w = _normalized([1.0] * n if weights is None else weights, n)
    ys = WeightedSum(reference=global_arrays)  # one pass over each sequence, by index
    for k in range(n):
        ys.add(client_arrays[k], w[k])
    dcs = WeightedSum(reference=c_global)
    for k in range(n):
        dcs.add(c_deltas[k], 1.0 / n)  # uniform

    x_new: Arrays = {}
    for key, x in global_arrays.items():
        y_mean = ys.total()[key]
        if is_float(x):
            x64 = x.astype(np.float64)
            x_new[key] = (x64 + eta_g * (y_mean - x64)).astype(x.dtype)
        else:
            x_new[key] = _cast_like(y_mean, x.dtype)

    c_new = {
        key: (c.astype(np.float64) + (n / num_clients) * dcs.total()[key]).astype(c.dtype)
        for key, c in c_global.items()
    }
    return x_new, c_new


def scaffold_correction(
    grad: Mapping[str, Any], c_global: Mapping[str, Any], c_local: Mapping[str, Any]
) -> dict[str, Any]:
    r"""Corrected local gradient :math:`g_k(y) - c_k + c` (Karimireddy et al. Alg. 1 line 10).

    The client step is :math:`y \leftarrow y - \eta_l (g_k(y) - c_k + c)` (Levac et al. 2023 Alg. 1
    line 6). Works for numpy arrays and torch tensors alike (only ``+`` and ``-``); keys are
    those of ``grad``, which must all be in both control variates.
    """
    return {k: g - c_local[k] + c_global[k] for k, g in grad.items()}


def scaffold_client_control_update(
    option: str,
    *,
    c_local: Mapping[str, np.ndarray],
    c_global: Mapping[str, np.ndarray],
    x_global: Mapping[str, np.ndarray] | None = None,
    y_local: Mapping[str, np.ndarray] | None = None,
    local_steps: int | None = None,
    lr: float | None = None,
    grad_at_global: Mapping[str, np.ndarray] | None = None,
) -> tuple[Arrays, Arrays]:
    r"""New client control variate :math:`c_k^+` and :math:`\Delta c_k = c_k^+ - c_k`.

    Karimireddy et al. Alg. 1 line 12 (Levac et al. 2023 Alg. 1 line 7):

    - option (i): :math:`c_k^+ = g_k(x)`, a (large-batch) gradient of the local loss at the
      server model x, computed by the client and passed as ``grad_at_global``;
    - option (ii): :math:`c_k^+ = c_k - c + \frac{1}{K\eta_l}(x - y_k)`, with K local
      steps of plain SGD at step size eta_l (with another local optimiser it is an estimate).

    Parameters
    ----------
    option : {"i", "ii"}
        Which rule.
    c_local, c_global : dict[str, np.ndarray]
        c_k and c, same keys (the arrays that carry control variates).
    x_global, y_local : dict[str, np.ndarray], optional
        Option (ii): server model x and trained local model y_k (may hold extra keys).
    local_steps : int, optional
        Option (ii): K.
    lr : float, optional
        Option (ii): eta_l.
    grad_at_global : dict[str, np.ndarray], optional
        Option (i): g_k(x), keyed like ``c_local``.

    Returns
    -------
    tuple[dict, dict]
        ``(c_k^+, Delta c_k)`` in the dtypes of ``c_local``. The client keeps c_k^+ and sends
        Delta c_k as ``scaffold.c-delta``.
    """
    if option == "i":
        if grad_at_global is None:
            raise ValueError("scaffold option (i) needs grad_at_global = g_k(x)")
        c_new = {k: np.asarray(grad_at_global[k]).astype(c.dtype) for k, c in c_local.items()}
    elif option == "ii":
        if x_global is None or y_local is None or local_steps is None or lr is None:
            raise ValueError("scaffold option (ii) needs x_global, y_local, local_steps and lr")
        if local_steps <= 0 or lr <= 0:
            raise ValueError(f"need local_steps > 0 and lr > 0, got {local_steps}, {lr}")
        scale = 1.0 / (local_steps * lr)
        c_new = {
            k: (c - c_global[k] + scale * (x_global[k] - y_local[k])).astype(c.dtype)
            for k, c in c_local.items()
        }
    else:
        raise ValueError(f"unknown scaffold option {option!r}; valid: 'i', 'ii'")
    delta = {k: (c_new[k] - c).astype(c.dtype) for k, c in c_local.items()}
    return c_new, delta


def proximal_term(local: Mapping[str, Any], global_: Mapping[str, Any], mu: float) -> Any:
    r"""FedProx proximal term :math:`\frac{\mu}{2}\lVert w - w^t\rVert^2` (Li et al. 2020, eq. 2).

    The client minimises :math:`F_k(w) + \frac{\mu}{2}\lVert w - w^t\rVert^2`, with w^t the
    global model received this round. Sums over the keys of ``local`` (pass the trainable
    parameters only). Works for numpy arrays and torch tensors (differentiable in torch).
    """
    total = sum(((w - global_[k]) ** 2).sum() for k, w in local.items())
    return 0.5 * mu * total

"""Aggregation maths of federated architecture search: numpy in, numpy out.

Papers: GAutoMRI (GAutoMRI: Algorithm 1 and Eq. 8, search-phase aggregation of θ and α;
Algorithm 2 and Eq. 9-11, fairness-adjusted aggregation weights) and FedAutoMRI (FedAutoMRI Eq. 7,
client-side exponential moving average of the global weights).

Dict inputs map names to arrays (``SearchDenoiser.alpha_state()`` keys for α, ``state_dict``
keys for θ); outputs keep the keys, their order and each array's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from strategies.maths import fedavg

Arrays = dict[str, np.ndarray]
EmaForm = Literal["adam", "printed", "plain"]
EMA_FORMS: tuple[str, ...] = ("adam", "printed", "plain")


def aggregate_alpha(
    alphas: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[float]
) -> Arrays:
    r"""Search-phase aggregation of the architecture weights (GAutoMRI Eq. 8, Alg. 1 line 8).

    :math:`\alpha^{r+1} = \sum_{c=1}^{C} \frac{N_c}{N} \hat\alpha_c^r`, :math:`N = \sum_c N_c`,
    over *every* reply (the authors' public aggregator ends up keeping client 0's α only).
    θ is aggregated the same way (Eq. 8, second line): ``strategies.maths.fedavg``.

    Parameters
    ----------
    alphas : sequence of dict[str, np.ndarray]
        Each client's α after local search (``nas.alpha`` records), same keys and shapes.
    num_examples : sequence of float
        ``N_c``, the clients' numbers of training slices (positive).

    Returns
    -------
    dict[str, np.ndarray]
        The global α, dtypes of ``alphas[0]`` (accumulated in float64).
    """
    return fedavg(alphas, num_examples)


def fairness_init(num_clients: int) -> np.ndarray:
    """Initial fairness aggregation weights ``a_c^0 = 1 / C`` (GAutoMRI Algorithm 2, input)."""
    if num_clients < 1:
        raise ValueError(f"need at least one client, got {num_clients}")
    return np.full(num_clients, 1.0 / num_clients)


def risk_gap(global_loss: float, prev_local_loss: float | None) -> float:
    r"""Empirical risk gap (GAutoMRI Eq. 9).

    :math:`G_c = \ell_{D_c}(\theta^r) - \ell_{D_c}(\hat\theta_c^{r-1})`. Here ``global_loss``
    is the received global model's loss on the site's data, before local training, and
    ``prev_local_loss`` the loss of the site's own model at the end of its previous local
    training, on the same data. A site without a previous local model (its first round)
    reports 0, which leaves its weight unchanged (Eq. 10, first case).
    """
    if prev_local_loss is None:
        return 0.0
    gap = float(global_loss) - float(prev_local_loss)
    if not math.isfinite(gap):
        raise ValueError(f"non-finite risk gap from losses {global_loss!r}, {prev_local_loss!r}")
    return gap


def fairness_weights(
    prev_weights: Sequence[float] | np.ndarray,
    gaps: Sequence[float] | np.ndarray,
    gamma: float,
) -> np.ndarray:
    r"""Fairness-adjusted aggregation weights (GAutoMRI Eq. 10-11, Algorithm 2 line 8).

    .. math::

        \beta_c^r = a_c^{r-1} + \gamma \frac{G_c}{\max_{c'} G_{c'}} \text{ if } G_c > 0,
        \quad \beta_c^r = a_c^{r-1} \text{ otherwise}; \qquad
        a_c^r = \beta_c^r / \sum_{c'} \beta_{c'}^r

    The server then aggregates :math:`\theta^{r+1} = \sum_c a_c^r \hat\theta_c^r` (line 9; no
    :math:`N_c` factor) and keeps :math:`a^r` as strategy state for the next round. Edge cases:
    if no :math:`G_c` is positive the weights are returned unchanged (renormalised); a single
    positive gap gets exactly :math:`+\gamma` before renormalisation (its ratio to the max is 1).
    The authors' code carries the unnormalised :math:`\beta` into the next round; we follow the
    equations (Eq. 10 uses the normalised :math:`a^{r-1}`).

    Parameters
    ----------
    prev_weights : array-like, shape [C]
        :math:`a^{r-1}` (positive; :func:`fairness_init` for the first round), in client order.
    gaps : array-like, shape [C]
        :math:`G_c` (Eq. 9) reported by the same clients, same order.
    gamma : float
        Increment control :math:`\gamma \ge 0` (the public code's default: 0.01).

    Returns
    -------
    np.ndarray, shape [C], float64
        :math:`a^r`, positive and summing to 1.
    """
    a = np.asarray(prev_weights, dtype=np.float64)
    g = np.asarray(gaps, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"prev_weights must be a non-empty 1-D array, got shape {a.shape}")
    if g.shape != a.shape:
        raise ValueError(f"got {a.size} weights but gaps of shape {g.shape}")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"prev_weights must be finite and positive, got {a.tolist()}")
    if not np.all(np.isfinite(g)):
        raise ValueError(f"risk gaps must be finite, got {g.tolist()}")
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    beta = a.copy()
    positive = g > 0
    if positive.any():
        beta[positive] += gamma * g[positive] / g.max()
    return beta / math.fsum(beta)


def client_ema(
    state: Mapping[str, np.ndarray] | None,
    global_arrays: Mapping[str, np.ndarray],
    *,
    gamma: float,
    t: int,
    form: EmaForm = "adam",
) -> tuple[Arrays, Arrays]:
    r"""Client-side EMA of the global weights (FedAutoMRI Eq. 7).

    Printed: :math:`\omega_c^t = (\gamma\,\omega_c^{t-1} + (1-\gamma)\,\omega^t) / (1-\gamma^t)`,
    with :math:`\omega^t` the aggregated (global) weights of round t. The division by
    :math:`1-\gamma^t` is Adam's bias correction, which is only right for an average that
    starts at zero and is *not* fed back corrected. Fed back literally (``"printed"``) a
    constant :math:`\omega` comes out as :math:`\omega/(1-\gamma^2)` at t = 2 and keeps growing
    towards :math:`\omega/(1-\gamma)`. The forms:

    - ``"adam"`` (default, the reading we take as intended): keep
      :math:`m_t = \gamma m_{t-1} + (1-\gamma)\omega^t`, :math:`m_0 = 0`, use
      :math:`\omega_c^t = m_t / (1-\gamma^t)`; the state is :math:`m_t`. A constant sequence
      stays constant; at t = 1, :math:`\omega_c^1 = \omega^1`.
    - ``"printed"``: the formula with the previous *corrected* value fed back,
      :math:`\omega_c^0 = 0`; the state is :math:`\omega_c^t` (kept for comparison only).
    - ``"plain"``: :math:`\omega_c^t = \gamma\omega_c^{t-1} + (1-\gamma)\omega^t` without
      correction, for the reading where :math:`\omega_c^{t-1}` is the site's previous local
      model (pass it as ``state``); with no state, :math:`\omega_c^t = \omega^t`.

    Parameters
    ----------
    state : dict[str, np.ndarray] or None
        The site's EMA state from its previous call (None on its first).
    global_arrays : dict[str, np.ndarray]
        :math:`\omega^t`, the global model received this round.
    gamma : float
        Weighting coefficient in [0, 1).
    t : int
        1-based count of EMA updates at this site, this one included (the round number when
        the site takes part in every round). Keep it with the state.
    form : {"adam", "printed", "plain"}
        See above.

    Returns
    -------
    tuple[dict, dict]
        ``(new_state, omega_c_t)``: the state to keep at the site and the weights to use
        (load them as the local model), both with the dtypes of ``global_arrays``. Non-float
        arrays (integer buffers) are taken from ``global_arrays``.
    """
    if form not in EMA_FORMS:
        raise ValueError(f"unknown EMA form {form!r}; valid: {', '.join(EMA_FORMS)}")
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    if t < 1:
        raise ValueError(f"t must be >= 1, got {t}")
    if state is not None:
        missing = [k for k, a in global_arrays.items() if a.dtype.kind == "f" and k not in state]
        if missing:
            raise ValueError(f"EMA state lacks keys {missing}")
    correction = 1.0 - gamma**t
    new_state: Arrays = {}
    omega: Arrays = {}
    for key, w in global_arrays.items():
        if w.dtype.kind != "f":
            new_state[key] = np.array(w)
            omega[key] = np.array(w)
            continue
        w64 = np.asarray(w, dtype=np.float64)
        if state is None:
            prev = w64 if form == "plain" else np.zeros_like(w64)
        else:
            prev = np.asarray(state[key], dtype=np.float64)
            if prev.shape != w64.shape:
                raise ValueError(f"EMA state[{key!r}]: shape {prev.shape} != {w64.shape}")
        avg = gamma * prev + (1.0 - gamma) * w64
        if form == "adam":
            new_state[key] = avg.astype(w.dtype)
            omega[key] = (avg / correction).astype(w.dtype)
        elif form == "printed":
            omega[key] = (avg / correction).astype(w.dtype)
            new_state[key] = omega[key].copy()
        else:
            omega[key] = avg.astype(w.dtype)
            new_state[key] = omega[key].copy()
    return new_state, omega

"""Site-level differential privacy at the server (README "Privacy"): DP-FedAvg's clipped,
noised mean (McMahan et al. 2018, "Learning differentially private recurrent language models",
Alg. 1 with a fixed denominator n, the number of sites aggregated).

    x' = x + (1/n) sum_k clip(y_k - x, C) + N(0, (sigma C / n)^2 I)

with clip(v, C) = v min(1, C / ||v||) over all float arrays of a site together. Adding or
removing one site's data changes the sum by at most C, so each round is a Gaussian mechanism of
noise multiplier sigma on the whole contribution of a hospital (not sampled: every round counts,
``strategies`` states no sampling amplification). Pure numpy; the noise comes from the
operating system's randomness unless a generator is passed (tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from strategies import maths
from strategies.robust import clip_to_norm

Arrays = Mapping[str, np.ndarray]


def noise_std(clip: float, noise_multiplier: float, num_sites: int) -> float:
    """Standard deviation of the noise on the mean: sigma C / n."""
    if num_sites < 1:
        raise ValueError("no site to aggregate")
    return noise_multiplier * clip / num_sites


def dp_mean(
    ys: Sequence[Arrays],
    x: Arrays,
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """x + the mean of the clipped updates + Gaussian noise (module docstring).

    Non-float arrays (integer counters) are x's, unchanged. The result keeps x's dtypes.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    n = len(ys)
    keys = [k for k, a in x.items() if maths.is_float(a)]
    total = {k: np.zeros(np.shape(x[k]), np.float64) for k in keys}
    for y in ys:
        delta = clip_to_norm({k: np.asarray(y[k], np.float64) - x[k] for k in keys}, clip)
        for k in keys:
            total[k] += delta[k]
    std = noise_std(clip, noise_multiplier, n)
    rng = rng if rng is not None else np.random.default_rng()
    out = {k: np.asarray(v).copy() for k, v in x.items()}
    for k in keys:
        mean = total[k] / n
        if std > 0:
            mean = mean + rng.normal(0.0, std, size=mean.shape)
        out[k] = (np.asarray(x[k], np.float64) + mean).astype(x[k].dtype)
    return out

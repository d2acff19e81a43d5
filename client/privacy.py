"""A site's slice-level DP for one round (README "Privacy"): the DP-SGD settings of its local
training and the epsilon it reports, from the run config, its slice count and the round.

The site enforces its own budget: it refuses to train a round after which its epsilon would
exceed ``dp.epsilon-budget`` (the server stops the run before that round anyway).
"""

from __future__ import annotations

from typing import Any

from recon.config import RunConfig
from recon.train.privacy import DPSGD, epsilon, sample_rate, steps_per_round
from strategies.protocol import DP_EPSILON, DP_EPSILON_NEXT


class PrivacyBudgetExceeded(ValueError):
    """Training this round would take the site past ``dp.epsilon-budget``."""


def site_epsilon(cfg: RunConfig, num_slices: int, rounds: int) -> float:
    """Epsilon at ``dp.delta`` after ``rounds`` rounds of DP-SGD at a site with ``num_slices``
    training slices (every round counted: an upper bound for a site that skipped some)."""
    train = cfg.train.model_copy(update={"steps": cfg.local_steps or None})
    steps = rounds * steps_per_round(train, num_slices)
    rate = sample_rate(cfg.train.batch_size, num_slices)
    return epsilon(cfg.dp.noise_multiplier, rate, steps, cfg.dp.delta, cfg.dp.accountant)


def dp_round(
    cfg: RunConfig, num_slices: int, server_round: int
) -> tuple[DPSGD | None, dict[str, Any]]:
    """(DP-SGD settings or None, the reply's ``dp-*`` metrics) of round ``server_round``."""
    if not cfg.dp.enabled:
        return None, {}
    eps = site_epsilon(cfg, num_slices, server_round)
    budget = cfg.dp.epsilon_budget
    if budget and eps > budget:
        raise PrivacyBudgetExceeded(
            f"round {server_round} would take this site to epsilon {eps:.3g} > dp.epsilon-budget "
            f"{budget:g} (delta {cfg.dp.delta:g})"
        )
    dp = DPSGD(
        clip=cfg.dp.clip,
        noise_multiplier=cfg.dp.noise_multiplier,
        sample_rate=sample_rate(cfg.train.batch_size, num_slices),
    )
    metrics = {
        DP_EPSILON: eps,
        DP_EPSILON_NEXT: site_epsilon(cfg, num_slices, server_round + 1),
    }
    return dp, metrics


# Reply metrics computed on the training slices outside DP-SGD's accounting: not sent with DP.
TRAINING_LOSSES = ("train-loss", "train-final-loss")


def releasable(metrics: dict[str, Any], dp: DPSGD | None) -> dict[str, Any]:
    """``metrics`` without the training losses when the round trains with DP (``dp``): they are
    means over the training slices, which the accountant does not cover."""
    if dp is None:
        return metrics
    return {k: v for k, v in metrics.items() if k not in TRAINING_LOSSES}

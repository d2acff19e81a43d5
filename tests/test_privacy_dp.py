"""Differential privacy (README "Privacy"): DP-SGD at the sites, the accountant, site-level
clipping and noise at the server, the epsilon budget and resume, and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from inprocess import InProcessGrid
from test_app_support import tiny_config, tiny_sites

from client.app import app as client_app
from client.privacy import PrivacyBudgetExceeded, dp_round, site_epsilon
from recon.config import ConfigError, parse_run_config
from recon.data import SiteDataset
from recon.models import ModelConfig, build_model
from recon.train import TrainConfig
from recon.train.losses import get_loss
from recon.train.methods import local_train
from recon.train.privacy import DPSGD, _clip_into, epsilon, noise_for_epsilon, train_dp
from server import checkpoint
from server.app import run_federation
from server.privacy import budget_stop
from server.results import validate_results
from strategies import privacy as site_dp
from strategies.flower import build_strategy

TINY_MODEL = ModelConfig(num_unrolls=2, cg_iters=2, unet_chans=8)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tiny_sites(tmp_path_factory)


@pytest.fixture(scope="module")
def slices(root):
    return SiteDataset(root / "site0", split="train")


# --- the accountant -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(1.0, 0.1, 100), (0.8, 1 / 7, 60), (2.0, 0.01, 1000)]
)
def test_epsilon_matches_opacus(sigma, q, steps) -> None:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    alphas = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=alphas)
    expected, _ = get_privacy_spent(orders=alphas, rdp=rdp, delta=1e-5)
    assert epsilon(sigma, q, steps, 1e-5) == pytest.approx(expected, rel=1e-9)
    assert epsilon(sigma, q, 2 * steps, 1e-5) > epsilon(sigma, q, steps, 1e-5)
    assert epsilon(sigma, q, 0, 1e-5) == 0.0 and math.isinf(epsilon(0.0, q, steps, 1e-5))
    # the PRV accountant agrees roughly (it is tighter)
    prv = epsilon(sigma, q, steps, 1e-5, "prv")
    assert 0 < prv <= expected * 1.05


def test_noise_for_epsilon_inverts_epsilon() -> None:
    sigma = noise_for_epsilon(3.0, 0.1, 200, 1e-5)
    assert epsilon(sigma, 0.1, 200, 1e-5) <= 3.0 < epsilon(0.95 * sigma, 0.1, 200, 1e-5)


def test_site_epsilon_is_reproducible_from_the_config() -> None:
    cfg = parse_run_config(
        {
            "dp.enabled": True,
            "dp.noise-multiplier": 1.1,
            "train.local-steps": 7,
            "data.num-sites": 2,
        }
    )
    # round r: r x 7 steps at q = 1 / 10 (batch 1, 10 training slices)
    assert site_epsilon(cfg, 10, 3) == pytest.approx(epsilon(1.1, 0.1, 21, 1e-5))
    dp, metrics = dp_round(cfg, 10, 3)
    assert dp == DPSGD(clip=1.0, noise_multiplier=1.1, sample_rate=0.1)
    assert metrics == {
        "dp-epsilon": pytest.approx(epsilon(1.1, 0.1, 21, 1e-5)),
        "dp-epsilon-next": pytest.approx(epsilon(1.1, 0.1, 28, 1e-5)),
    }
    capped = parse_run_config({**cfg.flat(), "dp.epsilon-budget": metrics["dp-epsilon"] * 0.99})
    with pytest.raises(PrivacyBudgetExceeded, match="dp.epsilon-budget"):
        dp_round(capped, 10, 3)


# --- DP-SGD on the real model ---------------------------------------------------------------
def _grads(model, sample) -> None:
    from recon.data.sample import collate

    s = collate([sample])
    physics = s.physics()
    loss = get_loss("ssim")(model(s.kspace, physics), s, physics)
    model.zero_grad(set_to_none=True)
    loss.backward()


def test_clipping_bounds_each_slice_gradient_norm(slices) -> None:
    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = 1e-3  # far below the tiny MoDL's gradient norms: every slice is clipped
    for i in range(4):
        _grads(model, slices[i])
        total = [torch.zeros_like(p) for p in params]
        before, after = _clip_into(total, params, clip)
        norm = float(torch.linalg.vector_norm(torch.stack([t.norm() for t in total])))
        assert before > clip and after == pytest.approx(clip)
        assert norm == pytest.approx(clip, rel=1e-5)


class _Zero(torch.nn.Module):
    """A model whose loss has a zero gradient: each DP-SGD step's update is the noise only."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(20000))

    def forward(self, y, physics):
        return y * 0 + 0 * self.w.sum()


def test_noise_scale_matches_the_configuration(slices) -> None:
    model = _Zero()
    grads: list[torch.Tensor] = []

    def keep(m) -> None:
        grads.append(m.w.grad.detach().clone())
        m.w.grad.zero_()  # no step: only the gradient is measured

    from recon.train import TrainHooks

    cfg = TrainConfig(steps=3, loss="l2")
    dp = DPSGD(clip=0.5, noise_multiplier=1.3, sample_rate=0.2, noise_seed=1)
    train_dp("e2e", model, slices, cfg, dp, hooks=TrainHooks(after_backward=keep))  # type: ignore[arg-type]
    noise = torch.cat(grads).numpy()
    expected = 1.3 * 0.5 / (0.2 * len(slices))  # sigma C / (q N), the mean over q N slices
    assert noise.std() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)


@pytest.mark.parametrize("method", ["e2e", "checkpoint"])
def test_dp_training_runs_with_e2e_and_checkpoint(slices, method) -> None:
    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPSGD(clip=1.0, noise_multiplier=1.0, sample_rate=0.2, noise_seed=3)
    result = local_train(method, model, slices, TrainConfig(steps=3), progress=False, dp=dp)
    assert result.steps == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_checkpoint_gives_the_same_dp_update_as_e2e(slices) -> None:
    out = []
    for method in ("e2e", "checkpoint"):
        torch.manual_seed(0)
        model = build_model(TINY_MODEL)
        dp = DPSGD(clip=1.0, noise_multiplier=0.5, sample_rate=0.3, noise_seed=5)
        local_train(method, model, slices, TrainConfig(steps=2), progress=False, dp=dp)
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-6)


# --- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"train.method": "gleam", "model.shared": False}, "GLEAM trains each module greedily"),
        ({"train.method": "layerwise", "model.denoiser": "convex"}, "one convex block at a time"),
        ({"train.grad-clip": 1.0}, "dp.clip clips"),
        ({"dp.noise-multiplier": 0.0}, "adds no noise"),
        ({"scaffold.option": "i"}, "without clipping or noise"),
        ({"strategy.name": "fairfedavg"}, "risk gaps"),
    ],
)
def test_unsafe_dp_combinations_are_refused_with_a_reason(flat, match) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_run_config({"dp.enabled": True, **flat})


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"robust.aggregator": "median"}, "calibrated to the mean"),
        ({"robust.clip-norm": 2.0}, "replaces robust.clip-norm"),
        ({"strategy.name": "scaffold"}, "c-deltas"),
        ({"dp.site-clip": 0.0}, "needs dp.site-clip"),
    ],
)
def test_unsafe_site_level_combinations_are_refused(flat, match) -> None:
    base = {"strategy.name": "fedavg", "dp.site-clip": 1.0, "dp.site-noise-multiplier": 1.0}
    with pytest.raises(ConfigError, match=match):
        parse_run_config({**base, **flat})


def test_refusals_outside_the_config() -> None:
    with pytest.raises(ConfigError, match="secure aggregation is not available"):
        parse_run_config({"secagg.enabled": True})
    with pytest.raises(ConfigError, match="needs dp.enabled"):
        parse_run_config({"dp.epsilon-budget": 3.0})
    model = build_model(TINY_MODEL)
    dp = DPSGD(clip=1.0, noise_multiplier=1.0, sample_rate=0.5)
    with pytest.raises(ValueError, match="layer-wise training"):
        train_dp("layerwise", model, [], TrainConfig(steps=1), dp)  # type: ignore[arg-type]


# --- site-level DP at the server -------------------------------------------------------------
def test_site_level_mean_clips_and_noises() -> None:
    x: dict[str, np.ndarray] = {"w": np.zeros(4, np.float32), "n": np.array(3, np.int64)}
    ys = [{"w": np.array([3.0, 4, 0, 0], np.float32), "n": np.array(9)}, {"w": np.ones(4)}]
    out = site_dp.dp_mean(ys, x, clip=1.0, noise_multiplier=0.0)
    np.testing.assert_allclose(out["w"], (np.array([0.6, 0.8, 0, 0]) + 0.5) / 2, rtol=1e-6)
    assert out["w"].dtype == np.float32 and out["n"] == 3
    big = {"w": np.zeros(200_000, np.float32)}
    noisy = site_dp.dp_mean([big, big], big, 2.0, 1.5, np.random.default_rng(0))
    assert noisy["w"].std() == pytest.approx(site_dp.noise_std(2.0, 1.5, 2), rel=0.01)


def test_strategy_applies_site_level_dp_only_with_the_plain_mean() -> None:
    s = build_strategy("fedavg", site_clip=1.0, site_noise_multiplier=1.0)
    assert s.site_clip == 1.0
    with pytest.raises(ValueError, match="plain mean"):
        build_strategy("fedavg", site_clip=1.0, aggregator="median")


# --- federated runs ---------------------------------------------------------------------------
def _grid(flat, n=3) -> InProcessGrid:
    return InProcessGrid({10 + i: client_app for i in range(n)}, flat)


DP = {
    "strategy.name": "fedavg",
    "dp.enabled": True,
    "dp.noise-multiplier": 1.0,
    "train.local-steps": 3,
    "num-server-rounds": 3,
}


def _site_eps(root, rounds: int) -> dict[str, float]:
    """Each tiny site's epsilon after ``rounds`` rounds of 3 steps at q = 1 / N (batch 1)."""
    n = {f"site{k}": len(SiteDataset(root / f"site{k}", split="train")) for k in range(3)}
    return {s: epsilon(1.0, 1 / v, 3 * rounds, 1e-5) for s, v in n.items()}


def test_federated_dp_run_records_epsilon_and_stops_at_the_budget(root, tmp_path) -> None:
    eps = [_site_eps(root, r) for r in (1, 2, 3)]
    budget = (max(eps[0].values()) + max(eps[1].values())) / 2  # round 1 fits, 2 would not
    flat = tiny_config(root, tmp_path, {**DP, "dp.epsilon-budget": budget, "run.name": "b"})
    res = run_federation(_grid(flat), parse_run_config(flat))
    validate_results(res)
    assert res["status"] == "completed"
    assert [r["round"] for r in res["rounds"]] == [1]
    got = res["rounds"][0]["privacy"]
    assert got["epsilon"] == pytest.approx(eps[0]) and got["epsilon_next"] == pytest.approx(eps[1])
    # training losses are means over the training slices, outside the accounting: not sent
    assert all(math.isnan(m["loss"]) for m in res["rounds"][0]["train"].values())
    privacy = res["privacy"]
    worst = max(eps[1], key=lambda s: eps[1][s])
    assert f"round 2 would take {worst} to epsilon" in privacy["stopped"]
    assert privacy["slice_level"]["epsilon_max"] == pytest.approx(max(eps[0].values()))
    assert res["final"]["federated"]  # the model trained so far is still evaluated

    # resume: the privacy state (rounds done, epsilon so far) comes back from the checkpoint
    run_dir = tmp_path / "b"
    state = checkpoint.load(run_dir)
    assert state.round == 1 and state.rounds[-1]["privacy"]["epsilon"] == pytest.approx(eps[0])
    assert budget_stop(parse_run_config(flat), state.rounds) is not None
    resumed = {**flat, "run.resume": str(run_dir)}
    again = run_federation(_grid(resumed), parse_run_config(resumed))
    assert [r["round"] for r in again["rounds"]] == [1] and again["privacy"]["stopped"]


class Killed(Exception):
    pass


@pytest.mark.slow
def test_killed_dp_run_resumes_with_its_privacy_state(root, tmp_path) -> None:
    flat = tiny_config(root, tmp_path, {**DP, "run.name": "cut"})

    def kill_after_round_1(record) -> None:
        if record["round"] == 1:
            raise Killed

    with pytest.raises(Killed):
        run_federation(_grid(flat), parse_run_config(flat), after_round=kill_after_round_1)
    run_dir = tmp_path / "cut"
    resumed = {**flat, "run.resume": str(run_dir)}
    res = run_federation(_grid(resumed), parse_run_config(resumed))
    assert [r["round"] for r in res["rounds"]] == [1, 2, 3]
    for r in res["rounds"]:
        assert r["privacy"]["epsilon"] == pytest.approx(_site_eps(root, r["round"]))


def test_site_level_dp_run_records_its_epsilon(root, tmp_path) -> None:
    extra = {"strategy.name": "fedavg", "dp.site-clip": 0.5, "dp.site-noise-multiplier": 2.0}
    flat = tiny_config(root, tmp_path, {**extra, "train.local-steps": 2})
    res = run_federation(_grid(flat), parse_run_config(flat))
    assert res["status"] == "completed"
    eps = [r["privacy"]["site_level_epsilon"] for r in res["rounds"]]
    assert eps == pytest.approx([epsilon(2.0, 1.0, r, 1e-5) for r in (1, 2)])
    assert res["privacy"]["site_level"]["epsilon"] == pytest.approx(eps[-1])


def test_report_shows_epsilon_per_site_and_round() -> None:
    from fedunroll.report import privacy_table

    results = {
        "rounds": [
            {"round": 1, "privacy": {"delta": 1e-5, "epsilon": {"site0": 0.5, "site1": 0.7}}},
            {"round": 2, "privacy": {"delta": 1e-5, "epsilon": {"site0": 0.8, "site1": 1.1}}},
        ],
        "privacy": {
            "delta": 1e-5,
            "accountant": "rdp",
            "epsilon_budget": 1.2,
            "stopped": "privacy budget: round 3 would take site1 to epsilon 1.4",
            "slice_level": {"clip": 1.0, "noise_multiplier": 1.0, "sampling": "Poisson"},
        },
    }
    text = privacy_table(results)
    assert text is not None
    assert "| 2 | 0.8 | 1.1 |" in text and "stopped early" in text and "delta = 1e-05" in text
    assert privacy_table({"rounds": []}) is None

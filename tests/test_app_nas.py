"""Architecture search in the Flower app (issue 6): fairfedavg, client EMA, search phase.

Strategy maths with hand-built replies; federations in process (real ClientApps, no Ray) on
tiny sites (32 px, 4 coils, Nu = 2, NCG = 2, search net of 4 channels and 1 cell).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from inprocess import InProcessGrid
from test_app_support import tiny_config, tiny_sites

from client import nas as client_nas
from client.app import app as client_app
from recon.config import ConfigError, parse_run_config
from recon.nas import Genotype, build_from_genotype
from server import checkpoint
from server.app import run_federation
from strategies import nas_maths
from strategies.flower import build_strategy
from strategies.nas import FairFedAvg, NasSearch
from strategies.protocol import FAIR_REPORT, FAIR_RISK_GAP, NAS_ALPHA, to_numpy, to_record

GAMMA = 0.1


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tiny_sites(tmp_path_factory, 2)


def _model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 3), np.float32), "n": np.array(3, np.int64)}


def _fake(values: dict[int, float], gaps: dict[int, list[float]], n: dict[int, int], alphas=None):
    """Stand-in ClientApp: replies w = values[pid], gap of the round, N_c, optionally α."""

    def client(msg: Message, ctx: Context) -> Message:
        pid = int(ctx.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        metrics = {"num-examples": n[pid], "train-loss": 0.1}
        if msg.content["config"].get(FAIR_REPORT):
            metrics[FAIR_RISK_GAP] = gaps[pid][rnd - 1]
        arrays = {
            k: np.full_like(v, values[pid]) for k, v in to_numpy(msg.content["arrays"]).items()
        }
        content = RecordDict(
            {
                "arrays": to_record(arrays),
                "metrics": MetricRecord(metrics),
                "config": ConfigRecord({"site-id": f"site{pid}"}),
            }
        )
        if alphas is not None:
            content[NAS_ALPHA] = to_record(alphas[pid])
        return Message(content, reply_to=msg)

    return client


def _round(strategy, grid, arrays):
    msgs = list(strategy.configure_train(1, to_record(arrays), ConfigRecord({}), grid))
    new, _ = strategy.aggregate_train(1, grid.send_and_receive(msgs))
    return to_numpy(new)


# --- fairfedavg ---------------------------------------------------------------------------------
def test_fairfedavg_weights_follow_eq_10_11_and_resume() -> None:
    gaps = {0: [0.0, -0.1, 0.4], 1: [0.2, -0.3, 0.1]}
    fake = _fake({0: 1.0, 1: 3.0}, gaps, {0: 5, 1: 50})  # N_c must not matter
    grid = InProcessGrid({10: fake, 11: fake}, {})
    strat = build_strategy("fairfedavg", gamma=GAMMA)
    assert isinstance(strat, FairFedAvg)
    out = _round(strat, grid, _model())
    a1 = np.array([0.5, 0.5 + GAMMA]) / (1 + GAMMA)  # only site1 has G > 0: +gamma exactly
    np.testing.assert_allclose([strat.weights["site0"], strat.weights["site1"]], a1)
    np.testing.assert_allclose(out["w"], a1[0] * 1.0 + a1[1] * 3.0, rtol=1e-6)
    assert out["n"].dtype == np.int64

    _round(strat, grid, out)  # all G <= 0: unchanged
    np.testing.assert_allclose([strat.weights["site0"], strat.weights["site1"]], a1)

    saved = strat.state_dict()
    resumed = FairFedAvg(gamma=GAMMA)
    resumed.load_state_dict(saved)
    assert resumed.round == 2 and resumed.weights == strat.weights
    got = _round(resumed, grid, out)
    want = _round(strat, grid, out)
    np.testing.assert_allclose(got["w"], want["w"])
    beta = a1 + GAMMA * np.array([0.4, 0.1]) / 0.4
    np.testing.assert_allclose([strat.weights["site0"], strat.weights["site1"]], beta / beta.sum())


def test_fairfedavg_rejects_a_reply_without_the_gap() -> None:
    def no_gap(msg, ctx):
        msg.content["config"][FAIR_REPORT] = False  # the client "ignores" the request
        return _fake({0: 1.0, 1: 1.0}, {}, {0: 1, 1: 1})(msg, ctx)

    grid = InProcessGrid({10: no_gap, 11: no_gap}, {})
    strat = FairFedAvg(min_valid_replies=0)
    msgs = list(strat.configure_train(1, to_record(_model()), ConfigRecord({}), grid))
    strat.aggregate_train(1, grid.send_and_receive(msgs))
    assert len(strat.rejected) == 2 and all(FAIR_RISK_GAP in r.reason for r in strat.rejected)


def test_nas_search_aggregates_every_clients_alpha_by_num_examples() -> None:
    alphas = {
        0: {"alpha.0": np.ones((3, 8), np.float32)},
        1: {"alpha.0": np.full((3, 8), 5.0, np.float32)},
    }
    fake = _fake({0: 2.0, 1: 4.0}, {}, {0: 3, 1: 1}, alphas)
    grid = InProcessGrid({10: fake, 11: fake}, {})
    strat = NasSearch(alpha={"alpha.0": np.zeros((3, 8), np.float32)})
    out = _round(strat, grid, _model())
    np.testing.assert_allclose(strat.alpha["alpha.0"], (3 * 1.0 + 1 * 5.0) / 4)  # not client 0's
    np.testing.assert_allclose(out["w"], (3 * 2.0 + 1 * 4.0) / 4)
    resumed = NasSearch()
    resumed.load_state_dict(strat.state_dict())
    np.testing.assert_allclose(resumed.alpha["alpha.0"], strat.alpha["alpha.0"])


def test_fairfedavg_federation_in_process(root, tmp_path) -> None:
    flat = tiny_config(
        root,
        tmp_path,
        {"strategy.name": "fairfedavg", "fair.gamma": GAMMA, "train.local-steps": 3},
    )
    gaps: list[tuple[int, float]] = []

    def spy(msg, ctx):
        reply = client_app(msg, ctx)
        if msg.metadata.message_type == "train":
            rnd = int(msg.content["config"]["server-round"])
            gaps.append((rnd, float(reply.content["metrics"][FAIR_RISK_GAP])))
        return reply

    grid = InProcessGrid({10: spy, 11: spy}, flat)
    res = run_federation(grid, parse_run_config(flat))
    assert res["status"] == "completed" and [r["round"] for r in res["rounds"]] == [1, 2]
    assert [g for r, g in gaps if r == 1] == [0.0, 0.0]  # no previous local model yet
    assert all(g != 0.0 for r, g in gaps if r == 2)
    state = checkpoint.load(next(tmp_path.iterdir())).strategy
    weights = {k: float(v) for k, v in state.items() if k.startswith("fair.weights/")}
    assert set(weights) == {"fair.weights/site0", "fair.weights/site1"}
    assert sum(weights.values()) == pytest.approx(1.0)
    for ctx in grid.contexts.values():
        assert client_nas.FAIR_STATE not in ctx.state.config_records  # dropped at the end


# --- client EMA ---------------------------------------------------------------------------------
def test_apply_ema_matches_client_ema_and_resumes_from_disk(tmp_path) -> None:
    cfg = parse_run_config({"ema.enabled": True, "ema.gamma": 0.5})
    w1 = {"w": np.full(3, 2.0, np.float32), "n": np.array(1, np.int64)}
    w2 = {"w": np.full(3, 4.0, np.float32), "n": np.array(2, np.int64)}
    state = RecordDict()
    o1 = client_nas.apply_ema(state, tmp_path, "uid", 1, w1, cfg)
    np.testing.assert_allclose(o1["w"], 2.0)  # t = 1: the received weights
    o2 = client_nas.apply_ema(state, tmp_path, "uid", 2, w2, cfg)
    # m1 = 0.5*2 = 1; m2 = 0.5*1 + 0.5*4 = 2.5; omega = m2 / (1 - 0.25)
    np.testing.assert_allclose(o2["w"], 2.5 / 0.75, rtol=1e-6)
    assert o2["n"] == 2
    fresh = RecordDict()  # a restarted node: the disk copy of round 1 serves round 2 again
    o2b = client_nas.apply_ema(fresh, tmp_path, "uid", 2, w2, cfg)
    np.testing.assert_allclose(o2b["w"], o2["w"])
    ref, _ = nas_maths.client_ema(None, w1, gamma=0.5, t=1)
    _, want = nas_maths.client_ema(ref, w2, gamma=0.5, t=2)
    np.testing.assert_allclose(o2["w"], want["w"])


def test_ema_federation_in_process(root, tmp_path) -> None:
    flat = tiny_config(
        root,
        tmp_path,
        {"strategy.name": "fedavg", "ema.enabled": True, "ema.gamma": 0.5, "train.local-steps": 3},
    )
    seen: list[dict] = []

    def spy(msg, ctx):
        reply = client_app(msg, ctx)
        if msg.metadata.message_type == "train":
            seen.append(dict(ctx.state.config_records[client_nas.EMA_META]))
        return reply

    grid = InProcessGrid({10: spy, 11: spy}, flat)
    res = run_federation(grid, parse_run_config(flat))
    assert res["status"] == "completed"
    assert [m["t"] for m in seen] == [1, 1, 2, 2] and [m["round"] for m in seen] == [1, 1, 2, 2]
    assert not list(root.glob("site*/.fedunroll/*/ema.*"))  # dropped at the end of the run


# --- search phase -------------------------------------------------------------------------------
NAS = {
    "model.denoiser": "nas",
    "model.nas-channels": 4,
    "model.nas-cells": 1,
    "nas.search-rounds": 2,
    "nas.search-steps": 3,
    "nas.lr-alpha": 0.05,
    "num-server-rounds": 1,
    "train.local-steps": 2,
}


def test_search_then_train_in_process(root, tmp_path) -> None:
    flat = tiny_config(root, tmp_path, {**NAS, "run.name": "nas"})
    alphas: dict[int, dict[int, dict[str, np.ndarray]]] = {}
    sizes: dict[int, int] = {}

    def spy(msg, ctx):
        reply = client_app(msg, ctx)
        if msg.metadata.message_type == "train" and NAS_ALPHA in msg.content.array_records:
            rnd = int(msg.content["config"]["server-round"])
            alphas.setdefault(rnd, {})[ctx.node_id] = to_numpy(reply.content[NAS_ALPHA])
            sizes[ctx.node_id] = int(reply.content["metrics"]["num-examples"])
        return reply

    grid = InProcessGrid({10: spy, 11: spy}, flat)
    grid.contexts[11].run_config["data.max-train-slices"] = 4  # unequal N_c (10 vs 4)
    res = run_federation(grid, parse_run_config(flat))
    assert res["status"] == "completed"
    assert sizes == {10: 10, 11: 4}

    run_dir = tmp_path / "nas"
    summary = json.loads((run_dir / "search" / "search.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    final = {k: np.asarray(v) for k, v in summary["alpha"].items()}
    for k, v in final.items():  # Eq. 8 over both sites, weights N_c / N
        want = (10 * alphas[2][10][k] + 4 * alphas[2][11][k]) / 14
        np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-7)
        assert not np.allclose(alphas[2][10][k], alphas[2][11][k])

    def spread(a):  # distance of the op weights from uniform
        e = np.exp(a - a.max(-1, keepdims=True))
        return float(np.abs(e / e.sum(-1, keepdims=True) - 1 / a.shape[-1]).max())

    with np.load(run_dir / "search" / "alpha.npz") as z:
        assert set(z.files) == set(final)
    torch_model = __import__("recon.models", fromlist=["build_model"]).build_model(
        parse_run_config(flat).model
    )
    from recon.nas import alpha_state

    start = alpha_state(torch_model)
    assert max(spread(final[k]) for k in final) > 3 * max(spread(start[k]) for k in start)

    genotype = Genotype.load(run_dir / "genotype.json")
    assert all(len(node) == 2 for node in genotype.nodes)  # top-2 per node
    den = build_from_genotype(run_dir / "genotype.json")
    assert sum(p.numel() for p in den.parameters()) == res["model"]["num_parameters"] - 1  # + lam
    assert res["final"]["federated"].keys() == {"site0", "site1"}


def test_nas_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="model.denoiser"):
        parse_run_config({"nas.search-rounds": 1})
    with pytest.raises(ConfigError, match="nas-genotype"):
        parse_run_config({"model.denoiser": "nas"})


def test_training_phase_alone_from_a_genotype_file(root, tmp_path) -> None:
    from recon.nas import PUBLISHED

    path = Genotype(PUBLISHED.nodes, channels=4, num_cells=1).save(tmp_path / "g.json")
    flat = tiny_config(
        root,
        tmp_path / "out",
        {**NAS, "nas.search-rounds": 0, "model.nas-genotype": str(path), "run.name": "t"},
    )
    res = run_federation(
        InProcessGrid({10: client_app, 11: client_app}, flat), parse_run_config(flat)
    )
    assert res["status"] == "completed"
    den = build_from_genotype(path)
    assert res["model"]["num_parameters"] == sum(p.numel() for p in den.parameters()) + 1
    assert not (tmp_path / "out" / "t" / "search").exists()


def test_failed_search_still_writes_results(root, tmp_path) -> None:
    """A search that cannot go on (every site fails) leaves a results.json that says why."""
    from server import results

    flat = tiny_config(root, tmp_path, {**NAS, "run.name": "nas-fail", "round-timeout": 20})

    def broken(msg, ctx):
        raise RuntimeError("scanner archive offline")

    grid = InProcessGrid({10: broken, 11: broken}, flat)
    with pytest.raises(Exception, match="replied|replies|site"):
        run_federation(grid, parse_run_config(flat))
    data = results.read(tmp_path / "nas-fail")
    assert data["status"].startswith("failed: architecture search: ")
    assert data["rounds"] == [] and "model" not in data


def test_client_ema_files_resume_prune_and_forget(tmp_path) -> None:
    """The EMA's round-tagged files (client.state.RoundFiles): a fresh process state resumes
    from disk, older rounds are pruned, and a finished run leaves no folder behind."""
    from flwr.app import RecordDict

    cfg = parse_run_config({"ema.enabled": True})
    w = {"w": np.ones((2, 2), np.float32)}
    state = RecordDict()
    for rnd in (1, 2, 3):
        client_nas.apply_ema(state, tmp_path, "run-x", rnd, {"w": w["w"] * rnd}, cfg)
    folder = tmp_path / ".fedunroll" / "run-x"
    assert sorted(p.name for p in folder.iterdir()) == ["ema.r000002.npz", "ema.r000003.npz"]
    fresh = client_nas.apply_ema(RecordDict(), tmp_path, "run-x", 4, {"w": w["w"] * 4}, cfg)
    again = client_nas.apply_ema(state, tmp_path, "run-x", 4, {"w": w["w"] * 4}, cfg)
    np.testing.assert_array_equal(fresh["w"], again["w"])  # disk == in-memory state
    client_nas.forget_nas_state(state, tmp_path, "run-x")
    assert not (tmp_path / ".fedunroll").exists()

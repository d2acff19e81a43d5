"""The ServerApp's round loop end to end, in process (real ClientApps, no Ray).

Every strategy federates 3 tiny non-IID sites and must beat zero-filled on each of them;
failing clients are excluded with a reason; too few replies stop the run with a clear error;
a run killed after round k resumes to the same final arrays.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from inprocess import InProcessGrid
from test_app_support import tiny_config, tiny_sites

from client.app import app as client_app
from recon.config import parse_run_config
from server import checkpoint
from server.app import run_federation
from server.federation import NodesUnavailable
from server.results import read, validate_results
from strategies.flower import NotEnoughReplies
from strategies.protocol import SITE_QUERY, to_numpy, to_record

STRATEGIES = ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tiny_sites(tmp_path_factory)


def _grid(flat, clients=None, n=3) -> InProcessGrid:
    return InProcessGrid(clients or {10 + i: client_app for i in range(n)}, flat)


def _final_arrays(run_dir) -> dict[str, np.ndarray]:
    ckpt = torch.load(run_dir / "final_model.pt", weights_only=True)
    return {k: v.numpy() for k, v in ckpt["state_dict"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_beats_zero_filled_on_every_site(root, tmp_path, strategy) -> None:
    flat = tiny_config(root, tmp_path, {"strategy.name": strategy, "num-server-rounds": 3})
    if strategy in ("fedadam", "fedyogi", "fedadagrad"):
        flat["fedopt.eta"] = 3e-3
    res = run_federation(_grid(flat), parse_run_config(flat))
    assert res["status"] == "completed"
    validate_results(res)
    assert res == read(next(tmp_path.iterdir()))  # what was written is what was returned
    assert res["sites"] == ["site0", "site1", "site2"]
    assert [r["round"] for r in res["rounds"]] == [1, 2, 3]
    fed, zf = res["final"]["federated"], res["final"]["zero_filled"]
    for site in res["sites"]:
        assert fed[site]["ssim"] > zf[site]["ssim"], (site, fed[site], zf[site])
        assert fed[site]["psnr"] > zf[site]["psnr"], (site, fed[site], zf[site])
    model_bytes = res["model"]["bytes"]
    per_msg = model_bytes * (2 if strategy == "scaffold" else 1)  # c travels with x
    # record sizes: the arrays plus a little metadata (names, dtypes, shapes)
    sent, received = res["rounds"][0]["bytes_sent"], res["rounds"][0]["bytes_received"]
    assert sent == pytest.approx(3 * per_msg + 3 * model_bytes, rel=0.02)  # train + evaluate
    assert received == pytest.approx(3 * per_msg, rel=0.02)
    for r in res["rounds"]:
        assert set(r["train"]) == set(r["eval"]) == set(res["sites"]) and not r["rejected"]
    uid = checkpoint.load(next(tmp_path.iterdir())).run_uid
    assert not list(root.glob(f"site*/.fedunroll/{uid}"))  # sites dropped the run's c_k files


# --- robustness ---------------------------------------------------------------------------------
def _fake(kind: str = "ok"):
    """A fast stand-in ClientApp: echoes the model (``ok``), raises, sends NaN or never replies."""

    def client(msg: Message, ctx: Context) -> Message | None:
        site = f"site{ctx.node_config['partition-id']}"
        if kind == "raise":
            raise RuntimeError(f"{site}: disk on fire")
        if kind == "silent":
            return None
        metrics = {"num-examples": 4, "ssim": 0.5, "nrmse": 0.3, "psnr": 20.0}
        if msg.metadata.message_type == "train":
            metrics["train-loss"] = 0.5
        else:  # the protocol declares zero-filled metrics in evaluate replies only
            metrics.update({"zf-ssim": 0.4, "zf-nrmse": 0.4, "zf-psnr": 18.0})
        content = RecordDict(
            {"metrics": MetricRecord(metrics), "config": ConfigRecord({"site-id": site})}
        )
        if msg.metadata.message_type == "train":
            arrays = to_numpy(msg.content["arrays"])
            if kind == "nan":
                arrays = {k: np.full_like(v, np.nan) for k, v in arrays.items()}
            content["arrays"] = to_record(arrays)
        return Message(content, reply_to=msg)

    return client


def test_bad_clients_are_excluded_with_reason_and_round_proceeds(root, tmp_path) -> None:
    flat = tiny_config(root, tmp_path, {"strategy.name": "fedavg", "min-fit-clients": 1})
    clients = {10: _fake("raise"), 11: _fake("nan"), 12: _fake("ok")}
    res = run_federation(_grid(flat, clients), parse_run_config(flat))
    assert res["status"] == "completed"
    for r in res["rounds"]:
        assert list(r["train"]) == ["site2"]
        reasons = {
            x["site"]: x["reason"] for x in r["rejected"] if not x["reason"].startswith("evaluate")
        }
        # the error's text never leaves the reply (it may name files): its kind only
        assert reasons["node-10"] == "client error: unrecognised"
        assert "non-finite" in reasons["site1"]


def test_silent_client_is_excluded_after_the_round_timeout(root, tmp_path) -> None:
    flat = tiny_config(root, tmp_path, {"strategy.name": "fedavg", "min-fit-clients": 2})
    clients = {10: _fake("ok"), 11: _fake("silent"), 12: _fake("ok")}
    res = run_federation(_grid(flat, clients), parse_run_config(flat))
    assert res["status"] == "completed"
    assert any("no reply within round-timeout" in x["reason"] for x in res["rounds"][0]["rejected"])
    assert sorted(res["rounds"][0]["train"]) == ["site0", "site2"]


def test_too_few_replies_stop_the_run_with_a_clear_error(root, tmp_path) -> None:
    flat = tiny_config(root, tmp_path, {"strategy.name": "fedavg", "min-fit-clients": 2})
    clients = {10: _fake("raise"), 11: _fake("nan"), 12: _fake("ok")}
    with pytest.raises(NotEnoughReplies, match="1 valid train replies, need 2"):
        run_federation(_grid(flat, clients), parse_run_config(flat))
    data = json.loads(next(tmp_path.iterdir()).joinpath("results.json").read_text())
    assert data["status"].startswith("failed: NotEnoughReplies")
    assert "node-10: client error: unrecognised" in data["status"]


def test_waiting_for_nodes_is_bounded(root, tmp_path) -> None:
    flat = tiny_config(root, tmp_path, {"min-available-clients": 3, "node-wait-timeout": 1.0})
    with pytest.raises(NodesUnavailable, match="only 2 node"):
        run_federation(_grid(flat, {10: _fake(), 11: _fake()}), parse_run_config(flat))


# --- checkpoint / resume ------------------------------------------------------------------------
class Killed(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["scaffold", "fedadam"])
def test_killed_run_resumes_to_the_same_final_arrays(root, tmp_path, strategy) -> None:
    base = {"strategy.name": strategy, "num-server-rounds": 3, "train.local-steps": 4}
    full = tiny_config(root, tmp_path / "full", {**base, "run.name": "full"})
    run_federation(_grid(full), parse_run_config(full))
    expected = _final_arrays(tmp_path / "full" / "full")

    cut = tiny_config(root, tmp_path / "cut", {**base, "run.name": "cut"})

    def kill_after_round_1(record):
        if record["round"] == 1:
            raise Killed

    with pytest.raises(Killed):
        run_federation(_grid(cut), parse_run_config(cut), after_round=kill_after_round_1)
    run_dir = tmp_path / "cut" / "cut"
    assert checkpoint.load(run_dir).round == 1
    resumed = {**cut, "run.resume": str(run_dir)}
    res = run_federation(_grid(resumed), parse_run_config(resumed))  # new contexts: a new run
    assert res["status"] == "completed" and [r["round"] for r in res["rounds"]] == [1, 2, 3]
    got = _final_arrays(run_dir)
    assert list(got) == list(expected)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_resume_refuses_a_changed_config(root, tmp_path) -> None:
    flat = tiny_config(root, tmp_path, {"strategy.name": "fedavg", "run.name": "r"})
    clients = {10: _fake(), 11: _fake(), 12: _fake()}
    run_federation(_grid(flat, clients), parse_run_config(flat))
    changed = {**flat, "run.resume": str(tmp_path / "r"), "train.lr": 0.1}
    with pytest.raises(ValueError, match="train.lr"):
        run_federation(_grid(changed, clients), parse_run_config(changed))
    again = {**flat}
    with pytest.raises(FileExistsError):
        run_federation(_grid(again, clients), parse_run_config(again))


def test_superlink_error_reply_for_a_dead_node_names_its_site_once(root, tmp_path) -> None:
    """The SuperLink answers for a dead node with src_node_id = its own id (1); the reply is
    attributed through reply_to_message_id to the node the message went to."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    ok = _fake("ok")
    calls = {"n": 0}

    def dies_after_round_1(msg: Message, ctx: Context) -> Message:
        if msg.metadata.message_type == SITE_QUERY:  # before round 1: which site is this node
            return ok(msg, ctx)
        calls["n"] += 1
        if calls["n"] <= 2:  # round 1: train + evaluate
            return ok(msg, ctx)
        reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable"), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = 1  # what linkstate does
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id != ""
        return reply

    flat = tiny_config(root, tmp_path, {"strategy.name": "fedavg", "min-fit-clients": 2})
    clients = {10: _fake("ok"), 11: dies_after_round_1, 12: _fake("ok")}
    res = run_federation(_grid(flat, clients), parse_run_config(flat))
    assert res["status"] == "completed"
    assert res["rounds"][0]["rejected"] == []
    rejected = res["rounds"][1]["rejected"]
    train = [x for x in rejected if not x["reason"].startswith("evaluate")]
    assert [x["site"] for x in train] == ["site1"], rejected
    assert "Node Unavailable" in train[0]["reason"]
    evaluate = [x for x in rejected if x["reason"].startswith("evaluate")]
    assert [x["site"] for x in evaluate] == ["site1"], rejected
    assert not any("node-1" in x["site"] or "round-timeout" in x["reason"] for x in rejected)
    assert sorted(res["rounds"][1]["train"]) == ["site0", "site2"]

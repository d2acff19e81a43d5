"""Hostile and broken sites: a ClientApp written from the protocol alone (``tests/hostile.py``)
next to two honest sites of the project's own, in process.

Every fault must leave the run completed, its reason recorded under the right site, the final
model finite and better than zero-filled at the honest sites, and nothing of the bad reply in
the run directory (``results.json``, ``checkpoint.pt``, ``final_model.pt``) or the logs.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hostile import MARKER, MARKER_VALUE, make
from hostile import client as hostile_client
from inprocess import InProcessGrid, set_task_identity
from test_app_support import tiny_config, tiny_sites

from client.app import app as client_app
from recon.config import ConfigError, parse_run_config
from server import checkpoint
from server.app import run_federation
from server.grid import TrainingGrid
from server.personalize import personalization_phase
from server.results import validate_results
from strategies.flower import FedAvg, SiteNames, build_strategy
from strategies.protocol import (
    EVALUATE_SCHEMA,
    FINAL_SCHEMA,
    MAX_REASON,
    PERSONALIZE_SCHEMA,
    QUERY_SCHEMA,
    SEARCH_SCHEMA,
    TRAIN_SCHEMA,
    ReplyError,
    check_content,
    error_kind,
    site_claim,
    to_record,
)

HONEST = ("site0", "site1")
HOSTILE_NODE = 12


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sites(tmp_path_factory)  # the 3 tiny sites test_app_federation uses


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


def _run(
    root: Path, tmp_path: Path, fault: str, overrides: dict[str, Any] | None = None, **node: Any
) -> tuple[dict[str, Any], Path]:
    """Two honest sites (nodes 10, 11) and the hostile one (node 12) with ``fault``."""
    base = {"strategy.name": "fedavg", "min-fit-clients": 2, "run.name": "r"}
    flat = tiny_config(root, tmp_path, {**base, **(overrides or {})})
    clients = {10: client_app, 11: client_app, HOSTILE_NODE: hostile_client}
    nodes = {nid: {"partition-id": i, "num-partitions": 3} for i, nid in enumerate(clients)}
    nodes[HOSTILE_NODE].update({"fault": fault, **node})
    res = run_federation(InProcessGrid(clients, flat, nodes), parse_run_config(flat))
    return res, tmp_path / "r"


def _rejected(res: dict[str, Any]) -> list[tuple[int, str, str]]:
    return [(r["round"], x["site"], x["reason"]) for r in res["rounds"] for x in r["rejected"]]


def _honest_run_is_intact(res: dict[str, Any], run_dir: Path, caplog: Any) -> None:
    """Completed; final model written and finite; honest sites beat zero-filled; no trace."""
    assert res["status"] == "completed", res["status"]
    validate_results(res)
    state = torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    fed, zf = res["final"]["federated"], res["final"]["zero_filled"]
    for site in HONEST:
        assert fed[site]["psnr"] > zf[site]["psnr"], (site, fed[site], zf[site])
    _no_trace(run_dir, caplog)


def _no_trace(run_dir: Path, caplog: Any) -> None:
    """Neither MARKER nor MARKER_VALUE (as text or as float64/float32 bytes) was kept."""
    needles = [
        MARKER.encode(),
        repr(MARKER_VALUE).encode(),
        struct.pack(">d", MARKER_VALUE),  # pickle's BINFLOAT
        struct.pack("<d", MARKER_VALUE),  # numpy float64
        struct.pack("<f", MARKER_VALUE),  # numpy float32
    ]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"results.json", "checkpoint.pt", "final_model.pt"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, (path.name, needle[:20])
    assert MARKER not in caplog.text and repr(MARKER_VALUE) not in caplog.text
    assert max(map(len, caplog.text.splitlines()), default=0) < 4 * MAX_REASON


# --- one test per failure -------------------------------------------------------------------
def test_list_valued_train_metric_is_rejected(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "list-metric")
    rejected = _rejected(res)
    assert [(r, s) for r, s, _ in rejected] == [(1, "hostile"), (2, "hostile")]
    assert all("'train-loss'" in why and "list" in why for *_, why in rejected)
    _honest_run_is_intact(res, run_dir, caplog)


def test_evaluate_reply_without_psnr_is_rejected(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "missing-psnr")
    assert _rejected(res) == [(r, "hostile", "evaluate: metrics: missing 'psnr'") for r in (1, 2)]
    assert "hostile" not in res["final"]["federated"]
    assert "final reply from hostile rejected: metrics: missing 'psnr'" in caplog.text
    _honest_run_is_intact(res, run_dir, caplog)


def test_list_in_the_final_evaluation_loses_nothing(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "list-final")
    assert _rejected(res) == []  # the rounds' evaluations were well formed
    assert set(res["final"]["federated"]) == set(HONEST)
    assert "final reply from hostile rejected: metrics['psnr']" in caplog.text
    assert checkpoint.load(run_dir).round == 2
    _honest_run_is_intact(res, run_dir, caplog)


def test_a_site_cannot_claim_another_sites_identity(root, tmp_path, caplog) -> None:
    """Bound as ``hostile`` in round 1, it claims ``site0`` from round 2: rejected, and
    logged under its own name; site0's records stay the honest site's."""
    res, run_dir = _run(root, tmp_path, "claim", claim="site0")
    rejected = _rejected(res)
    assert {(r, s) for r, s, _ in rejected} == {(2, "hostile")}
    assert all(why.removeprefix("evaluate: ").startswith("identity:") for *_, why in rejected)
    assert "final reply from hostile rejected: identity" in caplog.text
    assert sorted(res["rounds"][0]["train"]) == ["hostile", "site0", "site1"]
    assert sorted(res["rounds"][1]["train"]) == ["site0", "site1"]
    assert res["final"]["federated"]["site0"]["psnr"] != 20.0  # not the hostile's number
    assert checkpoint.load(run_dir).strategy[f"sites/{HOSTILE_NODE}"] == "hostile"
    _honest_run_is_intact(res, run_dir, caplog)


def test_a_second_node_never_shares_a_bound_name(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "duplicate", claim="site0")
    rejected = _rejected(res)
    assert {s for _, s, _ in rejected} == {f"node-{HOSTILE_NODE}"}
    # its first claim comes in the query that names every node before round 1
    first = f"reply from node-{HOSTILE_NODE} refused: identity: claims a site name bound to"
    assert first in caplog.text
    assert all("identity: claims another node's site name" in why for *_, why in rejected)
    strategy = checkpoint.load(run_dir).strategy
    assert strategy["sites/10"] == "site0" and strategy[f"sites/{HOSTILE_NODE}"] == "node-12"
    assert sorted(res["final"]["federated"]) == list(HONEST)
    _honest_run_is_intact(res, run_dir, caplog)


def test_a_trillion_examples_is_rejected(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "examples")
    rejected = _rejected(res)
    assert {(r, s) for r, s, _ in rejected} == {(1, "hostile"), (2, "hostile")}
    assert all("metrics['num-examples']: above the limit" in why for *_, why in rejected)
    _honest_run_is_intact(res, run_dir, caplog)


def test_a_million_examples_is_capped_at_the_lower_median(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "many-examples")
    assert _rejected(res) == []
    factor = parse_run_config({}).robust.max_examples_factor
    for r in res["rounds"]:  # honest sites have 10 training slices
        assert r["train"]["hostile"]["num-examples"] == 10 * factor
    assert "hostile claims 1000000 examples; weighted as 100" in caplog.text
    _honest_run_is_intact(res, run_dir, caplog)


def test_a_1e30_weight_is_rejected_by_its_norm(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "weight")
    rejected = _rejected(res)
    assert {(r, s) for r, s, _ in rejected} == {(1, "hostile"), (2, "hostile")}
    assert all(why.startswith("arrays: update norm") for *_, why in rejected)
    _honest_run_is_intact(res, run_dir, caplog)


def test_a_1e30_scaffold_delta_c_is_rejected_by_its_norm(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "scaffold-dc", {"strategy.name": "scaffold"})
    rejected = _rejected(res)
    assert {(r, s) for r, s, _ in rejected} == {(1, "hostile"), (2, "hostile")}
    assert all(why.startswith("scaffold.c-delta: update norm") for *_, why in rejected)
    c = checkpoint.load(run_dir).strategy
    assert all(np.abs(v).max() < 1e3 for k, v in c.items() if k.startswith("scaffold.c-global/"))
    _honest_run_is_intact(res, run_dir, caplog)


def test_a_4096_value_list_is_not_echoed(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "long-list")
    rejected = _rejected(res)
    assert {s for _, s, _ in rejected} == {"hostile"}
    assert all(
        why == "metrics['num-examples']: expected a finite number, got a list"
        for *_, why in rejected
    )
    _honest_run_is_intact(res, run_dir, caplog)


def test_a_200_kb_error_text_is_kept_as_its_kind(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "error-text")
    rejected = _rejected(res)
    assert {s for _, s, _ in rejected} == {f"node-{HOSTILE_NODE}"}  # never bound: no content
    assert {why for *_, why in rejected} == {
        "client error: unrecognised",
        "evaluate: client error: unrecognised",
    }
    _honest_run_is_intact(res, run_dir, caplog)


def test_a_1_mb_metric_key_is_not_echoed(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "key-name")
    rejected = _rejected(res)
    assert {s for _, s, _ in rejected} == {"hostile"}
    assert all("undeclared metric key (1 of them)" in why for *_, why in rejected)
    _honest_run_is_intact(res, run_dir, caplog)


def test_a_1_kb_site_name_is_refused(root, tmp_path, caplog) -> None:
    res, run_dir = _run(root, tmp_path, "site-name")
    rejected = _rejected(res)
    assert {s for _, s, _ in rejected} == {f"node-{HOSTILE_NODE}"}
    assert all("not a valid site name" in why for *_, why in rejected)
    _honest_run_is_intact(res, run_dir, caplog)


# --- unit: schemas, identity, error kinds ----------------------------------------------------
def _content(metrics: dict[str, Any] | None = None, **config: Any) -> RecordDict:
    content = RecordDict({"config": ConfigRecord(config)})
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    return content


EVAL = {"num-examples": 5, "ssim": 0.5, "nrmse": 0.3, "psnr": 20.0}
ZF = {"zf-ssim": 0.4, "zf-nrmse": 0.4, "zf-psnr": 18.0}


@pytest.mark.parametrize(
    "schema, metrics, match",
    [
        (TRAIN_SCHEMA, {"num-examples": 3, "train-loss": [0.1]}, r"'train-loss'.*a list"),
        (TRAIN_SCHEMA, {"num-examples": 3, "zf-psnr": 1.0}, r"undeclared metric key \(1 of"),
        (TRAIN_SCHEMA, {"num-examples": 0}, "positive int"),
        (TRAIN_SCHEMA, {"num-examples": 2.5}, "positive int"),
        (TRAIN_SCHEMA, {"num-examples": 10**10}, "above the limit"),
        (TRAIN_SCHEMA, {"num-examples": 3, "seconds": float("inf")}, "'seconds'.*finite"),
        (TRAIN_SCHEMA, {"num-examples": 3, **{f"k{i}": 1.0 for i in range(70)}}, "at most 64"),
        (SEARCH_SCHEMA, {"num-examples": 3, "ssim": 0.5}, "undeclared metric key"),
        (EVALUATE_SCHEMA, {"num-examples": 3, "ssim": 0.5, "nrmse": 0.3}, "missing 'psnr'"),
        (FINAL_SCHEMA, EVAL, "missing 'zf-ssim', 'zf-nrmse', 'zf-psnr'"),
        (PERSONALIZE_SCHEMA, {"num-examples": 3}, "missing 'before-ssim'"),
    ],
)
def test_schemas_reject_with_short_reasons(schema, metrics, match) -> None:
    with pytest.raises(ReplyError, match=match) as err:
        check_content(_content(metrics, **{"site-id": "a"}), schema)
    assert len(str(err.value)) < MAX_REASON


def test_schemas_accept_what_the_project_sends() -> None:
    assert check_content(_content({**EVAL, **ZF, "seconds": 1.0}), FINAL_SCHEMA)["psnr"] == 20.0
    assert check_content(_content(EVAL, **{"site-id": "h-1"}), EVALUATE_SCHEMA)
    assert check_content(_content(None, **{"site-id": "a", "unseen": True}), QUERY_SCHEMA) == {}
    token = {"site-id": "a", "scaffold.token": "ab" * 16}
    assert check_content(_content({"num-examples": 3}, **token), TRAIN_SCHEMA)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"site-id": MARKER * 10}, "not a valid site name"),
        ({"site-id": "node-3"}, "not a valid site name"),
        ({"site-id": "a b"}, "not a valid site name"),
        ({"site-id": 7}, "not a valid site name"),
        ({"site-id": "a", MARKER: "x"}, r"undeclared key \(1 of them\)"),
        ({"site-id": "a", "unseen": "yes"}, "undeclared key"),  # not in a train reply
    ],
)
def test_reply_config_is_declared_and_bounded(config, match) -> None:
    with pytest.raises(ReplyError, match=match) as err:
        check_content(_content({"num-examples": 1}, **config), TRAIN_SCHEMA)
    assert MARKER not in str(err.value)


def test_records_are_declared() -> None:
    content = _content(EVAL)
    content[MARKER] = MetricRecord({"a": 1.0})
    with pytest.raises(ReplyError, match=r"undeclared record \(1 of them\)"):
        check_content(content, EVALUATE_SCHEMA)
    arrays = _content(EVAL)
    arrays["arrays"] = ArrayRecord()
    with pytest.raises(ReplyError, match="evaluate replies carry no arrays"):
        check_content(arrays, EVALUATE_SCHEMA)
    assert site_claim(_content(None)) is None


def test_error_kinds_are_a_fixed_vocabulary() -> None:
    assert error_kind(2, "data") == "data"
    assert error_kind(2, f"{MARKER}: /data/patient-123.h5") == "unrecognised"
    assert error_kind(0, "device") == "device"
    assert error_kind(5, MARKER) == "Node Unavailable"


def test_site_names_bind_once_and_survive_state() -> None:
    names = SiteNames()
    assert names.resolve(1, "a") == ("a", None)
    assert names.resolve(1, None) == ("a", None)
    assert names.resolve(1, "b")[1].startswith("identity: claims a new name")
    assert names.resolve(2, "a") == ("node-2", "identity: claims a site name bound to another node")
    assert names.resolve(2, "c")[0] == "node-2"  # bound once, for good
    assert names.resolve(3, None) == ("node-3", None)
    assert names.name(4) == "node-4" and dict(names) == {1: "a", 2: "node-2", 3: "node-3"}
    restored = SiteNames()
    restored.load({k: np.asarray(v) for k, v in names.state().items()})  # as np.load gives
    assert dict(restored) == dict(names)
    assert restored.resolve(5, "a")[1] is not None


def test_restored_bindings_follow_the_connected_nodes() -> None:
    """After a resume, a binding holds while its node is connected; a node id the SuperLink
    no longer has (a restarted simulation gives new ids) frees its name."""
    saved = SiteNames({1: "a", 2: "b"}).state()
    same = SiteNames()
    same.load(saved)
    same.connected([1, 2, 9])  # the same SuperLink: node 9 cannot take "a"
    assert same.resolve(9, "a") == ("node-9", "identity: claims a site name bound to another node")
    moved = SiteNames()
    moved.load(saved)
    moved.connected([5, 6])  # new node ids
    assert moved.resolve(5, "a") == ("a", None) and moved.resolve(6, "b") == ("b", None)
    assert dict(moved) == {5: "a", 6: "b"}
    moved.connected([7])  # settled: a later call releases nothing
    assert moved.resolve(7, "a")[1] is not None


def test_strategy_state_keeps_the_bindings() -> None:
    s = FedAvg()
    s.sites.resolve(7, "a")
    t = FedAvg()
    t.load_state_dict(s.state_dict())
    assert dict(t.sites) == {7: "a"}


def test_robust_options_and_invalid_combinations() -> None:
    s = build_strategy("fedadam", aggregator="median", clip_norm=1.0)
    assert s.aggregator == "median" and s.clip_norm == 1.0
    with pytest.raises(ValueError, match="aggregates by its own rule"):
        build_strategy("scaffold", aggregator="median")
    with pytest.raises(ValueError, match="norm_factor"):
        build_strategy("fedavg", norm_factor=0.5)
    with pytest.raises(ConfigError, match="Scaffold's control variate"):
        parse_run_config({"strategy.name": "scaffold", "robust.aggregator": "trimmed-mean"})
    with pytest.raises(ConfigError, match="min-fit-clients > 2"):
        parse_run_config({"robust.aggregator": "multi-krum", "strategy.name": "fedavg"})
    with pytest.raises(ConfigError, match="robust.norm-factor"):
        parse_run_config({"robust.norm-factor": 0.5})
    ok = {"robust.aggregator": "multi-krum", "robust.byzantine": 0, "strategy.name": "fedavg"}
    ok.update({"min-fit-clients": 3, "min-available-clients": 3})
    assert parse_run_config(ok).robust.byzantine == 0


# --- the other phases: site query and personalization ---------------------------------------
def test_site_query_and_personalization_bind_identity(tmp_path) -> None:
    """Node 2 claims node 1's name in its query reply and in its personalization reply: both
    refused; node 3 sends a 200 kB error text: only its kind is kept."""
    set_task_identity()
    clients = {1: make("none", **{"site-id": "a"}), 2: make("duplicate", claim="a")}
    clients[3] = make("error-text")
    flat = {"data.unseen-sites": 1}
    cfg = parse_run_config(flat)
    grid = InProcessGrid(clients, flat)
    sites = SiteNames()
    training = TrainingGrid(grid, cfg, sites)
    assert sorted(training.get_node_ids()) == [1, 2, 3]  # nobody is held out
    assert dict(sites) == {1: "a", 2: "node-2"}
    out = personalization_phase(grid, to_record({}), cfg, "uid", sites=sites)
    assert out["a"]["before"]["psnr"] == 20.0
    assert out["node-2"]["error"].startswith("bad reply: identity")
    assert out["node-3"] == {"seen": True, "error": "client error: unrecognised"}
    assert MARKER not in repr(out)


def test_an_error_reply_never_carries_a_file_name(tmp_path, caplog) -> None:
    """The project's own site: a missing data folder is a ``data`` failure; the path stays in
    the site's log."""
    from client.site import error_reply

    set_task_identity()
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    try:
        raise FileNotFoundError(f"/data/{MARKER}/patient-123.h5")
    except FileNotFoundError as exc:
        reply = error_reply(msg, "a", exc)
    from strategies.protocol import parse_error

    assert reply.error.reason == "internal site=a" and MARKER in caplog.text
    assert parse_error(reply.error.code, reply.error.reason) == ("internal", "a")
    assert isinstance(reply.error, Error)


def test_error_reply_names_its_site_and_nothing_else() -> None:
    """A site failing from its first message is named by the claim in its error reason (bound
    as any first claim); a reason with anything else keeps only the kind."""
    from strategies.protocol import error_reason, parse_error

    assert parse_error(0, error_reason("data", "site1")) == ("data", "site1")
    assert parse_error(0, "data") == ("data", None)
    assert parse_error(0, "data site=/hospital/patient_0042.h5") == ("data", None)
    assert parse_error(0, "Traceback ... patient_0042.h5") == ("unrecognised", None)

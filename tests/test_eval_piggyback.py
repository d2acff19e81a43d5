"""eval-mode piggyback: a round ships the model once per site and direction, and the per-round
validation metrics equal those of a separate evaluate exchange."""

from __future__ import annotations

import pytest
from inprocess import InProcessGrid
from test_app_support import tiny_config, tiny_sites

from client.app import app as client_app
from recon.config import parse_run_config
from server.app import run_federation
from server.results import validate_results


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tiny_sites(tmp_path_factory)


def _run(root, tmp_path, mode: str) -> dict:
    flat = tiny_config(
        root,
        tmp_path / mode,
        {"strategy.name": "fedavg", "num-server-rounds": 3, "eval-mode": mode},
    )
    grid = InProcessGrid({10 + i: client_app for i in range(3)}, flat)
    res = run_federation(grid, parse_run_config(flat))
    assert res["status"] == "completed"
    validate_results(res)
    return res


def test_piggyback_ships_the_model_once_and_keeps_the_evaluation(root, tmp_path) -> None:
    sep = _run(root, tmp_path, "separate")
    pig = _run(root, tmp_path, "piggyback")
    model_bytes = pig["model"]["bytes"]
    for r in pig["rounds"][:-1]:  # the last round adds one evaluate exchange
        assert r["bytes_sent"] == pytest.approx(3 * model_bytes, rel=0.02)
        assert r["bytes_received"] == pytest.approx(3 * model_bytes, rel=0.02)
    last = pig["rounds"][-1]
    assert last["bytes_sent"] == pytest.approx(6 * model_bytes, rel=0.02)
    assert [r["round"] for r in pig["rounds"]] == [1, 2, 3]
    for a, b in zip(sep["rounds"], pig["rounds"], strict=True):
        assert set(a["eval"]) == set(b["eval"]) == set(pig["sites"])
        for site in pig["sites"]:
            assert b["eval"][site]["num-examples"] == a["eval"][site]["num-examples"]
            for k in ("ssim", "nrmse", "psnr"):
                assert b["eval"][site][k] == pytest.approx(a["eval"][site][k], rel=1e-4), (
                    a["round"],
                    site,
                    k,
                )
    for site in pig["sites"]:
        for k in ("ssim", "psnr"):
            assert pig["final"]["federated"][site][k] == pytest.approx(
                sep["final"]["federated"][site][k], rel=1e-4
            )

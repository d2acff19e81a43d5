"""``train.method`` in the federation: the ClientApp trains with ``local_train(method, ...)``.

GLEAM (one module per unroll, ``model.shared=false``) federates with FedAvg and with Scaffold
(whose correction then sees one module's gradients per call) and beats zero-filled on each site;
``checkpoint`` is end-to-end with less memory, so one round gives the same arrays as ``e2e``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inprocess import InProcessGrid
from test_app_support import tiny_config, tiny_sites

from client.app import app as client_app
from recon.config import ConfigError, parse_run_config
from server.app import initial_model, run_federation


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tiny_sites(tmp_path_factory, n_sites=2)


def _run(root, out, overrides) -> dict:
    flat = tiny_config(root, out, overrides)
    grid = InProcessGrid({10 + i: client_app for i in range(2)}, flat)
    return run_federation(grid, parse_run_config(flat))


def _final_arrays(out) -> dict[str, np.ndarray]:
    (run_dir,) = list(out.iterdir())
    ckpt = torch.load(run_dir / "final_model.pt", weights_only=True)
    return {k: v.numpy() for k, v in ckpt["state_dict"].items()}


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_gleam_federation_beats_zero_filled(root, tmp_path, strategy) -> None:
    res = _run(
        root,
        tmp_path,
        {"strategy.name": strategy, "train.method": "gleam", "model.shared": False},
    )
    assert res["status"] == "completed"
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert all(not r["rejected"] for r in res["rounds"]), res["rounds"]
    fed, zf = res["final"]["federated"], res["final"]["zero_filled"]
    assert sorted(fed) == ["site0", "site1"]
    for site in fed:
        assert fed[site]["ssim"] > zf[site]["ssim"], (site, fed[site], zf[site])
        assert fed[site]["psnr"] > zf[site]["psnr"], (site, fed[site], zf[site])
    # GLEAM freezes the data-consistency weight: every site leaves it where it was
    arrays = _final_arrays(tmp_path)
    x0 = initial_model(parse_run_config(tiny_config(root, tmp_path, {"model.shared": False})))
    start = {k: v.numpy() for k, v in x0.state_dict().items()}
    lam = [k for k in arrays if "lam" in k]
    assert lam and all(np.array_equal(arrays[k], start[k]) for k in lam)
    assert any(not np.array_equal(arrays[k], start[k]) for k in arrays)  # the denoisers trained


def test_checkpoint_method_gives_the_e2e_arrays(root, tmp_path) -> None:
    base = {"strategy.name": "fedavg", "num-server-rounds": 1, "train.local-steps": 4}
    _run(root, tmp_path / "e2e", {**base, "train.method": "e2e"})
    _run(root, tmp_path / "ckpt", {**base, "train.method": "checkpoint"})
    a, b = _final_arrays(tmp_path / "e2e"), _final_arrays(tmp_path / "ckpt")
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_method_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match="'train.method'"):
        parse_run_config({"train.method": "greedy"})
    with pytest.raises(ConfigError, match="model.shared.*gleam.modules"):
        parse_run_config({"train.method": "gleam", "model.num-unrolls": 2})
    with pytest.raises(ConfigError, match="'gleam.modules'"):
        parse_run_config({"gleam.modules": -1})
    with pytest.raises(ConfigError, match="gleam.modules .* must divide model.num-unrolls"):
        parse_run_config({"train.method": "gleam", "model.shared": False, "gleam.modules": 3})
    with pytest.raises(ConfigError, match="'layerwise.steps-per-block'"):
        parse_run_config({"layerwise.steps-per-block": -2})
    with pytest.raises(ConfigError, match='model.denoiser = "convex"'):
        parse_run_config({"train.method": "layerwise"})
    shared_one = parse_run_config({"train.method": "gleam", "gleam.modules": 1})
    assert shared_one.method_options() == {"num_modules": 1}
    per_unroll = parse_run_config({"train.method": "gleam", "model.shared": False})
    assert per_unroll.method_options() == {"num_modules": None}
    assert parse_run_config({}).method_options() == {}

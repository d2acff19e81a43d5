"""ClientApp handlers called directly with built Messages (no SuperLink, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MessageType
from test_app_support import context, message, tiny_config, tiny_sites

from client import control
from client.app import evaluate_handler, round_seed, train_handler
from client.site import clear_cache
from recon.config import parse_run_config
from server.app import initial_model
from strategies.protocol import (
    ERROR_CONFIG,
    ERROR_DATA,
    ERROR_DEVICE,
    ERROR_KINDS,
    FEDPROX_MU,
    NUM_EXAMPLES,
    RUN_UID,
    SCAFFOLD_C_DELTA,
    SCAFFOLD_C_GLOBAL,
    SCAFFOLD_OPTION,
    SERVER_ROUND,
    SITE_ID,
    to_numpy,
    to_record,
    validate_metrics,
    validate_reply,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tiny_sites(tmp_path_factory)
    flat = tiny_config(root, tmp_path_factory.mktemp("runs"), {"train.local-steps": 3})
    cfg = parse_run_config(flat)
    model = initial_model(cfg)
    arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return root, flat, arrays


def _train(flat, arrays, config=None, node_config=None, ctx=None, **extra):
    ctx = ctx or context(flat, {"partition-id": 0} if node_config is None else node_config)
    msg = message(to_record(arrays), {SERVER_ROUND: 1, **(config or {})}, **extra)
    return train_handler(msg, ctx), ctx


def test_train_reply_has_model_metrics_and_site(setup) -> None:
    _, flat, arrays = setup
    reply, _ = _train(flat, arrays)
    assert not reply.has_error(), reply.error
    content = reply.content
    assert set(content.array_records) == {"arrays"}
    y = to_numpy(content.array_records["arrays"])
    validate_reply(y, arrays)  # same keys, shapes, dtype kinds, finite
    assert all(y[k].dtype == arrays[k].dtype for k in arrays)
    assert any(not np.array_equal(y[k], arrays[k]) for k in arrays)  # it trained
    metrics = dict(content.metric_records["metrics"])
    assert validate_metrics(metrics) == 10  # 10 training slices
    for key in ("train-loss", "ssim", "nrmse", "psnr", "seconds"):
        assert np.isfinite(metrics[key])
    assert content.config_records["config"][SITE_ID] == "site0"


def test_train_is_reproducible_per_round_and_site(setup) -> None:
    _, flat, arrays = setup
    a, _ = _train(flat, arrays)
    b, _ = _train(flat, arrays)
    ya, yb = to_numpy(a.content["arrays"]), to_numpy(b.content["arrays"])
    for k in ya:
        np.testing.assert_array_equal(ya[k], yb[k])
    assert round_seed(0, 1, "site0") != round_seed(0, 2, "site0") != round_seed(0, 1, "site1")


def test_fedprox_term_keeps_model_closer(setup) -> None:
    _, flat, arrays = setup
    plain, _ = _train(flat, arrays)
    prox, _ = _train(flat, arrays, {FEDPROX_MU: 1e4})

    def dist(reply) -> float:
        y = to_numpy(reply.content["arrays"])
        return float(sum(((y[k] - arrays[k]) ** 2).sum() for k in arrays))

    assert dist(prox) < dist(plain)


@pytest.mark.parametrize("option", ["i", "ii"])
def test_scaffold_control_variate_sent_and_persisted(setup, option) -> None:
    root, flat, arrays = setup
    c = {k: np.zeros_like(v) for k, v in arrays.items()}
    config = {SCAFFOLD_OPTION: option, RUN_UID: f"test-{option}"}
    reply, ctx = _train(flat, arrays, config, **{SCAFFOLD_C_GLOBAL: to_record(c)})
    assert not reply.has_error(), reply.error
    assert set(reply.content.array_records) == {"arrays", SCAFFOLD_C_DELTA}
    delta = to_numpy(reply.content.array_records[SCAFFOLD_C_DELTA])
    validate_reply(delta, c, record=SCAFFOLD_C_DELTA)
    assert any(np.abs(d).sum() > 0 for d in delta.values())
    # c_k^+ = c_k^0 + Delta c_k = Delta c_k, kept in the context state and on the site's disk
    assert control.STATE_ARRAYS in ctx.state.array_records
    files = list((root / "site0" / ".fedunroll" / f"test-{option}").glob("scaffold_c.r*.npz"))
    assert [f.name for f in files] == ["scaffold_c.r000001.npz"]
    from_disk, r = control.load_control(
        type(ctx.state)(), root / "site0", f"test-{option}", 2, c
    )  # a fresh state (a restarted node): read from disk
    assert r == 1
    for k in c:
        np.testing.assert_allclose(from_disk[k], delta[k], rtol=0, atol=0)


def test_control_of_the_round_before_is_used_on_resume(tmp_path) -> None:
    from flwr.app import RecordDict

    ref = {"w": np.zeros(3, np.float32)}
    for r in (1, 2, 3):
        control.save_control(
            RecordDict(), tmp_path, "uid", r, {"w": np.full(3, r, np.float32)}, r - 1
        )
    # round 3 was saved by a run that crashed before the server finished round 3:
    c, r = control.load_control(RecordDict(), tmp_path, "uid", 3, ref)
    assert r == 2 and c["w"][0] == 2
    c, r = control.load_control(RecordDict(), tmp_path, "other-run", 3, ref)
    assert r == 0 and c["w"][0] == 0


def test_evaluate_reply_has_model_and_zero_filled_metrics(setup) -> None:
    _, flat, arrays = setup
    ctx = context(flat, {"partition-id": 1})
    msg = message(to_record(arrays), {"eval.split": "test"}, MessageType.EVALUATE)
    reply = evaluate_handler(msg, ctx)
    assert not reply.has_error(), reply.error
    assert not reply.content.array_records  # an evaluation reply carries no arrays
    metrics = dict(reply.content.metric_records["metrics"])
    assert metrics[NUM_EXAMPLES] == 5
    for key in ("ssim", "nrmse", "psnr", "zf-ssim", "zf-nrmse", "zf-psnr"):
        assert np.isfinite(metrics[key])
    assert reply.content.config_records["config"][SITE_ID] == "site1"


def test_deployment_node_config_names_the_site(setup) -> None:
    root, flat, arrays = setup
    node = {"data-path": str(root / "site2"), "site-id": "hospital-c", "device": "cpu"}
    reply, _ = _train(flat, arrays, node_config=node)
    assert not reply.has_error(), reply.error
    assert reply.content.config_records["config"][SITE_ID] == "hospital-c"


def _kind(reply) -> str:  # noqa: ANN001
    """The kind of failure an error reply says (its reason may also name the site)."""
    from strategies.protocol import error_kind

    return error_kind(reply.error.code, reply.error.reason)


def test_bad_site_fails_its_reply_with_file_and_field(setup, tmp_path, caplog) -> None:
    """The file and field go to the site's own log; the reply says only the kind of failure
    (file names may carry patient identifiers and never leave the hospital)."""
    _, flat, arrays = setup
    clear_cache()
    bad = tmp_path / "badsite"
    (bad / "train").mkdir(parents=True)
    (bad / "train" / "broken.h5").write_bytes(b"not an h5 file")
    reply, _ = _train(flat, arrays, node_config={"data-path": str(bad)})
    assert reply.has_error() and _kind(reply) == ERROR_DATA
    assert "broken.h5" in caplog.text and "field" in caplog.text

    caplog.clear()
    missing, _ = _train(flat, arrays, node_config={"data-path": str(tmp_path / "nowhere")})
    assert missing.has_error() and _kind(missing) == ERROR_DATA
    assert "data-path" in caplog.text and "nowhere" not in missing.error.reason

    caplog.clear()
    no_site, _ = _train(flat, arrays, node_config={})
    assert no_site.has_error() and _kind(no_site) == ERROR_CONFIG
    assert "partition-id" in caplog.text


def test_wrong_architecture_fails_the_reply(setup, caplog) -> None:
    _, flat, arrays = setup
    wrong = {k: v for k, v in arrays.items()}
    wrong.pop(next(iter(wrong)))
    reply, _ = _train(flat, wrong)
    assert reply.has_error() and _kind(reply) in ERROR_KINDS
    assert "state_dict" in caplog.text


def test_client_uses_one_thread() -> None:
    # The handlers set this; on 2 cores parallel clients with 2 threads each are 2x slower.
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    assert isinstance(ArrayRecord(), ArrayRecord)


def test_scaffold_state_goes_under_state_path_with_read_only_data(setup, tmp_path) -> None:
    import os
    import shutil
    import stat

    root, flat, arrays = setup
    data = tmp_path / "data" / "site0"
    shutil.copytree(root / "site0", data, ignore=shutil.ignore_patterns(".fedunroll"))
    state = tmp_path / "state"
    ro = stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP
    for d in (data, *[p for p in data.rglob("*") if p.is_dir()]):
        os.chmod(d, ro)
    try:
        c = {k: np.zeros_like(v) for k, v in arrays.items()}
        node = {"data-path": str(data), "site-id": "a", "state-path": str(state)}
        reply, _ = _train(
            flat,
            arrays,
            {SCAFFOLD_OPTION: "ii", RUN_UID: "ro"},
            node,
            **{SCAFFOLD_C_GLOBAL: to_record(c)},
        )
        assert not reply.has_error(), reply.error
        files = sorted(p.name for p in (state / ".fedunroll" / "ro").iterdir())
        assert files == ["scaffold_c.r000001.npz"]
        assert not (data / ".fedunroll").exists()  # nothing written next to the data
    finally:
        for d in (data, *[p for p in data.rglob("*") if p.is_dir()]):
            os.chmod(d, stat.S_IRWXU)


@pytest.mark.parametrize("option", ["i", "ii"])
def test_scaffold_with_gleam_leaves_frozen_controls_alone(setup, option) -> None:
    """GLEAM sets one module's grads per backward and freezes lam: the correction skips
    ``.grad is None`` and a parameter never trained gets Delta c_k = 0."""
    _, flat, _ = setup
    flat = {**flat, "train.method": "gleam", "model.shared": False}
    arrays = {
        k: v.detach().numpy().copy()
        for k, v in initial_model(parse_run_config(flat)).state_dict().items()
    }
    c = {k: np.full_like(v, 1e-3) for k, v in arrays.items()}  # nonzero c: would move lam
    config = {SCAFFOLD_OPTION: option, RUN_UID: f"gleam-{option}"}
    reply, _ = _train(flat, arrays, config, **{SCAFFOLD_C_GLOBAL: to_record(c)})
    assert not reply.has_error(), reply.error
    delta = to_numpy(reply.content.array_records[SCAFFOLD_C_DELTA])
    y = to_numpy(reply.content.array_records["arrays"])
    frozen = [k for k in arrays if "lam" in k]
    assert frozen
    for k in frozen:
        np.testing.assert_array_equal(y[k], arrays[k])
        np.testing.assert_array_equal(delta[k], 0)
    trained = [k for k in arrays if k.startswith("denoisers.") and k in delta]
    assert trained and all(np.abs(delta[k]).sum() > 0 for k in trained)


def test_gleam_devices_node_config_spreads_modules_with_the_same_update(setup, caplog) -> None:
    """``gleam-devices`` (P-GLEAM, GLEAM Alg. 2) gives the single-device GLEAM update; a
    device the node does not have fails the reply and names it."""
    root, flat, _ = setup
    flat = {**flat, "train.method": "gleam", "model.shared": False}
    arrays = {
        k: v.detach().numpy().copy()
        for k, v in initial_model(parse_run_config(flat)).state_dict().items()
    }
    node = {"data-path": str(root / "site1"), "device": "cpu"}
    one, _ = _train(flat, arrays, node_config=node)
    two, _ = _train(flat, arrays, node_config={**node, "gleam-devices": "cpu, cpu"})
    assert not one.has_error(), one.error
    assert not two.has_error(), two.error
    y1, y2 = (to_numpy(r.content.array_records["arrays"]) for r in (one, two))
    assert any(not np.array_equal(y1[k], arrays[k]) for k in arrays)  # it trained
    for k in y1:
        np.testing.assert_allclose(y2[k], y1[k], rtol=0, atol=1e-6, err_msg=k)
    if not torch.cuda.is_available():
        bad, _ = _train(flat, arrays, node_config={**node, "gleam-devices": "cpu,cuda:1"})
        assert bad.has_error() and _kind(bad) == ERROR_DEVICE
        assert "cuda:1" in caplog.text

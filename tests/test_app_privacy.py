"""What leaves a hospital: inspect every reply a ClientApp sends.

Allowed: the model's arrays (exactly its ``state_dict`` keys and shapes), Scaffold's Delta c_k
(keyed like the model), scalar metrics and the site id. Anything shaped like k-space, an image
or a coil map of the site (``[..., H, W]`` with the site's matrix), any complex array, any extra
record or any list-valued metric fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, MessageType
from test_app_support import context, message, tiny_config, tiny_sites

from client.app import evaluate_handler, train_handler
from recon.config import parse_run_config
from recon.data import SiteDataset
from server.app import initial_model
from strategies.protocol import (
    FEDPROX_MU,
    RUN_UID,
    SCAFFOLD_C_DELTA,
    SCAFFOLD_C_GLOBAL,
    SCAFFOLD_OPTION,
    SERVER_ROUND,
    SITE_ID,
    to_numpy,
    to_record,
)

ALLOWED_ARRAY_RECORDS = {"arrays", SCAFFOLD_C_DELTA}
ALLOWED_METRICS = {
    "num-examples", "train-loss", "train-final-loss", "steps", "ssim", "nrmse", "psnr",
    "zf-ssim", "zf-nrmse", "zf-psnr", "train-seconds", "seconds",
}  # fmt: skip


def _site_shapes(site_dir) -> set[tuple[int, int]]:
    ds = SiteDataset(site_dir, "train", rotate=None)
    h, w = ds[0].kspace.shape[-2:]
    return {(h, w), (w, h)}


def assert_private(reply: Message, model_arrays: dict[str, np.ndarray], hw: set) -> None:
    """Fail on anything but model-shaped arrays, scalar metrics and the site id."""
    assert not reply.has_error(), reply.error
    content = reply.content
    assert set(content.array_records) <= ALLOWED_ARRAY_RECORDS, set(content.array_records)
    for name, record in content.array_records.items():
        arrays = to_numpy(record)
        assert list(arrays) == list(model_arrays), f"{name}: keys differ from the model's"
        for key, a in arrays.items():
            assert a.shape == model_arrays[key].shape, (name, key, a.shape)
            assert a.dtype.kind != "c", f"{name}[{key}] is complex (k-space/image-like)"
            assert a.ndim < 2 or tuple(a.shape[-2:]) not in hw, f"{name}[{key}] {a.shape} ~ data"
    assert set(content.metric_records) == {"metrics"}
    metrics = dict(content.metric_records["metrics"])
    assert set(metrics) <= ALLOWED_METRICS, set(metrics) - ALLOWED_METRICS
    assert all(isinstance(v, int | float) for v in metrics.values()), metrics
    assert set(content.config_records) == {"config"}
    assert set(content.config_records["config"]) == {SITE_ID}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tiny_sites(tmp_path_factory)
    flat = tiny_config(root, tmp_path_factory.mktemp("runs"), {"train.local-steps": 2})
    model = initial_model(parse_run_config(flat))
    arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return root, flat, arrays


def test_shipped_key_set_is_the_model_state_dict(setup) -> None:
    _, flat, arrays = setup
    model = initial_model(parse_run_config(flat))
    assert list(arrays) == list(model.state_dict())
    assert all("mask" not in k and "maps" not in k and "kspace" not in k for k in arrays)


@pytest.mark.parametrize("kind", ["plain", "fedprox", "scaffold-i", "scaffold-ii"])
@pytest.mark.parametrize("site", [0, 2])
def test_train_reply_carries_no_data(setup, kind, site) -> None:
    root, flat, arrays = setup
    config: dict = {SERVER_ROUND: 1, RUN_UID: f"privacy-{kind}"}
    extra = {}
    if kind == "fedprox":
        config[FEDPROX_MU] = 0.1
    if kind.startswith("scaffold"):
        config[SCAFFOLD_OPTION] = kind.split("-")[1]
        extra[SCAFFOLD_C_GLOBAL] = to_record({k: np.zeros_like(v) for k, v in arrays.items()})
    msg = message(to_record(arrays), config, **extra)
    reply = train_handler(msg, context(flat, {"partition-id": site}))
    assert_private(reply, arrays, _site_shapes(root / f"site{site}"))


def test_evaluate_reply_carries_no_data(setup) -> None:
    root, flat, arrays = setup
    msg = message(to_record(arrays), {"eval.split": "val"}, MessageType.EVALUATE)
    reply = evaluate_handler(msg, context(flat, {"partition-id": 1}))
    assert_private(reply, arrays, _site_shapes(root / "site1"))
    assert not reply.content.array_records


def test_the_check_catches_a_leak(setup) -> None:
    root, flat, arrays = setup
    msg = message(to_record(arrays), {SERVER_ROUND: 1})
    reply = train_handler(msg, context(flat, {"partition-id": 0}))
    ds = SiteDataset(root / "site0", "train", rotate=None)
    leaked = dict(to_numpy(reply.content["arrays"]))
    first = next(iter(leaked))
    reply.content["leak"] = to_record({first: ds[0].target.numpy()})
    with pytest.raises(AssertionError):
        assert_private(reply, arrays, _site_shapes(root / "site0"))

"""Aggregation maths and reply validators: hand-computed 2-client cases and loop references."""

import math

import numpy as np
import pytest

from strategies import maths
from strategies.protocol import NUM_EXAMPLES, ReplyError, validate_metrics, validate_reply

RNG = np.random.default_rng(0)


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A small state_dict-like dict: conv weight, bias, BN buffers (float + int counter)."""
    return {
        "conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "bn.running_mean": rng.standard_normal(4).astype(np.float32),
        "bn.num_batches_tracked": np.array(rng.integers(0, 100), dtype=np.int64),
    }


# --- fedavg ---------------------------------------------------------------------------


def test_fedavg_two_clients_by_hand():
    y1 = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(10, np.int64)}
    y2 = {"w": np.array([3.0, 6.0], np.float32), "n": np.array(20, np.int64)}
    out = maths.fedavg([y1, y2], [1, 3])
    np.testing.assert_array_equal(out["w"], np.array([2.5, 5.0], np.float32))
    assert out["w"].dtype == np.float32
    assert out["n"].dtype == np.int64 and out["n"] == 18  # rint(17.5) = 18 (half to even)
    assert maths.fedavg([y1, y2], [1, 1])["n"] == 15
    assert list(out) == ["w", "n"]


def test_fedavg_matches_np_average():
    updates = [_model(RNG) for _ in range(5)]
    weights = [3, 1, 7, 2, 5]
    out = maths.fedavg(updates, weights)
    assert list(out) == list(updates[0])
    for key, first in updates[0].items():
        stacked = np.stack([u[key] for u in updates]).astype(np.float64)
        ref = np.average(stacked, axis=0, weights=weights)
        assert out[key].dtype == first.dtype
        if first.dtype.kind == "f":
            np.testing.assert_allclose(out[key], ref.astype(first.dtype), rtol=1e-6, atol=1e-7)
        else:
            assert out[key] == np.rint(ref).astype(first.dtype)


def test_fedavg_bool_and_float64():
    y1 = {"b": np.array([True, False]), "d": np.array([1.0])}
    y2 = {"b": np.array([True, True]), "d": np.array([2.0])}
    out = maths.fedavg([y1, y2], [3, 1])
    np.testing.assert_array_equal(out["b"], [True, False])
    assert out["b"].dtype == np.bool_ and out["d"].dtype == np.float64
    np.testing.assert_allclose(out["d"], [1.25])


@pytest.mark.parametrize(
    "weights, match",
    [([1], "2 updates but 1 weights"), ([1, 0], "positive"), ([1, math.nan], "positive")],
)
def test_fedavg_rejects_bad_weights(weights, match):
    y = {"w": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match=match):
        maths.fedavg([y, y], weights)


def test_fedavg_rejects_layout_mismatch():
    with pytest.raises(ValueError, match="keys"):
        maths.fedavg([{"a": np.zeros(1)}, {"b": np.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        maths.fedavg([{"a": np.zeros(1)}, {"a": np.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="no updates"):
        maths.fedavg([], [])


# --- fedopt ---------------------------------------------------------------------------


def _fedopt_by_hand(kind, x, d, eta=0.1, b1=0.9, b2=0.99, tau=1e-3):
    """One step from m = 0, v = tau^2 with scalar change d (Reddi et al. Alg. 2)."""
    v0 = tau**2
    m = (1 - b1) * d
    v = {
        "adam": b2 * v0 + (1 - b2) * d * d,
        "yogi": v0 - (1 - b2) * d * d * math.copysign(1.0, v0 - d * d),
        "adagrad": v0 + d * d,
    }[kind]
    return x + eta * m / (math.sqrt(v) + tau), m, v


@pytest.mark.parametrize("kind", maths.FEDOPT_KINDS)
def test_fedopt_two_clients_by_hand(kind):
    x = {"w": np.array([0.5, -1.0], np.float32), "n": np.array(4, np.int64)}
    y1 = {"w": np.array([1.5, -1.0], np.float32), "n": np.array(6, np.int64)}
    y2 = {"w": np.array([0.5, 1.0], np.float32), "n": np.array(6, np.int64)}
    avg = maths.fedavg([y1, y2], [1, 1])  # change: [0.5, 1.0]
    m, v = maths.fedopt_init(x, tau=1e-3)
    assert set(m) == set(v) == {"w"}
    np.testing.assert_allclose(v["w"], 1e-6)
    new, m1, v1 = maths.fedopt_step(
        x, avg, m, v, kind=kind, eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3
    )
    for i, (xi, di) in enumerate([(0.5, 0.5), (-1.0, 1.0)]):
        ref_x, ref_m, ref_v = _fedopt_by_hand(kind, xi, di)
        np.testing.assert_allclose(new["w"][i], ref_x, rtol=1e-6)
        np.testing.assert_allclose(m1["w"][i], ref_m, rtol=1e-6)
        np.testing.assert_allclose(v1["w"][i], ref_v, rtol=1e-6)
    assert new["w"].dtype == m1["w"].dtype == v1["w"].dtype == np.float32
    assert new["n"].dtype == np.int64 and new["n"] == 6  # buffers take the average


def test_fedopt_loop_reference_and_bias_correction():
    """Three steps against a plain float64 loop of Algorithm 2 (+ Adam bias correction)."""
    rng = np.random.default_rng(1)
    x = {"w": rng.standard_normal(5)}
    m, v = maths.fedopt_init(x, tau=1e-2, v_init=0.0)
    rx, rm, rv = x["w"].copy(), np.zeros(5), np.zeros(5)
    for t in (1, 2, 3):
        avg = {"w": x["w"] + rng.standard_normal(5)}
        x, m, v = maths.fedopt_step(
            x, avg, m, v, kind="adam", eta=0.3, beta_1=0.8, beta_2=0.9, tau=1e-2, step=t
        )
        d = avg["w"] - rx
        rm = 0.8 * rm + 0.2 * d
        rv = 0.9 * rv + 0.1 * d**2
        rx = rx + 0.3 * np.sqrt(1 - 0.9**t) / (1 - 0.8**t) * rm / (np.sqrt(rv) + 1e-2)
        np.testing.assert_allclose(x["w"], rx, rtol=1e-12)


def test_fedopt_rejects_unknown_kind():
    x = {"w": np.zeros(1)}
    with pytest.raises(ValueError, match="adam, yogi, adagrad"):
        maths.fedopt_step(x, x, x, x, kind="sgd", eta=1, beta_1=0, beta_2=0, tau=1)


# --- scaffold -------------------------------------------------------------------------


def test_scaffold_server_two_clients_by_hand():
    x = {"w": np.array([0.0, 0.0], np.float32), "n": np.array(2, np.int64)}
    y1 = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}
    y2 = {"w": np.array([3.0, 4.0], np.float32), "n": np.array(5, np.int64)}
    c = {"w": np.array([1.0, -1.0], np.float32)}
    dc1, dc2 = {"w": np.array([1.0, 1.0], np.float32)}, {"w": np.array([3.0, 5.0], np.float32)}

    new, c_new = maths.scaffold_server_update(x, [y1, y2], c, [dc1, dc2], eta_g=1.0, num_clients=4)
    np.testing.assert_array_equal(new["w"], [2.0, 3.0])
    assert new["n"] == 4 and new["n"].dtype == np.int64
    # c + |S|/N * mean(dc) = [1, -1] + 0.5 * [2, 3]
    np.testing.assert_array_equal(c_new["w"], [2.0, 0.5])
    assert new["w"].dtype == c_new["w"].dtype == np.float32

    half, _ = maths.scaffold_server_update(x, [y1, y2], c, [dc1, dc2], eta_g=0.5, num_clients=2)
    np.testing.assert_array_equal(half["w"], [1.0, 1.5])
    weighted, _ = maths.scaffold_server_update(
        x, [y1, y2], c, [dc1, dc2], eta_g=1.0, num_clients=2, weights=[1, 3]
    )
    np.testing.assert_array_equal(weighted["w"], [2.5, 3.5])


def test_scaffold_server_matches_loop_reference():
    rng = np.random.default_rng(2)
    x = _model(rng)
    ys = [_model(rng) for _ in range(3)]
    keys = ["conv.weight", "conv.bias"]
    c = {k: rng.standard_normal(x[k].shape).astype(np.float32) for k in keys}
    dcs = [{k: rng.standard_normal(x[k].shape).astype(np.float32) for k in keys} for _ in ys]
    new, c_new = maths.scaffold_server_update(x, ys, c, dcs, eta_g=0.7, num_clients=10)
    for k, xk in x.items():
        if xk.dtype.kind == "f":
            dy = sum(y[k].astype(np.float64) - xk for y in ys) / 3
            np.testing.assert_allclose(new[k], xk + 0.7 * dy, rtol=1e-5, atol=1e-6)
        else:
            assert new[k] == np.rint(np.mean([y[k] for y in ys]))
        assert new[k].dtype == xk.dtype
    for k in keys:
        ref = c[k] + 3 / 10 * np.mean([d[k] for d in dcs], axis=0)
        np.testing.assert_allclose(c_new[k], ref, rtol=1e-5, atol=1e-6)


def test_scaffold_server_rejects_bad_counts():
    x = {"w": np.zeros(1, np.float32)}
    with pytest.raises(ValueError, match="N=1"):
        maths.scaffold_server_update(x, [x, x], x, [x, x], eta_g=1.0, num_clients=1)
    with pytest.raises(ValueError, match="control deltas"):
        maths.scaffold_server_update(x, [x, x], x, [x], eta_g=1.0, num_clients=2)


def test_scaffold_correction():
    g = {"w": np.array([1.0, 2.0], np.float32)}
    c = {"w": np.array([0.5, 0.5], np.float32)}
    ck = {"w": np.array([0.25, 1.0], np.float32)}
    out = maths.scaffold_correction(g, c, ck)
    np.testing.assert_array_equal(out["w"], [1.25, 1.5])
    assert out["w"].dtype == np.float32


def test_scaffold_client_option_ii_by_hand():
    ck = {"w": np.array([1.0], np.float32)}
    c = {"w": np.array([0.5], np.float32)}
    x = {"w": np.array([1.0], np.float32), "n": np.array(1)}
    y = {"w": np.array([0.8], np.float32), "n": np.array(3)}
    c_new, delta = maths.scaffold_client_control_update(
        "ii", c_local=ck, c_global=c, x_global=x, y_local=y, local_steps=2, lr=0.1
    )
    # 1 - 0.5 + (1.0 - 0.8) / (2 * 0.1) = 1.5
    np.testing.assert_allclose(c_new["w"], [1.5], rtol=1e-6)
    np.testing.assert_allclose(delta["w"], [0.5], rtol=1e-6)
    assert set(c_new) == {"w"} and c_new["w"].dtype == delta["w"].dtype == np.float32


def test_scaffold_client_options_agree_for_constant_gradient():
    """K corrected SGD steps with a constant gradient g: option (ii) gives c_k+ = g = option (i)."""
    g = {"w": np.array([0.3, -2.0])}
    ck, c = {"w": np.array([1.0, 0.0])}, {"w": np.array([-0.5, 0.25])}
    x = {"w": np.array([2.0, 1.0])}
    y, lr, steps = {"w": x["w"].copy()}, 0.05, 7
    for _ in range(steps):
        y["w"] = y["w"] - lr * maths.scaffold_correction(g, c, ck)["w"]
    c_ii, d_ii = maths.scaffold_client_control_update(
        "ii", c_local=ck, c_global=c, x_global=x, y_local=y, local_steps=steps, lr=lr
    )
    c_i, d_i = maths.scaffold_client_control_update("i", c_local=ck, c_global=c, grad_at_global=g)
    np.testing.assert_allclose(c_ii["w"], g["w"], rtol=1e-12)
    np.testing.assert_allclose(c_i["w"], g["w"])
    np.testing.assert_allclose(d_i["w"], g["w"] - ck["w"])
    np.testing.assert_allclose(d_ii["w"], d_i["w"], rtol=1e-12)


def test_scaffold_client_rejects_bad_arguments():
    c = {"w": np.zeros(1)}
    with pytest.raises(ValueError, match="grad_at_global"):
        maths.scaffold_client_control_update("i", c_local=c, c_global=c)
    with pytest.raises(ValueError, match="local_steps and lr"):
        maths.scaffold_client_control_update("ii", c_local=c, c_global=c)
    with pytest.raises(ValueError, match="'i', 'ii'"):
        maths.scaffold_client_control_update("iii", c_local=c, c_global=c)


def test_proximal_term_by_hand():
    w = {"a": np.array([1.0, 2.0]), "b": np.array([[1.0]])}
    wt = {"a": np.array([0.0, 0.0]), "b": np.array([[3.0]])}
    assert maths.proximal_term(w, wt, mu=2.0) == pytest.approx(0.5 * 2.0 * (1 + 4 + 4))


# --- validators -----------------------------------------------------------------------


def _reference():
    return {"w": np.zeros((2, 3), np.float32), "n": np.array(0, np.int64)}


def test_validate_reply_accepts_good_and_float64():
    validate_reply(_reference(), _reference())
    validate_reply({"w": np.ones((2, 3)), "n": np.array(3, np.int32)}, _reference())


@pytest.mark.parametrize(
    "reply, match",
    [
        ({"w": np.zeros((2, 3), np.float32)}, r"missing keys \['n'\]"),
        # a reply's own key names are never quoted (they may be anything, of any size)
        ({**_reference(), "x": np.zeros(1)}, r"unexpected keys \(undeclared array key, 1 of"),
        ({**_reference(), "w": np.zeros((3, 2), np.float32)}, r"'w'.*shape \(3, 2\)"),
        ({**_reference(), "n": np.array(0.0)}, r"'n'.*dtype float64"),
        ({**_reference(), "w": np.full((2, 3), np.nan, np.float32)}, r"'w'.*6 non-finite"),
        ({**_reference(), "w": np.array([[0, np.inf, 0]] * 2, np.float32)}, "2 non-finite"),
        ({**_reference(), "w": [[0.0] * 3] * 2}, "numpy array"),
    ],
)
def test_validate_reply_rejects(reply, match):
    with pytest.raises(ReplyError, match=match):
        validate_reply(reply, _reference())


def test_validate_metrics():
    assert validate_metrics({NUM_EXAMPLES: 12, "loss": 0.5, "ssim": [0.1, 0.2]}) == 12
    for bad in ({}, {NUM_EXAMPLES: 0}, {NUM_EXAMPLES: -3}, {NUM_EXAMPLES: 2.0}):
        with pytest.raises(ReplyError, match=NUM_EXAMPLES):
            validate_metrics(bad)
    with pytest.raises(ReplyError, match="'loss'"):
        validate_metrics({NUM_EXAMPLES: 1, "loss": math.nan})

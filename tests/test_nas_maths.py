"""Federated NAS maths against hand computations (GAutoMRI Eq. 8-11, FedAutoMRI Eq. 7)."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.nas_maths import (
    aggregate_alpha,
    client_ema,
    fairness_init,
    fairness_weights,
    risk_gap,
)


def _alpha(value: float) -> dict[str, np.ndarray]:
    return {
        "node0": np.full((2, 8), value, dtype=np.float32),
        "node1": np.full((3, 8), 2 * value, dtype=np.float32),
    }


# ---------------------------------------------------------------- α aggregation (Eq. 8)


def test_alpha_aggregation_weights_every_client_by_its_examples() -> None:
    alphas = [_alpha(1.0), _alpha(4.0), _alpha(-2.0)]
    n = [1, 2, 5]  # N = 8
    out = aggregate_alpha(alphas, n)
    expected = (1 * 1.0 + 2 * 4.0 + 5 * -2.0) / 8  # = -1/8
    np.testing.assert_allclose(out["node0"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["node1"], 2 * expected, rtol=1e-6)
    assert out["node0"].dtype == np.float32 and list(out) == ["node0", "node1"]
    # Not client 0's α (the public aggregator's outcome), nor the unweighted mean.
    assert not np.allclose(out["node0"], alphas[0]["node0"])
    assert not np.allclose(out["node0"], (1.0 + 4.0 - 2.0) / 3)


@pytest.mark.parametrize("client", [0, 1, 2])
def test_every_clients_alpha_counts(client: int) -> None:
    rng = np.random.default_rng(client)
    alphas = [
        {"node0": rng.normal(size=(2, 8)).astype(np.float32)},
        {"node0": rng.normal(size=(2, 8)).astype(np.float32)},
        {"node0": rng.normal(size=(2, 8)).astype(np.float32)},
    ]
    n = [3, 1, 6]
    base = aggregate_alpha(alphas, n)
    bumped = [dict(a) for a in alphas]
    bumped[client] = {"node0": alphas[client]["node0"] + 1.0}
    out = aggregate_alpha(bumped, n)
    # Moving one client's α by +1 moves the aggregate by exactly N_c / N.
    np.testing.assert_allclose(out["node0"] - base["node0"], n[client] / sum(n), rtol=1e-5)


# ---------------------------------------------------------------- fairness (Eq. 9-11)


def test_fairness_init_is_uniform() -> None:
    np.testing.assert_allclose(fairness_init(4), [0.25] * 4)
    with pytest.raises(ValueError):
        fairness_init(0)


def test_fairness_weights_hand_computed() -> None:
    a = fairness_init(3)
    out = fairness_weights(a, [0.2, -0.1, 0.1], gamma=0.5)
    # beta = [1/3 + 0.5 * 0.2/0.2, 1/3, 1/3 + 0.5 * 0.1/0.2] = [5/6, 1/3, 7/12], sum 7/4
    np.testing.assert_allclose(out, [10 / 21, 4 / 21, 7 / 21], rtol=1e-12)
    assert out.sum() == pytest.approx(1.0)


def test_fairness_all_gaps_non_positive_keeps_the_weights() -> None:
    a = np.array([0.5, 0.3, 0.2])
    out = fairness_weights(a, [0.0, -0.4, -1e-9], gamma=0.3)
    np.testing.assert_allclose(out, a, rtol=1e-12)


def test_fairness_single_positive_gap_gets_exactly_gamma() -> None:
    a = fairness_init(3)
    out = fairness_weights(a, [-0.1, 0.3, 0.0], gamma=0.1)  # 0 is not > 0
    # beta = [1/3, 1/3 + 0.1, 1/3], sum 1.1
    np.testing.assert_allclose(out, [1 / 3.3, (1 / 3 + 0.1) / 1.1, 1 / 3.3], rtol=1e-12)
    # the size of a lone positive gap does not matter: G / max(G) = 1
    np.testing.assert_allclose(fairness_weights(a, [-0.1, 1e-6, 0.0], gamma=0.1), out)


def test_fairness_weights_carry_over_rounds() -> None:
    a1 = fairness_weights(fairness_init(2), [0.1, 0.0], gamma=1.0)
    np.testing.assert_allclose(a1, [1.5 / 2, 0.5 / 2])
    a2 = fairness_weights(a1, [0.2, 0.4], gamma=1.0)
    # beta = [0.75 + 0.5, 0.25 + 1] = [1.25, 1.25]
    np.testing.assert_allclose(a2, [0.5, 0.5])


def test_fairness_weights_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="finite"):
        fairness_weights([0.5, 0.5], [np.nan, 0.1], gamma=0.1)
    with pytest.raises(ValueError, match="positive"):
        fairness_weights([1.0, 0.0], [0.1, 0.1], gamma=0.1)
    with pytest.raises(ValueError, match="gaps of shape"):
        fairness_weights([0.5, 0.5], [0.1], gamma=0.1)
    with pytest.raises(ValueError, match="gamma"):
        fairness_weights([0.5, 0.5], [0.1, 0.1], gamma=-1.0)


def test_risk_gap() -> None:
    assert risk_gap(0.30, 0.25) == pytest.approx(0.05)
    assert risk_gap(0.30, None) == 0.0
    with pytest.raises(ValueError):
        risk_gap(float("nan"), 0.1)


# ---------------------------------------------------------------- client EMA (FedAutoMRI Eq. 7)


def _w(v: float) -> dict[str, np.ndarray]:
    return {"w": np.array([v], dtype=np.float64), "n": np.array(7, dtype=np.int64)}


def test_ema_adam_form_hand_computed() -> None:
    state, w1 = client_ema(None, _w(2.0), gamma=0.5, t=1)
    # m1 = 0.5 * 0 + 0.5 * 2 = 1; w1 = 1 / (1 - 0.5) = 2
    assert state["w"][0] == pytest.approx(1.0) and w1["w"][0] == pytest.approx(2.0)
    state, w2 = client_ema(state, _w(4.0), gamma=0.5, t=2)
    # m2 = 0.5 * 1 + 0.5 * 4 = 2.5; w2 = 2.5 / 0.75
    assert state["w"][0] == pytest.approx(2.5) and w2["w"][0] == pytest.approx(10 / 3)
    assert w2["n"] == 7 and w2["n"].dtype == np.int64


def test_ema_printed_form_hand_computed() -> None:
    state, w1 = client_ema(None, _w(2.0), gamma=0.5, t=1, form="printed")
    assert w1["w"][0] == pytest.approx(2.0)  # (0.5 * 0 + 0.5 * 2) / 0.5
    _, w2 = client_ema(state, _w(4.0), gamma=0.5, t=2, form="printed")
    assert w2["w"][0] == pytest.approx(4.0)  # (0.5 * 2 + 0.5 * 4) / 0.75


def test_ema_plain_form_hand_computed() -> None:
    state, w1 = client_ema(None, _w(2.0), gamma=0.5, t=1, form="plain")
    assert w1["w"][0] == pytest.approx(2.0)
    _, w2 = client_ema(state, _w(4.0), gamma=0.5, t=2, form="plain")
    assert w2["w"][0] == pytest.approx(3.0)


def test_ema_adam_keeps_a_constant_sequence_constant_printed_does_not() -> None:
    gamma = 0.9
    adam = printed = None
    for t in range(1, 6):
        adam, wa = client_ema(adam, _w(1.0), gamma=gamma, t=t)
        printed, wp = client_ema(printed, _w(1.0), gamma=gamma, t=t, form="printed")
        assert wa["w"][0] == pytest.approx(1.0)
    assert wp["w"][0] > 1.5  # the literal recursion inflates the weights


def test_ema_gamma_zero_is_the_global_model_and_dtypes_are_kept() -> None:
    g = {"w": np.array([1.5, -2.0], dtype=np.float32)}
    _, w = client_ema({"w": np.array([9.0, 9.0], dtype=np.float32)}, g, gamma=0.0, t=3)
    np.testing.assert_array_equal(w["w"], g["w"])
    assert w["w"].dtype == np.float32


def test_ema_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="gamma"):
        client_ema(None, _w(1.0), gamma=1.0, t=1)
    with pytest.raises(ValueError, match="t must"):
        client_ema(None, _w(1.0), gamma=0.5, t=0)
    with pytest.raises(ValueError, match="form"):
        client_ema(None, _w(1.0), gamma=0.5, t=1, form="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lacks"):
        client_ema({}, _w(1.0), gamma=0.5, t=2)

"""Flower strategies with no network: replies are built directly and fed to aggregate_train."""

import re
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from flwr.supercore.task_identity import TaskIdentity

from strategies import maths
from strategies.flower import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    NotEnoughReplies,
    Scaffold,
    build_strategy,
    to_numpy,
    to_record,
)
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    FEDPROX_MU,
    METRICS,
    NUM_EXAMPLES,
    SCAFFOLD_C_DELTA,
    SCAFFOLD_C_GLOBAL,
    SCAFFOLD_OPTION,
    SERVER_ROUND,
    SITE_ID,
)

NODES = [11, 22, 33]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages read run/node/task ids that only a running app sets (private Flower API)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """What sampling needs from a Grid (node ids); send_and_receive runs fake clients."""

    def __init__(self, nodes=NODES):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN:
                rnd = msg.content[CONFIG][SERVER_ROUND]
                extra_fn = _scaffold_extra if SCAFFOLD_C_GLOBAL in msg.content else None
                replies += _good_replies([msg], rnd, extra_fn)
            else:
                metrics = MetricRecord({NUM_EXAMPLES: 2, "ssim": 0.5, "nrmse": 0.2, "psnr": 25.0})
                replies.append(Message(RecordDict({METRICS: metrics}), reply_to=msg))
        return replies


def _model():
    return {
        "conv.weight": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        "conv.bias": np.array([0.5, -0.5, 0.0], np.float32),
        "bn.num_batches_tracked": np.array(5, np.int64),
    }


def _trained(x, node, rnd):
    """Deterministic 'local training' of a site: a fixed shift per node and round."""
    shift = np.float32(0.01 * node + 0.1 * rnd)
    y = {k: (v + shift).astype(v.dtype) if v.dtype.kind == "f" else v + 3 for k, v in x.items()}
    return y, node // 11  # (model, num-examples)


def _reply(msg, arrays, num_examples=1, extra=None, site=None, metrics=None):
    content = RecordDict({ARRAYS: to_record(arrays)})
    content[METRICS] = MetricRecord(
        {NUM_EXAMPLES: num_examples, "train-loss": 0.5, **(metrics or {})}
    )
    for name, record in (extra or {}).items():
        content[name] = to_record(record)
    if site is not None:
        content[CONFIG] = ConfigRecord({SITE_ID: site})
    return Message(content, reply_to=msg)


def _good_replies(msgs, rnd=1, extra_fn: Callable | None = None):
    replies = []
    for msg in msgs:
        node = msg.metadata.dst_node_id
        y, n = _trained(to_numpy(msg.content[ARRAYS]), node, rnd)
        if SCAFFOLD_C_GLOBAL in msg.content:  # a corrected step: the model depends on c
            for k, c in to_numpy(msg.content[SCAFFOLD_C_GLOBAL]).items():
                y[k] = y[k] - np.float32(0.1) * c
        extra = extra_fn(msg, node) if extra_fn else None
        replies.append(_reply(msg, y, n, extra=extra, site=f"site-{node}"))
    return replies


def _scaffold_extra(msg, node):
    c = to_numpy(msg.content[SCAFFOLD_C_GLOBAL])
    return {SCAFFOLD_C_DELTA: {k: np.full_like(v, node / 100) for k, v in c.items()}}


def _run_rounds(strategy, arrays, rounds, first_round=1):
    """Drive configure/aggregate like Strategy.start does, with deterministic clients."""
    extra_fn = _scaffold_extra if isinstance(strategy, Scaffold) else None
    for rnd in range(first_round, first_round + rounds):
        msgs = list(
            strategy.configure_train(rnd - first_round + 1, arrays, ConfigRecord(), FakeGrid())
        )
        replies = _good_replies(msgs, rnd, extra_fn)
        arrays, _ = strategy.aggregate_train(rnd - first_round + 1, replies[::-1])
    return arrays


# --- configure_train ------------------------------------------------------------------


def test_configure_train_sends_model_and_copied_config():
    config = ConfigRecord({"train.lr": 1e-3})
    s = FedProx(proximal_mu=0.1)
    msgs = list(s.configure_train(1, to_record(_model()), config, FakeGrid()))
    assert sorted(m.metadata.dst_node_id for m in msgs) == NODES
    content = msgs[0].content
    assert set(content.array_records) == {ARRAYS}
    sent = content[CONFIG]
    assert sent[SERVER_ROUND] == 1 and sent[FEDPROX_MU] == 0.1 and sent["train.lr"] == 1e-3
    assert dict(config) == {"train.lr": 1e-3}  # caller's config untouched


def test_scaffold_configure_train_sends_c_global():
    s = Scaffold(option="i", control_keys=["conv.weight"])
    msgs = list(s.configure_train(1, to_record(_model()), ConfigRecord(), FakeGrid()))
    content = msgs[0].content
    assert content[CONFIG][SCAFFOLD_OPTION] == "i"
    c = to_numpy(content[SCAFFOLD_C_GLOBAL])
    assert list(c) == ["conv.weight"]
    assert c["conv.weight"].dtype == np.float32 and not c["conv.weight"].any()
    default = Scaffold()
    default.configure_train(1, to_record(_model()), ConfigRecord(), FakeGrid())
    assert list(default.c_global) == ["conv.weight", "conv.bias"]  # float arrays only


def test_configure_evaluate_uses_completed_round():
    s = FedAvg()
    s.round = 4
    msgs = list(s.configure_evaluate(1, to_record(_model()), ConfigRecord(), FakeGrid()))
    assert len(msgs) == 3 and msgs[0].content[CONFIG][SERVER_ROUND] == 4


# --- aggregate_train ------------------------------------------------------------------


def test_fedavg_aggregates_like_maths_and_keeps_dtypes():
    s = FedAvg()
    x = _model()
    msgs = list(s.configure_train(1, to_record(x), ConfigRecord(), FakeGrid()))
    replies = _good_replies(msgs)
    arrays, metrics = s.aggregate_train(1, replies)
    out = to_numpy(arrays)
    ys = [_trained(x, n, 1) for n in NODES]
    ref = maths.fedavg([y for y, _ in ys], [n for _, n in ys])
    for k, v in ref.items():
        np.testing.assert_array_equal(out[k], v)
        assert out[k].dtype == x[k].dtype
    assert metrics[NUM_EXAMPLES] == 6 and metrics["train-loss"] == pytest.approx(0.5)
    assert s.round == 1 and not s.rejected
    assert set(s.train_site_metrics[1]) == {"site-11", "site-22", "site-33"}


def test_float64_reply_is_cast_to_the_model_dtype():
    s = FedAvg(min_train_nodes=1, min_available_nodes=1)
    x = _model()
    (msg,) = s.configure_train(1, to_record(x), ConfigRecord(), FakeGrid([7]))
    y64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in x.items()}
    out = to_numpy(s.aggregate_train(1, [_reply(msg, y64)])[0])
    assert out["conv.weight"].dtype == np.float32


def test_aggregation_does_not_depend_on_reply_order():
    outs = []
    for order in ([0, 1, 2], [2, 0, 1]):
        s = FedAvg()
        msgs = list(s.configure_train(1, to_record(_model()), ConfigRecord(), FakeGrid()))
        replies = _good_replies(msgs)
        outs.append(to_numpy(s.aggregate_train(1, [replies[i] for i in order])[0]))
    for k in outs[0]:
        np.testing.assert_array_equal(outs[0][k], outs[1][k])


def _bad_cases(x):
    nan = {**x, "conv.bias": np.array([np.nan, 0, 0], np.float32)}
    shape = {**x, "conv.weight": np.zeros((4, 3), np.float32)}
    missing = {k: v for k, v in x.items() if k != "conv.bias"}
    return {
        "nan": (nan, "'conv.bias'.*non-finite"),
        "shape": (shape, r"'conv.weight'.*shape \(4, 3\)"),
        "missing": (missing, r"missing keys \['conv.bias'\]"),
    }


def test_bad_replies_are_dropped_and_recorded():
    x = _model()
    s = FedAvg(min_train_nodes=3, min_available_nodes=3)
    grid = FakeGrid([1, 2, 3, 4, 5, 6, 7])
    msgs = list(s.configure_train(1, to_record(x), ConfigRecord(), grid))
    good = [_reply(m, _trained(x, 1, 1)[0], 2, site=f"good-{i}") for i, m in enumerate(msgs[:3])]
    bad = [
        _reply(msgs[3], _bad_cases(x)["nan"][0], site="nan-site"),
        _reply(msgs[4], _bad_cases(x)["shape"][0], site="shape-site"),
        _reply(msgs[5], _bad_cases(x)["missing"][0], site="missing-site"),
        Message(Error(code=0, reason="site crashed: NaN k-space"), reply_to=msgs[6]),
    ]
    arrays, metrics = s.aggregate_train(1, good + bad)
    np.testing.assert_array_equal(
        to_numpy(arrays)["conv.weight"], _trained(x, 1, 1)[0]["conv.weight"]
    )
    assert metrics[NUM_EXAMPLES] == 6
    reasons = {r.site: r.reason for r in s.rejected}
    assert set(reasons) == {
        "nan-site",
        "shape-site",
        "missing-site",
        f"node-{msgs[6].metadata.dst_node_id}",
    }
    assert all(r.round == 1 and r.phase == "train" for r in s.rejected)
    for case, site in (("nan", "nan-site"), ("shape", "shape-site"), ("missing", "missing-site")):
        assert re.search(_bad_cases(x)[case][1], reasons[site])
    # an error reply is recorded by its kind only, never its text (it may name files)
    assert reasons[f"node-{msgs[6].metadata.dst_node_id}"] == "client error: unrecognised"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m, y: _reply(m, y, num_examples=0), "num-examples"),
        (lambda m, y: _reply(m, y, metrics={"train-loss": float("nan")}), "'train-loss'"),
        (lambda m, y: _reply(m, y, extra={SCAFFOLD_C_DELTA: y}), "array records"),
        (lambda m, y: Message(RecordDict({ARRAYS: to_record(y)}), reply_to=m), "MetricRecord"),
    ],
)
def test_malformed_records_are_rejected(make, match):
    x = _model()
    s = FedAvg(min_train_nodes=1, min_available_nodes=1)
    (msg,) = s.configure_train(1, to_record(x), ConfigRecord(), FakeGrid([5]))
    with pytest.raises(NotEnoughReplies, match="0 valid train replies, need 1"):
        s.aggregate_train(1, [make(msg, x)])
    assert len(s.rejected) == 1 and re.search(match, s.rejected[0].reason)
    assert s.round == 0


def test_not_enough_valid_replies_raises():
    x = _model()
    s = FedAvg(min_valid_replies=2)
    msgs = list(s.configure_train(1, to_record(x), ConfigRecord(), FakeGrid()))
    replies = [_reply(msgs[0], x), _reply(msgs[1], _bad_cases(x)["nan"][0], site="bad")]
    with pytest.raises(NotEnoughReplies, match="1 valid train replies, need 2.*bad: arrays"):
        s.aggregate_train(1, replies)


# --- FedOpt ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_fedopt_matches_maths_and_keeps_float32(cls):
    x = _model()
    s = cls(eta=0.1, tau=1e-3)
    msgs = list(s.configure_train(1, to_record(x), ConfigRecord(), FakeGrid()))
    out = to_numpy(s.aggregate_train(1, _good_replies(msgs))[0])
    ys = [_trained(x, n, 1) for n in NODES]
    avg = maths.fedavg([y for y, _ in ys], [n for _, n in ys])
    m, v = maths.fedopt_init(x, 1e-3)
    ref, m1, v1 = maths.fedopt_step(
        x, avg, m, v, kind=cls.kind, eta=0.1, beta_1=s.beta_1, beta_2=s.beta_2, tau=1e-3
    )
    for k in x:
        np.testing.assert_array_equal(out[k], ref[k])
        assert out[k].dtype == x[k].dtype
    state = s.state_dict()
    np.testing.assert_array_equal(state["fedopt.m/conv.weight"], m1["conv.weight"])
    np.testing.assert_array_equal(state["fedopt.v/conv.bias"], v1["conv.bias"])
    assert state["fedopt.m/conv.weight"].dtype == np.float32


@pytest.mark.parametrize(
    "ours, theirs, kwargs",
    [
        (FedYogi, flwr_strategy.FedYogi, {"beta_1": 0.9, "beta_2": 0.99}),
        (FedAdagrad, flwr_strategy.FedAdagrad, {}),
        (FedAdam, flwr_strategy.FedAdam, {"beta_1": 0.9, "beta_2": 0.99}),
    ],
)
def test_fedopt_agrees_with_flower_builtin(ours, theirs, kwargs):
    """With Flower's conventions (v = 0; FedAdam bias correction at t = round + 1), on float64."""
    x = {"w": np.array([0.5, -1.0, 2.0]), "b": np.array([0.25])}
    mine = ours(eta=0.1, tau=1e-3, v_init=0.0, **kwargs)
    ref = theirs(eta=0.1, tau=1e-3, **kwargs)
    a_mine, a_ref = to_record(x), to_record(x)
    for rnd in (1, 2):
        if ours is FedAdam:
            mine.round = rnd  # our t = self.round + 1 = Flower's exponent server_round + 1
            mine.bias_correction = True
        msgs = list(mine.configure_train(rnd, a_mine, ConfigRecord(), FakeGrid()))
        ref_msgs = list(ref.configure_train(rnd, a_ref, ConfigRecord(), FakeGrid()))
        a_mine, _ = mine.aggregate_train(rnd, _good_replies(msgs, rnd))
        a_ref, _ = ref.aggregate_train(rnd, _good_replies(ref_msgs, rnd))
    for k in x:
        np.testing.assert_allclose(to_numpy(a_mine)[k], to_numpy(a_ref)[k], rtol=1e-12)


# --- Scaffold -------------------------------------------------------------------------


def test_scaffold_round_by_hand():
    x = _model()
    s = Scaffold(eta_g=0.5)
    msgs = list(s.configure_train(1, to_record(x), ConfigRecord(), FakeGrid()))
    out = to_numpy(s.aggregate_train(1, _good_replies(msgs, 1, _scaffold_extra))[0])
    mean_shift = np.mean([0.01 * n + 0.1 for n in NODES])
    np.testing.assert_allclose(out["conv.bias"], x["conv.bias"] + 0.5 * mean_shift, rtol=1e-6)
    assert out["conv.bias"].dtype == np.float32 and out["bn.num_batches_tracked"] == 8
    # N = 3 connected nodes, all sampled: c = 0 + mean(node / 100)
    np.testing.assert_allclose(s.c_global["conv.weight"], np.mean(NODES) / 100, rtol=1e-6)
    assert s.c_global["conv.weight"].dtype == np.float32


def test_scaffold_rejects_reply_without_or_with_bad_c_delta():
    x = _model()
    s = Scaffold(min_train_nodes=1, min_available_nodes=1)
    msgs = list(s.configure_train(1, to_record(x), ConfigRecord(), FakeGrid()))
    y, _ = _trained(x, 11, 1)
    c_bad = {k: np.zeros((1,), np.float32) for k in s.c_global}
    good = _good_replies(msgs[:1], 1, _scaffold_extra)
    replies = good + [
        _reply(msgs[1], y, site="no-c"),
        _reply(msgs[2], y, extra={SCAFFOLD_C_DELTA: c_bad}, site="bad-c"),
    ]
    s.aggregate_train(1, replies)
    reasons = {r.site: r.reason for r in s.rejected}
    assert "scaffold.c-delta" in reasons["no-c"]
    assert "scaffold.c-delta['conv.weight']: shape (1,)" in reasons["bad-c"]


# --- evaluate -------------------------------------------------------------------------


EVAL = {"nrmse": 0.2, "psnr": 25.0}  # required in every evaluate reply, with ssim


def test_aggregate_evaluate_weights_and_rejects():
    s = FedAvg()
    msgs = list(s.configure_evaluate(1, to_record(_model()), ConfigRecord(), FakeGrid()))
    replies = [
        Message(
            RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 1, "ssim": 0.5, **EVAL})}),
            reply_to=msgs[0],
        ),
        Message(
            RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 3, "ssim": 0.9, **EVAL})}),
            reply_to=msgs[1],
        ),
        Message(RecordDict({METRICS: MetricRecord({"ssim": 0.1})}), reply_to=msgs[2]),
    ]
    metrics = s.aggregate_evaluate(1, replies)
    assert metrics["ssim"] == pytest.approx(0.8) and metrics[NUM_EXAMPLES] == 4
    assert len(s.rejected) == 1 and s.rejected[0].phase == "evaluate"


# --- state ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_resume_from_state_gives_the_same_result(name, tmp_path):
    """3 rounds straight == 1 round, state saved with np.savez, new strategy, 2 more rounds."""
    kwargs = {"proximal_mu": 0.1} if name == "fedprox" else {}
    x0 = to_record(_model())
    reference = build_strategy(name, **kwargs)
    straight = _run_rounds(reference, x0, 3)

    first = build_strategy(name, **kwargs)
    arrays = _run_rounds(first, x0, 1)
    np.savez(tmp_path / "state.npz", **first.state_dict())
    np.savez(tmp_path / "arrays.npz", **to_numpy(arrays))

    resumed = build_strategy(name, **kwargs)
    with np.load(tmp_path / "state.npz") as f:
        resumed.load_state_dict({k: f[k] for k in f.files})
    assert resumed.round == 1
    with np.load(tmp_path / "arrays.npz") as f:
        arrays = to_record({k: f[k] for k in f.files})
    final = _run_rounds(resumed, arrays, 2, first_round=2)
    assert resumed.round == 3
    expected_state = reference.state_dict()
    assert resumed.state_dict().keys() == expected_state.keys()
    for k, v in resumed.state_dict().items():
        np.testing.assert_array_equal(v, expected_state[k])
    for k, v in to_numpy(straight).items():
        np.testing.assert_array_equal(to_numpy(final)[k], v)
        assert to_numpy(final)[k].dtype == v.dtype


def test_state_dict_round_trip_and_name_check():
    s = Scaffold()
    _run_rounds(s, to_record(_model()), 2)
    state = s.state_dict()
    assert state["strategy"] == "scaffold" and state["round"] == 2
    t = Scaffold()
    t.load_state_dict(state)
    assert t.round == 2
    for k, v in s.c_global.items():
        np.testing.assert_array_equal(t.c_global[k], v)
    assert t.c_global["conv.weight"] is not s.c_global["conv.weight"]
    with pytest.raises(ValueError, match="'scaffold'.*'fedavg'"):
        FedAvg().load_state_dict(state)


# --- factory --------------------------------------------------------------------------


def test_build_strategy():
    assert isinstance(build_strategy("fedavg"), FedAvg)
    s = build_strategy("fedyogi", eta=0.3, min_train_nodes=4)
    assert isinstance(s, FedYogi) and s.eta == 0.3 and s.min_train_nodes == 4
    assert build_strategy("scaffold", eta_g=0.5).eta_g == 0.5
    with pytest.raises(ValueError, match="fedavg, fedprox, fedadam, fedyogi, fedadagrad, scaffold"):
        build_strategy("fedsgd")
    with pytest.raises(ValueError, match=r"\['mu'\].*proximal_mu"):
        build_strategy("fedprox", mu=0.1)
    with pytest.raises(ValueError, match="option"):
        build_strategy("scaffold", option="iii")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_start_loop(name):
    """Flower's own round loop (Strategy.start) drives our strategies end to end."""
    s = build_strategy(name, **({"proximal_mu": 0.1} if name == "fedprox" else {}))
    x0 = to_record(_model())
    config = ConfigRecord({"train.lr": 0.01})
    result = s.start(grid=FakeGrid(), initial_arrays=x0, num_rounds=2, train_config=config)
    assert s.round == 2 and not s.rejected and dict(config) == {"train.lr": 0.01}
    assert set(result.train_metrics_clientapp) == {1, 2}
    assert result.evaluate_metrics_clientapp[2]["ssim"] == pytest.approx(0.5)
    out = to_numpy(result.arrays)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in _model().items()}

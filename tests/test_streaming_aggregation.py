"""Streaming aggregation: train replies are consumed as they arrive, their arrays spilled to a
per-round scratch directory and read back one at a time (``strategies.flower.TrainReplies``).

The result must be the list-based one (norm check, example cap, weighted mean / FedOpt /
Scaffold), bitwise the same whatever the arrival order; the server must hold one reply's
arrays at a time, not every sampled site's; the scratch files must go when the round ends,
also when it fails.
"""

from __future__ import annotations

import gc
import itertools
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from inprocess import InProcessGrid, set_task_identity

from recon.config import parse_run_config
from server.federation import Federation, Progress
from strategies import maths
from strategies.flower import NotEnoughReplies, _clipped, build_strategy
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    SCAFFOLD_C_DELTA,
    SCAFFOLD_C_GLOBAL,
    SITE_ID,
    to_numpy,
    to_record,
)
from strategies.spill import SCRATCH_PREFIX

NODES = [11, 22, 33, 44, 55, 66]
OUTLIER = 44  # sends a model 1e3 away: more than norm-factor 50 x the lower median
GREEDY = 55  # claims 10**6 examples: capped at max-examples-factor 10 x the lower median
COUNTS = {11: 10, 22: 20, 33: 30, 44: 40, 55: 10**6, 66: 25}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    set_task_identity()  # Messages read run/node ids that only a running app sets


class Nodes:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _model(size: int = 12) -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.linspace(-1, 1, size, dtype=np.float32),
        "conv.bias": np.array([0.5, -0.5, 0.0], np.float32),
        "bn.num_batches_tracked": np.array(5, np.int64),
    }


def _trained(x: dict[str, np.ndarray], node: int) -> dict[str, np.ndarray]:
    shift = np.float32(1e3 if node == OUTLIER else 0.01 * node + np.sin(node) * 1e-3)
    return {
        k: (v + shift).astype(v.dtype) if v.dtype.kind == "f" else v + node % 3
        for k, v in x.items()
    }


def _delta_c(msg: Message, node: int) -> dict[str, np.ndarray]:
    c = to_numpy(msg.content[SCAFFOLD_C_GLOBAL])
    return {k: np.full_like(v, node / 100) for k, v in c.items()}


def _reply(msg: Message, arrays: dict[str, np.ndarray], n: int, extra: Any = None) -> Message:
    node = msg.metadata.dst_node_id
    content = RecordDict(
        {
            ARRAYS: to_record(arrays),
            METRICS: MetricRecord({NUM_EXAMPLES: n, "train-loss": 0.5}),
            CONFIG: ConfigRecord({SITE_ID: f"site-{node}"}),
        }
    )
    for name, record in (extra or {}).items():
        content[name] = to_record(record)
    return Message(content, reply_to=msg)


def _round(name: str, x: dict[str, np.ndarray] | None = None, **kwargs: Any):
    """A strategy after configure_train, and a function making node's reply (fresh each call)."""
    s = build_strategy(name, min_train_nodes=2, min_available_nodes=2, **kwargs)
    x = _model() if x is None else x
    msgs = {
        m.metadata.dst_node_id: m
        for m in s.configure_train(1, to_record(x), ConfigRecord(), Nodes(NODES))
    }

    def reply(node: int) -> Message:
        msg = msgs[node]
        extra = {SCAFFOLD_C_DELTA: _delta_c(msg, node)} if name == "scaffold" else None
        return _reply(msg, _trained(x, node), COUNTS[node], extra)

    return s, x, reply


def _reference(name: str, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The list-based result by hand: OUTLIER rejected, GREEDY weighted as 10 x lower median
    (of the 5 the norm check kept); Scaffold takes the uniform mean of the y_k."""
    kept = [n for n in NODES if n != OUTLIER]
    counts = [COUNTS[n] for n in kept]
    lmed = sorted(counts)[(len(counts) - 1) // 2]
    weights = [1.0] * len(kept) if name == "scaffold" else [min(c, 10 * lmed) for c in counts]
    ys = [_trained(x, n) for n in kept]
    out = {}
    for k, v in x.items():
        mean = np.average(np.array([y[k] for y in ys], np.float64), axis=0, weights=weights)
        out[k] = mean.astype(v.dtype) if v.dtype.kind == "f" else np.rint(mean).astype(v.dtype)
    if name == "fedadam":  # FedAdam's defaults, no bias correction (Reddi et al. Alg. 2)
        m, v = maths.fedopt_init(x, 1e-3)
        kw = {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
        out, _, _ = maths.fedopt_step(x, out, m, v, kind="adam", **kw)
    return out


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "scaffold"])
def test_streamed_aggregate_equals_the_list_result_with_bounds_applied(
    name: str, tmp_path: Path
) -> None:
    s, x, reply = _round(name)
    with s.train_replies(tmp_path) as stream:
        for node in reversed(NODES):
            stream.add(reply(node))
        arrays, metrics = s.aggregate_train(1, stream)
    got = to_numpy(arrays)
    want = _reference(name, x)
    assert list(got) == list(x) and all(got[k].dtype == x[k].dtype for k in x)
    for k in x:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    # the outlier is rejected by its norm, the greedy site weighted as 10 x the lower median
    assert [(r.site, r.reason.split(":")[0]) for r in s.rejected] == [(f"site-{OUTLIER}", ARRAYS)]
    assert "update norm" in s.rejected[0].reason
    assert s.train_site_metrics[1][f"site-{GREEDY}"][NUM_EXAMPLES] == 10 * 25
    assert f"site-{OUTLIER}" not in s.train_site_metrics[1]
    if name == "scaffold":
        c = s.c_global
        kept = [n for n in NODES if n != OUTLIER]
        for v in c.values():  # |S|/N mean(Delta c_k) with N = 6 connected, |S| = 5
            np.testing.assert_allclose(v, 5 / 6 * np.mean([n / 100 for n in kept]), rtol=1e-6)
    # the list path (today's callers) gives the same bits
    s2, _, reply2 = _round(name)
    arrays2, metrics2 = s2.aggregate_train(1, [reply2(n) for n in NODES])
    for k, v in to_numpy(arrays2).items():
        np.testing.assert_array_equal(v, got[k])
    assert dict(metrics2) == dict(metrics) and s2.rejected == s.rejected


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "scaffold"])
def test_arrival_order_does_not_change_a_bit(name: str, tmp_path: Path) -> None:
    outs, c_globals = [], []
    orders = list(itertools.permutations(NODES))[::97][:5] + [tuple(NODES), tuple(reversed(NODES))]
    for order in orders:
        s, _, reply = _round(name)
        with s.train_replies(tmp_path) as stream:
            for node in order:
                stream.add(reply(node))
            outs.append(to_numpy(s.aggregate_train(1, stream)[0]))
        c_globals.append(getattr(s, "c_global", None))
        assert [r.site for r in s.rejected] == [f"site-{OUTLIER}"]
    for out in outs[1:]:
        for k, v in out.items():
            assert v.tobytes() == outs[0][k].tobytes(), k
    if name == "scaffold":
        for c in c_globals[1:]:
            for k, v in c.items():
                assert v.tobytes() == c_globals[0][k].tobytes(), k


def test_clip_norm_is_applied_to_each_reply_read_back(tmp_path: Path) -> None:
    s, x, reply = _round("fedavg", clip_norm=0.05, norm_factor=0)
    with s.train_replies(tmp_path) as stream:
        for node in [11, 22, 33]:
            stream.add(reply(node))
        got = to_numpy(s.aggregate_train(1, stream)[0])
    ys = [_clipped(_trained(x, n), x, 0.05) for n in [11, 22, 33]]
    want = maths.fedavg(ys, [COUNTS[n] for n in [11, 22, 33]])
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)


@pytest.mark.parametrize("aggregator", ["median", "multi-krum"])
def test_robust_aggregators_load_the_accepted_replies_together(
    aggregator: str, tmp_path: Path
) -> None:
    s, x, reply = _round("fedavg", aggregator=aggregator, byzantine=1)
    with s.train_replies(tmp_path) as stream:
        for node in NODES:
            stream.add(reply(node))
        got = to_numpy(s.aggregate_train(1, stream)[0])
    s2, _, reply2 = _round("fedavg", aggregator=aggregator, byzantine=1)
    want = to_numpy(s2.aggregate_train(1, [reply2(n) for n in NODES])[0])
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)


# --- memory -------------------------------------------------------------------------------
BIG = 1_000_000  # float32 entries: a ~4 MB model
N_BIG = 20


def _big_round(name: str = "fedavg"):
    x = {"w": np.linspace(-1, 1, BIG, dtype=np.float32), "b": np.zeros(8, np.float32)}
    nodes = list(range(100, 100 + N_BIG))
    s = build_strategy(name, min_train_nodes=2, min_available_nodes=2)  # default bounds
    msgs = list(s.configure_train(1, to_record(x), ConfigRecord(), Nodes(nodes)))

    def make(i: int) -> Message:
        msg = msgs[i]
        y = {k: v + np.float32(1e-3 * (i + 1)) for k, v in x.items()}
        extra = None
        if name == "scaffold":
            extra = {SCAFFOLD_C_DELTA: {k: np.full_like(v, 1e-3 * i) for k, v in x.items()}}
        return _reply(msg, y, 10 + i, extra)

    return s, make, sum(a.nbytes for a in x.values())


def test_feeding_keeps_no_reply_in_memory() -> None:
    """After each reply is consumed, what the strategy holds does not grow with the replies."""
    s, make, model = _big_round()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        held = []
        with s.train_replies() as stream:
            for i in range(N_BIG):
                msg = make(i)
                stream.add(msg)
                del msg  # the server's pull loop drops it too (server.federation.collect)
                held.append(tracemalloc.get_traced_memory()[0] - base)
            tracemalloc.reset_peak()
            s.aggregate_train(1, stream)
            _, finish_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(held) < 0.2 * model, [h / model for h in held]  # no arrays kept, no cycles
    # read back one at a time: float64 sum (2 models) + one reply + its float64 term + result
    assert finish_peak - base < 8 * model, (finish_peak - base) / model


@pytest.mark.parametrize("name", ["fedavg", "scaffold"])
def test_aggregating_an_iterator_of_replies_holds_o1_models(name: str) -> None:
    """N = 20 replies of a 4 MB model: the list-based aggregation held all (> 20 models at
    its peak, 40 measured); the stream holds one reply plus float64 work arrays."""
    s, make, model = _big_round(name)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        s.aggregate_train(1, (make(i) for i in range(N_BIG)))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    limit = {"fedavg": 12, "scaffold": 16}[name]  # measured 8 and 11; the list path 40 and 80
    assert peak < limit * model, f"peak {peak / model:.1f} models"


# --- scratch files ------------------------------------------------------------------------


def _scratch(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{SCRATCH_PREFIX}*"))


def test_scratch_is_removed_after_the_round_and_when_it_fails(tmp_path: Path) -> None:
    s, _, reply = _round("scaffold")
    with s.train_replies(tmp_path) as stream:
        for node in NODES:
            stream.add(reply(node))
        (scratch,) = _scratch(tmp_path)
        assert len(list(scratch.iterdir())) == 2 * len(NODES)  # model + Delta c per reply
        s.aggregate_train(1, stream)
    assert not _scratch(tmp_path)

    s, _, reply = _round("fedavg", min_valid_replies=3)
    with pytest.raises(NotEnoughReplies), s.train_replies(tmp_path) as stream:
        for node in [11, 22]:
            stream.add(reply(node))
        assert len(list(_scratch(tmp_path)[0].iterdir())) == 2
        s.aggregate_train(1, stream)
    assert not _scratch(tmp_path)


def test_list_path_scratch_goes_to_the_temporary_directory_and_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    s, _, reply = _round("fedavg")
    s.aggregate_train(1, [reply(n) for n in NODES])
    s, _, reply = _round("fedavg", min_valid_replies=3)
    with pytest.raises(NotEnoughReplies):
        s.aggregate_train(1, [reply(11)])
    assert not _scratch(tmp_path) and not list(tmp_path.iterdir())


def _client(fail: set[int]):
    def client(msg: Message, ctx: Any) -> Message:
        node = ctx.node_id
        if msg.metadata.message_type == MessageType.TRAIN:
            if node in fail:
                raise RuntimeError("boom")  # an error reply
            x = to_numpy(msg.content[ARRAYS])
            return _reply(msg, _trained(x, node), COUNTS.get(node, 7))
        metrics = {NUM_EXAMPLES: 2, "ssim": 0.5, "nrmse": 0.2, "psnr": 25.0}
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return client


def _federation(tmp_path: Path, fail: set[int]) -> tuple[Federation, Path]:
    flat = {
        "run.out": str(tmp_path),
        "data.num-sites": 3,
        "num-server-rounds": 1,
        "eval-mode": "separate",
        "round-grace": 0.0,
        "node-wait-timeout": 5.0,
    }
    cfg = parse_run_config(flat)
    nodes = [11, 22, 33]
    grid = InProcessGrid({n: _client(fail) for n in nodes}, cfg.flat())
    strategy = build_strategy(
        "fedavg", min_train_nodes=2, min_available_nodes=2, min_valid_replies=2
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return Federation(grid, strategy, cfg, run_dir, "uid"), run_dir


def test_federation_round_spills_to_the_run_dir_and_cleans_up(tmp_path: Path) -> None:
    fed, run_dir = _federation(tmp_path, fail=set())
    seen: list[int] = []
    aggregate = fed.strategy.aggregate_train

    def aggregating(server_round: int, replies: Any) -> Any:
        seen.extend(len(list(p.iterdir())) for p in _scratch(run_dir))
        return aggregate(server_round, replies)

    fed.strategy.aggregate_train = aggregating
    (run_dir / f"{SCRATCH_PREFIX}r1-left-by-a-killed-server").mkdir()
    progress = fed.run(Progress(0, to_record(_model())))
    assert seen == [3]  # one file per reply while the round ran (the stale one was removed)
    assert not _scratch(run_dir)
    record = progress.rounds[0]
    assert sorted(record["train"]) == ["site-11", "site-22", "site-33"] and not record["rejected"]
    assert record["bytes_received"] > 0


def test_federation_round_that_fails_leaves_no_scratch(tmp_path: Path) -> None:
    fed, run_dir = _federation(tmp_path, fail={22, 33})
    with pytest.raises(NotEnoughReplies):
        fed.run_round(Progress(0, to_record(_model())))
    assert not _scratch(run_dir)
    assert sorted(r.site for r in fed.strategy.rejected) == ["node-22", "node-33"]

"""Hostile and broken sites, item 5: Scaffold keeps c = (1/N) sum_k c_k when replies are lost.

A site keeps c_k^+ pending until the server has accepted the reply that carried Delta c_k
(``client/control.py``, ``scaffold.token`` / ``scaffold.accepted``). Checked (a) on heterogeneous
quadratics with the project's Scaffold maths (``strategies.maths``): with dropped replies the
federation still reaches the global optimum, and committing before acceptance does not;
(b) with the real ClientApp on the in-process grid: a site whose round-2 reply is lost ends
round 3 with the c_k it would have had without round 2, and the server's c is the mean of the
sites' committed c_k (read from the site files); (c) the same across a server resume, also one
that loses an aggregated but not yet checkpointed round.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from inprocess import InProcessGrid
from test_app_support import tiny_config, tiny_sites

from client import control
from client.app import app as client_app
from client.state import RoundFiles
from recon.config import parse_run_config
from server import checkpoint
from server.app import run_federation
from strategies import maths
from strategies.flower import Scaffold
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    EVAL_SPLIT,
    METRICS,
    NUM_EXAMPLES,
    SCAFFOLD_ACCEPTED,
    SCAFFOLD_C_DELTA,
    SCAFFOLD_C_GLOBAL,
    SCAFFOLD_TOKEN,
    SERVER_ROUND,
    SITE_ID,
    get_int,
    to_numpy,
    to_record,
)

# --- (a) the maths: heterogeneous quadratics ----------------------------------------------------


def _quadratics(n: int = 4, dim: int = 5, seed: int = 0):
    """Site k minimises 0.5 ||A_k x - b_k||^2 (different A_k, b_k: heterogeneous sites)."""
    rng = np.random.default_rng(seed)
    a = [np.eye(dim) * (2 + k) + 0.3 * rng.normal(size=(dim, dim)) for k in range(n)]
    b = [3 * rng.normal(size=dim) + k for k in range(n)]
    x_star = np.linalg.solve(sum(m.T @ m for m in a), sum(m.T @ v for m, v in zip(a, b)))
    return a, b, x_star


def _simulate(
    option: str,
    commit_on_accept: bool,
    rounds: int,
    drops: frozenset[tuple[int, int]] = frozenset(),
    sample: int | None = None,
    local_steps: int = 5,
) -> tuple[float, float]:
    """Scaffold with plain-SGD sites; the server never sees site k's reply in round r for
    (r, k) in ``drops``. Returns (||x - x*||, max |c - mean_k c_k|) over committed c_k.

    ``commit_on_accept``: a site keeps c_k^+ pending and commits it at its next round only if
    the server accepted that reply (the server remembers the round of each site's last accepted
    reply, as it remembers tokens); otherwise c_k^+ is committed before replying.
    """
    a, b, x_star = _quadratics()
    n = len(a)
    lr = 1.0 / (local_steps * max(np.linalg.eigvalsh(m.T @ m).max() for m in a))

    def grad(k: int, y: np.ndarray) -> np.ndarray:
        return a[k].T @ (a[k] @ y - b[k])

    rng = np.random.default_rng(1)
    x, c = np.zeros_like(x_star), np.zeros_like(x_star)
    committed = [np.zeros_like(x) for _ in range(n)]
    pending: list[tuple[int, np.ndarray] | None] = [None] * n
    accepted: dict[int, int] = {}  # site -> round of its last accepted reply
    for r in range(1, rounds + 1):
        sampled = sorted(rng.choice(n, sample, replace=False)) if sample else range(n)
        ys, deltas, took = [], [], []
        for k in sampled:
            if (p := pending[k]) is not None:
                if accepted.get(k) == p[0]:
                    committed[k] = p[1]
                pending[k] = None
            y = x.copy()
            for _ in range(local_steps):
                g = maths.scaffold_correction({"w": grad(k, y)}, {"w": c}, {"w": committed[k]})
                y = y - lr * g["w"]
            c_new, delta = maths.scaffold_client_control_update(
                option,
                c_local={"w": committed[k]},
                c_global={"w": c},
                x_global={"w": x},
                y_local={"w": y},
                local_steps=local_steps,
                lr=lr,
                grad_at_global={"w": grad(k, x)},
            )
            if commit_on_accept:
                pending[k] = (r, c_new["w"])
            else:
                committed[k] = c_new["w"]
            if (r, k) not in drops:
                ys.append({"w": y})
                deltas.append(delta)
                took.append(k)
        if ys:
            x_new, c_next = maths.scaffold_server_update(
                {"w": x}, ys, {"w": c}, deltas, eta_g=1.0, num_clients=n
            )
            x, c = x_new["w"], c_next["w"]
        accepted.update(dict.fromkeys(took, r))
    final = [
        p[1] if p is not None and accepted.get(k) == p[0] else committed[k]
        for k, p in enumerate(pending)
    ]
    return float(np.linalg.norm(x - x_star)), float(np.abs(c - np.mean(final, axis=0)).max())


DROPS = frozenset({(3, 1), (7, 2), (10, 1), (11, 0)})


@pytest.mark.parametrize("option", ["i", "ii"])
@pytest.mark.parametrize("sample", [None, 3], ids=["all-sites", "3-of-4"])
def test_dropped_replies_still_reach_the_global_optimum(option, sample) -> None:
    dist, gap = _simulate(option, True, 200, DROPS, sample)
    assert dist < 1e-8 and gap < 1e-12, (dist, gap)
    clean, _ = _simulate(option, True, 200, frozenset(), sample)
    assert clean < 1e-8
    # today's behaviour (c_k^+ committed before the server accepted it): stuck for good
    wrong_200, wrong_gap = _simulate(option, False, 200, DROPS, sample)
    wrong_400, _ = _simulate(option, False, 400, DROPS, sample)
    assert wrong_gap > 1e-2 and wrong_200 > 1e-2 and wrong_400 > 1e-2, (wrong_200, wrong_400)


# --- the strategy: tokens in, tokens out ------------------------------------------------------


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _model() -> dict[str, np.ndarray]:
    return {"w": np.arange(4, dtype=np.float32), "n": np.array(3, np.int64)}


def _scaffold_reply(msg: Message, token: Any, site: str) -> Message:
    x = to_numpy(msg.content[ARRAYS])
    c = to_numpy(msg.content[SCAFFOLD_C_GLOBAL])
    content = RecordDict(
        {
            ARRAYS: to_record({k: v + 1 if v.dtype.kind == "f" else v for k, v in x.items()}),
            SCAFFOLD_C_DELTA: to_record({k: np.ones_like(v) for k, v in c.items()}),
        }
    )
    content[METRICS] = MetricRecord({NUM_EXAMPLES: 2})
    config = {SITE_ID: site} if token is None else {SITE_ID: site, SCAFFOLD_TOKEN: token}
    content[CONFIG] = ConfigRecord(config)
    return Message(content, reply_to=msg)


def test_strategy_acknowledges_only_aggregated_replies(monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    s = Scaffold(min_train_nodes=2, min_available_nodes=2, num_clients=3)
    arrays = to_record(_model())
    msgs = list(s.configure_train(1, arrays, ConfigRecord(), _Grid([1, 2, 3])))
    assert all(m.content[CONFIG][SCAFFOLD_ACCEPTED] == [] for m in msgs)
    tokens = {1: "a" * 32, 2: "b" * 32, 3: "not hex!"}
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    replies = [_scaffold_reply(m, tokens[n], f"s{n}") for n, m in by_node.items()]
    arrays, _ = s.aggregate_train(1, replies)
    assert s.accepted == {"s1": "a" * 32, "s2": "b" * 32}  # s3's reply was rejected
    assert any(r.site == "s3" and SCAFFOLD_TOKEN in r.reason for r in s.rejected)
    np.testing.assert_allclose(s.c_global["w"], np.full(4, 2 / 3, np.float32))  # 2 of N = 3

    msgs = list(s.configure_train(2, arrays, ConfigRecord(), _Grid([1, 2, 3])))
    assert all(m.content[CONFIG][SCAFFOLD_ACCEPTED] == ["a" * 32, "b" * 32] for m in msgs)
    # round 2: s1's reply lost, s2 replies without a token (a site that commits at once), s3
    # with a good one
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    replies = [_scaffold_reply(by_node[2], None, "s2"), _scaffold_reply(by_node[3], "c" * 32, "s3")]
    s.aggregate_train(2, replies)
    assert s.accepted == {"s1": "a" * 32, "s3": "c" * 32}
    restored = Scaffold()
    restored.load_state_dict(s.state_dict())  # checkpointed with c
    assert restored.accepted == s.accepted


# --- (b), (c) the real ClientApp on the in-process grid -----------------------------------------

NODES = (10, 11, 12)  # site0, site1, site2
LOSER = 11  # site1: its round-2 train reply is lost


class ServerDied(BaseException):
    """The server process dies (not an error reply: nothing catches it)."""


def _clients(mode: str, strip_ack: bool = False, die_in_round: int | None = None):
    """The ClientApp on every node; node LOSER's round-2 train message is ``run`` normally
    (``ok``), run with its reply lost (``drop``) or never delivered (``skip``).

    ``strip_ack`` removes ``scaffold.accepted`` (a server without acknowledgement: sites
    commit c_k^+ at once). ``die_in_round``: the server dies while evaluating that round, after
    it aggregated the round's replies and before its checkpoint.
    """

    def client(msg: Message, ctx: Context) -> Message | None:
        config = msg.content.config_records[CONFIG]
        rnd = get_int(config, SERVER_ROUND, 0)
        train = msg.metadata.message_type == MessageType.TRAIN
        if not train and config.get(EVAL_SPLIT) == "val" and rnd == die_in_round:
            raise ServerDied
        if train and strip_ack:
            config.pop(SCAFFOLD_ACCEPTED, None)
        lost = train and ctx.node_id == LOSER and rnd == 2
        if lost and mode == "skip":
            return None
        reply = client_app(msg, ctx)
        return None if lost and mode == "drop" else reply

    return dict.fromkeys(NODES, client)


def _server_view(run_dir: Path) -> tuple[dict[str, np.ndarray], list[str], str]:
    """c, the accepted tokens and the run uid of the run's last checkpoint."""
    state = checkpoint.load(run_dir)
    c_prefix, t_prefix = f"{SCAFFOLD_C_GLOBAL}/", f"{SCAFFOLD_ACCEPTED}/"
    c = {
        k[len(c_prefix) :]: np.asarray(v)
        for k, v in state.strategy.items()
        if k.startswith(c_prefix)
    }
    tokens = [str(v) for k, v in state.strategy.items() if k.startswith(t_prefix)]
    return c, tokens, state.run_uid


def _committed(root: Path, run_dir: Path, acknowledged: bool) -> dict[str, Any]:
    """The server's c and each site's committed c_k, from the checkpoint and the site files."""
    c, tokens, uid = _server_view(run_dir)
    sites = {}
    for i in range(len(NODES)):
        path = root / f"site{i}"
        if acknowledged:
            sites[i] = control.committed_control(RecordDict(), path, uid, c, tokens).arrays
        else:  # committed at once: the last file
            sites[i] = control.load_control(RecordDict(), path, uid, 10**6, c)[0]
    return {"c": c, "sites": sites, "tokens": tokens}


class Killed(Exception):
    pass


def _kill_after(round_: int) -> Callable[[dict[str, Any]], None]:
    def after_round(record: dict[str, Any]) -> None:
        if record["round"] == round_:
            raise Killed

    return after_round


def _run(
    root: Path,
    out: Path,
    clients: dict[int, Callable[..., Message | None]],
    *,
    option: str = "ii",
    acknowledged: bool = True,
    resume: bool = False,
    expect: type[BaseException] | None = None,
    after_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) 3 rounds of Scaffold in ``out/run``; returns :func:`_committed` after
    round 3 (before the final evaluation drops the sites' files)."""
    overrides = {
        "strategy.name": "scaffold",
        "scaffold.option": option,
        "num-server-rounds": 3,
        "train.local-steps": 3,
        "round-timeout": 1.0,  # in process, replies come during the push: none is late
        "run.name": "run",
    }
    flat = tiny_config(root, out, overrides)
    if resume:
        flat["run.resume"] = str(out / "run")
    seen: dict[str, Any] = {}

    def after(record: dict[str, Any]) -> None:
        if record["round"] == 3:
            seen.update(_committed(root, out / "run", acknowledged))
        if after_round is not None:
            after_round(record)

    grid = InProcessGrid(clients, flat)
    if expect is None:
        res = run_federation(grid, parse_run_config(flat), after_round=after)
        assert res["status"] == "completed"
        assert [len(r["rejected"]) for r in res["rounds"]] == [0, 1, 0]  # the round-2 loss
    else:
        with pytest.raises(expect):
            run_federation(grid, parse_run_config(flat), after_round=after)
    return seen


def _gap(seen: dict[str, Any]) -> float:
    """max |c - mean_k c_k| / max |c| over the control keys."""
    c, sites = seen["c"], seen["sites"]
    worst = 0.0
    for k, ck in c.items():
        mean = np.mean([s[k].astype(np.float64) for s in sites.values()], axis=0)
        scale = max(float(np.abs(ck).max()), 1e-30)
        worst = max(worst, float(np.abs(ck - mean).max()) / scale)
    return worst


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sites(tmp_path_factory)


_RUNS: dict[tuple[str, str], dict[str, Any]] = {}


def _reference(root: Path, factory: pytest.TempPathFactory, mode: str, option: str):
    """The uninterrupted run with node LOSER's round-2 train message in ``mode`` (cached)."""
    if (mode, option) not in _RUNS:
        out = factory.mktemp(f"{mode}-{option}")
        _RUNS[mode, option] = _run(root, out, _clients(mode), option=option)
    return _RUNS[mode, option]


@pytest.mark.parametrize("option", ["i", "ii"])
def test_lost_reply_leaves_c_k_as_if_the_round_never_happened(
    root, tmp_path_factory, option
) -> None:
    dropped = _reference(root, tmp_path_factory, "drop", option)
    never = _reference(root, tmp_path_factory, "skip", option)
    loser = NODES.index(LOSER)
    _assert_same(dropped["sites"][loser], never["sites"][loser])
    _assert_same(dropped["c"], never["c"])
    assert len(dropped["tokens"]) == 3  # every site has an accepted reply (rounds 1 and 3)
    for seen in (dropped, never):
        assert _gap(seen) < 1e-5, _gap(seen)  # c = (1/N) sum_k c_k (float32)
    assert max(float(np.abs(v).max()) for v in dropped["c"].values()) > 0


def test_committing_before_acceptance_breaks_the_invariant(root, tmp_path) -> None:
    """The old behaviour (a server without acknowledgement: the site commits at once) on the
    same lost reply: c is no longer the mean of the c_k, which the tests above would see."""
    legacy = _run(root, tmp_path, _clients("drop", strip_ack=True), acknowledged=False)
    assert _gap(legacy) > 1e-2, _gap(legacy)


@pytest.mark.parametrize("crash", ["after-round-2", "in-round-2"])
def test_resume_keeps_the_invariant(root, tmp_path, tmp_path_factory, crash) -> None:
    """Killed after round 2's checkpoint, or while evaluating round 2 (its replies aggregated,
    sites' c_k^+ pending, no checkpoint yet: the resumed server re-runs round 2 from round 1's
    state and the sites discard what they kept of the lost attempt). The resumed run ends
    where the uninterrupted one does, with c the mean of the committed c_k."""
    reference = _reference(root, tmp_path_factory, "drop", "ii")
    if crash == "after-round-2":
        _run(root, tmp_path, _clients("drop"), expect=Killed, after_round=_kill_after(2))
        assert checkpoint.load(tmp_path / "run").round == 2
    else:
        _run(root, tmp_path, _clients("drop", die_in_round=2), expect=ServerDied)
        assert checkpoint.load(tmp_path / "run").round == 1
    resumed = _run(root, tmp_path, _clients("drop"), resume=True)  # new contexts: empty state
    assert _gap(resumed) < 1e-5, _gap(resumed)
    _assert_same(resumed["c"], reference["c"])
    for i in range(len(NODES)):
        _assert_same(resumed["sites"][i], reference["sites"][i])


# --- the site's side: pending, committed, files ------------------------------------------------


def test_site_commits_only_what_the_server_accepted(tmp_path) -> None:
    ref = {"w": np.zeros(3, np.float32)}

    def c(v: float) -> dict[str, np.ndarray]:
        return {"w": np.full(3, v, np.float32)}

    def resolve(state: RecordDict, accepted: set[str]) -> control.Control:
        return control.resolve_control(state, tmp_path, "uid", ref, accepted)

    files = RoundFiles(tmp_path, "uid", "scaffold_c")
    state = RecordDict()
    assert resolve(state, set()).round == 0
    t1 = control.keep_pending(state, tmp_path, "uid", 1, c(1), 0)
    assert resolve(state, {t1}).round == 1  # accepted: committed
    t2 = control.keep_pending(state, tmp_path, "uid", 2, c(2), 1)
    lost = resolve(state, {t1})  # round 2's reply never reached the server
    assert lost.round == 1 and lost.arrays["w"][0] == 1 and files.rounds() == [1]
    assert control.PENDING_ARRAYS not in state.array_records
    t3 = control.keep_pending(state, tmp_path, "uid", 3, c(3), 1)
    assert t2 not in (t1, t3)
    # a new Flower run (resume): an empty state reads the files
    now = resolve(RecordDict(), {t3, "f" * 32})
    assert now.round == 3 and now.arrays["w"][0] == 3 and files.rounds() == [1, 3]
    # a server back on its previous checkpoint (before round 3 was accepted) finds round 1
    back = resolve(RecordDict(), {t1})
    assert back.round == 1 and back.arrays["w"][0] == 1 and files.rounds() == [1]
    control.keep_pending(state, tmp_path, "uid", 4, c(4), 1)
    control.forget_run(state, tmp_path, "uid")
    assert not state.array_records and not files.rounds()

"""Many sites: partial participation (``sites-per-round``, a seeded Generator in the strategy
state), Scaffold's |S|/N with N = ``data.num-sites``, the sampled final evaluation and its
distribution (``final-eval-sites``, ``final_summary``), and a 100-site run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inprocess import InProcessGrid, set_task_identity
from test_app_support import tiny_config, tiny_sites

from client.app import app as client_app
from recon.config import parse_run_config
from server import checkpoint
from server.app import run_federation, strategy_from_config
from server.federation import final_eval_nodes
from server.results import final_summary, validate_results
from strategies.flower import build_strategy
from strategies.protocol import to_record


@pytest.fixture(scope="module")
def root6(tmp_path_factory: pytest.TempPathFactory):
    return tiny_sites(tmp_path_factory, 6)


def _grid(flat, n=6) -> InProcessGrid:
    return InProcessGrid({10 + i: client_app for i in range(n)}, flat)


def _final_arrays(run_dir) -> dict[str, np.ndarray]:
    ckpt = torch.load(run_dir / "final_model.pt", weights_only=True)
    return {k: v.numpy() for k, v in ckpt["state_dict"].items()}


class Killed(Exception):
    pass


# --- sampling, unit level ---------------------------------------------------------------------
class _Nodes:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


def _draws(strategy, grid, rounds):
    return [strategy._sample(grid, 1.0, 1, "train") for _ in range(rounds)]


def test_sites_per_round_draws_are_seeded_and_restored_from_the_state() -> None:
    grid = _Nodes(range(100, 112))
    a = build_strategy("fedavg", sites_per_round=3, sample_seed=7, min_available_nodes=2)
    first = _draws(a, grid, 2)
    assert all(len(s) == 3 and s == sorted(set(s)) for s in first)
    state = a.state_dict()
    later = _draws(a, grid, 3)
    b = build_strategy("fedavg", sites_per_round=3, sample_seed=123, min_available_nodes=2)
    b.load_state_dict(state)  # another seed: the state decides
    assert _draws(b, grid, 3) == later
    c = build_strategy("fedavg", sites_per_round=3, sample_seed=7, min_available_nodes=2)
    assert _draws(c, grid, 2) == first
    assert len({tuple(s) for s in first + later}) > 1  # not the same sites every round
    full = build_strategy("fedavg", min_available_nodes=2)  # fraction 1: all, in id order
    assert full._sample(grid, 1.0, 2, "train") == list(range(100, 112))


def test_fraction_fit_samples_with_the_seeded_generator() -> None:
    grid = _Nodes(range(20))

    def draws(seed):
        s = build_strategy("fedavg", fraction_train=0.25, sample_seed=seed, min_available_nodes=2)
        return [s._sample(grid, s.fraction_train, 2, "train") for _ in range(3)]

    assert [len(s) for s in draws(1)] == [5, 5, 5]
    assert draws(1) == draws(1) and draws(1) != draws(2)


def test_scaffold_partial_participation_weights_c_by_s_over_num_sites(tmp_path) -> None:
    """Karimireddy et al. Alg. 1: c <- c + (|S|/N) mean_S Delta c_k with N = data.num-sites."""
    flat = {"strategy.name": "scaffold", "data.num-sites": 10, "sites-per-round": 2}
    cfg = parse_run_config({**flat, "run.out": str(tmp_path)})
    s = strategy_from_config(cfg)
    assert s.num_clients == 10 and s.sites_per_round == 2
    set_task_identity()
    x = {"w": np.zeros(3, np.float32)}
    s._global = x
    s.num_nodes = 2  # only 2 nodes connected: N stays 10
    from strategies.flower import Reply

    replies = [
        Reply(f"site{k}", k, 1, {"w": np.ones(3, np.float32)}, {}, {"scaffold.c-delta": dc})
        for k, dc in enumerate(
            [{"w": np.full(3, 1.0, np.float32)}, {"w": np.full(3, 3.0, np.float32)}]
        )
    ]
    s._aggregate(x, replies)
    assert s.c_global is not None
    np.testing.assert_allclose(s.c_global["w"], 2 / 10 * 2.0)  # |S|/N x mean(1, 3)
    to_record(s.c_global)


def test_new_keys_are_validated(tmp_path) -> None:
    base = {"data.num-sites": 6, "run.out": str(tmp_path)}
    with pytest.raises(ValueError, match="sites-per-round"):
        parse_run_config({**base, "sites-per-round": 1, "min-fit-clients": 2})
    with pytest.raises(ValueError, match="sites-per-round"):
        parse_run_config({**base, "sites-per-round": 7})
    with pytest.raises(ValueError):
        parse_run_config({**base, "final-eval-sites": -1})
    assert parse_run_config({**base, "data.num-sites": 5000}).data.num_sites == 5000


def test_final_eval_nodes_default_and_sample(tmp_path) -> None:
    cfg = parse_run_config({"data.num-sites": 100, "run.out": str(tmp_path)})
    assert final_eval_nodes(range(20), cfg) == list(range(20))  # <= 32: all
    picked = final_eval_nodes(range(100, 0, -1), cfg)
    assert len(picked) == 32 and picked == sorted(set(picked))
    assert picked == final_eval_nodes(range(1, 101), cfg)  # seeded, order-free
    cfg5 = parse_run_config({"data.num-sites": 100, "final-eval-sites": 5, "run.out": "x"})
    assert len(final_eval_nodes(range(100), cfg5)) == 5
    # named nodes: the sample follows the site names, whatever ids a rerun's nodes got
    names_a = {n: f"site{n:03d}" for n in range(100)}
    names_b = {500 + 3 * (99 - n): f"site{n:03d}" for n in range(100)}  # other ids, reversed
    got_a = [names_a[n] for n in final_eval_nodes(names_a, cfg5, names_a)]
    got_b = [names_b[n] for n in final_eval_nodes(names_b, cfg5, names_b)]
    assert got_a == got_b and len(set(got_a)) == 5
    assert got_a != [names_b[n] for n in final_eval_nodes(names_b, cfg5)]  # by id: others


def test_final_summary_reports_mean_quartiles_and_worst_site() -> None:
    per_site = {
        f"site{k}": {"ssim": 0.5 + 0.1 * k, "nrmse": 0.5 - 0.1 * k, "psnr": 20.0 + k}
        for k in range(5)
    }
    out = final_summary(per_site, 10)
    assert out["evaluated"] == 5 and out["num_sites"] == 10
    assert out["ssim"]["worst_site"] == "site0" and out["ssim"]["worst"] == pytest.approx(0.5)
    assert out["nrmse"]["worst_site"] == "site0"  # lower is better
    assert out["psnr"]["median"] == pytest.approx(22.0)
    assert out["psnr"]["q1"] == pytest.approx(21.0) and out["psnr"]["q3"] == pytest.approx(23.0)
    assert out["ssim"]["mean"] == pytest.approx(0.7)


# --- end to end: a resumed run samples the same sites -----------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_partial_participation_is_reproducible_across_a_resume(root6, tmp_path, strategy) -> None:
    base = {
        "strategy.name": strategy,
        "num-server-rounds": 3,
        "train.local-steps": 3,
        "sites-per-round": 2,
        "eval-mode": "piggyback",
        "train.seed": 5,
    }
    full = tiny_config(root6, tmp_path / "full", {**base, "run.name": "full"})
    res_full = run_federation(_grid(full), parse_run_config(full))
    validate_results(res_full)
    per_round = [sorted(r["train"]) for r in res_full["rounds"]]
    assert [len(s) for s in per_round] == [2, 2, 2], per_round
    assert len({tuple(s) for s in per_round}) > 1, per_round  # the sample changes
    expected = _final_arrays(tmp_path / "full" / "full")

    cut = tiny_config(root6, tmp_path / "cut", {**base, "run.name": "cut"})

    def kill_after_round_1(record):
        if record["round"] == 1:
            raise Killed

    with pytest.raises(Killed):
        run_federation(_grid(cut), parse_run_config(cut), after_round=kill_after_round_1)
    run_dir = tmp_path / "cut" / "cut"
    assert checkpoint.load(run_dir).round == 1
    resumed = {**cut, "run.resume": str(run_dir)}
    # A restarted simulation gives every node a new id: other ids, in another order than the
    # sites' (site k is partition k). The sample follows the site names, not the ids.
    partitions = [3, 0, 5, 1, 4, 2]
    new_ids = {
        900 - 7 * i: {"partition-id": p, "num-partitions": 6} for i, p in enumerate(partitions)
    }
    grid = InProcessGrid({n: client_app for n in new_ids}, resumed, node_configs=new_ids)
    res = run_federation(grid, parse_run_config(resumed))
    assert [sorted(r["train"]) for r in res["rounds"]] == per_round
    got = _final_arrays(run_dir)
    assert list(got) == list(expected)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # 6 sites <= 32: every site in the final evaluation, and its distribution
    assert sorted(res["final"]["federated"]) == [f"site{k}" for k in range(6)]
    assert res["final_summary"]["evaluated"] == 6


# --- lazy sites -------------------------------------------------------------------------------
def _plan(n_sites: int) -> dict:
    from test_app_support import TINY

    return {
        "n_sites": n_sites,
        "n_slices": TINY["data.synth-slices"],
        "seed": 0,
        "matrix": TINY["data.synth-size"],
        "iid": False,
        "overrides": {"num_coils": TINY["data.synth-coils"]},
    }


def test_a_lazy_site_is_the_site_generate_sites_writes(tmp_path) -> None:
    import json

    import h5py

    from recon.data import generate_sites
    from recon.data.lazy import ensure_site, write_plan

    plan = _plan(3)
    eager, lazy = tmp_path / "eager", tmp_path / "lazy"
    generate_sites(eager, **plan)
    write_plan(lazy, **plan)
    assert ensure_site(lazy, 2) == lazy / "site2"
    assert not (lazy / "site0").exists() and not (lazy / "site1").exists()
    assert ensure_site(lazy, 3) is None  # outside the plan
    assert ensure_site(tmp_path / "no-plan", 0) is None
    a, b = (json.loads((r / "site2" / "site.json").read_text()) for r in (eager, lazy))
    assert a == b
    for rel in a["files"]["train"]:
        with h5py.File(eager / "site2" / rel) as fa, h5py.File(lazy / "site2" / rel) as fb:
            np.testing.assert_array_equal(fa["kspace"][()], fb["kspace"][()])
    assert sorted(p.name for p in lazy.iterdir() if p.name.startswith(".site2.tmp")) == []


def _ensure(args):
    from recon.data.lazy import ensure_site

    return str(ensure_site(*args))


def test_racing_processes_write_a_lazy_site_once(tmp_path) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    from recon.data.lazy import write_plan

    write_plan(tmp_path, **_plan(2))
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        got = list(pool.map(_ensure, [(tmp_path, 1), (tmp_path, 1)]))
    assert got == [str(tmp_path / "site1")] * 2
    assert (tmp_path / "site1" / "site.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.slow
def test_a_hundred_lazy_sites_run_in_process(tmp_path) -> None:
    """100 sites, 4 sampled per round, 2 rounds, 4 in the final evaluation: only the sites
    sampled are ever written, and the run completes in well under a few minutes."""
    import time

    from recon.data.lazy import write_plan

    root = tmp_path / "sites"
    write_plan(root, **_plan(100))
    flat = tiny_config(root, tmp_path / "runs", {"strategy.name": "scaffold"})
    flat.update({"data.num-sites": 100, "sites-per-round": 4, "final-eval-sites": 4})
    flat.update({"eval-mode": "piggyback", "train.local-steps": 2, "run.name": "hundred"})
    t0 = time.perf_counter()
    res = run_federation(_grid(flat, n=100), parse_run_config(flat))
    seconds = time.perf_counter() - t0
    assert res["status"] == "completed", res["status"]
    assert [len(r["train"]) for r in res["rounds"]] == [4, 4]
    assert len(res["final"]["federated"]) == 4 and res["final_summary"]["num_sites"] == 100
    written = sorted(p.name for p in root.glob("site*"))
    used = {s for r in res["rounds"] for s in [*r["train"], *r["eval"]]}
    used |= set(res["final"]["federated"])
    assert set(written) == used and len(written) <= 16
    print(f"100 lazy sites, 2 rounds of 4: {seconds:.1f} s, {len(written)} sites written")
    assert seconds < 180, seconds


def test_report_shows_the_distribution_over_sites() -> None:
    from fedunroll.report import distribution_table

    per_site = {f"site{k}": {"ssim": 0.6 + 0.01 * k, "nrmse": 0.3, "psnr": 25.0} for k in range(8)}
    text = distribution_table({"final_summary": final_summary(per_site, 1000)})
    assert text is not None
    assert "8 of 1000 sites evaluated" in text and "| ssim | 0.6350 |" in text
    assert "| site0 |" in text
    assert distribution_table({}) is None

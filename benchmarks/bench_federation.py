"""Framework overhead of a federated round and bytes on the wire, written as JSON.

Two runs of the same federation:

* ``simulation``: ``fedunroll simulate`` (SuperLink + Ray, ``sim.client-cpus`` per client): the
  wall time of each round at the server vs the clients' own train time reported in their
  replies (``seconds``), summed over sites, and that sum divided by the number of clients that
  can run at once (``parallel``, the Ray CPU slots);
* ``inprocess``: the same rounds with the ClientApps called directly (no Flower transport, no
  Ray, one after the other), where the round wall time is pure client compute plus the strategy.

``overhead_seconds = round_seconds - client_seconds_sum / parallel`` (>= what Flower + Ray add;
the evaluate phase's compute is inside it). Bytes per round are compared with the model size,
per site and per direction (``eval-mode = "piggyback"``, the default, ships the model once
each way; ``"separate"`` twice down). Round 1 is compared with the steady rounds
(``first_over_steady_round``); in the simulation, the time before round 1 (SuperLink and Ray
start-up, the ServerApp waiting for the SuperNodes) and after the last round (final
evaluation, shutdown) is reported apart (``outside_rounds_seconds``), and Ray's own start-up
is timed alone (``ray_init_seconds``: ``ray.init`` to a first task's result, then shutdown).

    python benchmarks/bench_federation.py --out benchmarks/results/federation.json
    python benchmarks/bench_federation.py --set model.num-unrolls=6 --set data.synth-size=128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

for _k, _v in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}.items():
    os.environ.setdefault(_k, _v)

DEFAULTS: dict[str, Any] = {
    "strategy.name": "fedavg",
    "num-server-rounds": 4,
    "train.local-steps": 10,
    "model.num-unrolls": 2,
    "model.cg-iters": 2,
    "data.num-sites": 4,
    "data.synth-slices": 20,
    "data.synth-size": 64,
    "data.synth-coils": 4,
    "run.local-only": False,
}


def _rounds(data: dict[str, Any], parallel: float) -> list[dict[str, Any]]:
    rows = []
    for r in data["rounds"]:
        client = [s["seconds"] for s in r["train"].values()]
        total = float(sum(client))
        rows.append(
            {
                "round": r["round"],
                "round_seconds": r["seconds"],
                "client_seconds_sum": total,
                "client_seconds_max": float(max(client)),
                "parallel": parallel,
                "overhead_seconds": r["seconds"] - total / parallel,
                "bytes_sent": r["bytes_sent"],
                "bytes_received": r["bytes_received"],
            }
        )
    return rows


def _summary(rows: list[dict[str, Any]], model_bytes: int, n_sites: int) -> dict[str, Any]:
    # round 1 includes process start-up, imports and data loading; the last round of
    # eval-mode piggyback adds the one evaluate exchange of the run
    steady = rows[1:-1] or rows[1:] or rows
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    return {
        "first_round_seconds": rows[0]["round_seconds"],
        "median_round_seconds": med("round_seconds"),
        "first_over_steady_round": rows[0]["round_seconds"] / med("round_seconds"),
        "median_client_seconds_sum": med("client_seconds_sum"),
        "median_overhead_seconds": med("overhead_seconds"),
        "overhead_fraction": med("overhead_seconds") / med("round_seconds"),
        # round wall time / (client compute spread over the parallel slots); target <= 1.10
        "round_over_spread_client": statistics.median(
            r["round_seconds"] / (r["client_seconds_sum"] / r["parallel"]) for r in steady
        ),
        "bytes_sent_per_round": med("bytes_sent"),
        "bytes_received_per_round": med("bytes_received"),
        "model_bytes": model_bytes,
        "sent_per_round_over_model": med("bytes_sent") / model_bytes,
        "sent_per_site_per_round_over_model": med("bytes_sent") / model_bytes / n_sites,
        "received_per_site_per_round_over_model": med("bytes_received") / model_bytes / n_sites,
        "all_rounds_sent_per_site_per_round_over_model": (
            sum(r["bytes_sent"] for r in rows) / len(rows) / model_bytes / n_sites
        ),
    }


def run_simulation(flat: dict[str, Any], out: Path) -> dict[str, Any]:
    from fedunroll.simulate import build_config, ensure_sites, pin_run_dir
    from fedunroll.simulate import run_simulation as simulate
    from server.results import read

    cfg = pin_run_dir(build_config({**flat, "run.name": "bench-simulation"}, out=str(out)))
    ensure_sites(cfg)
    t0 = time.perf_counter()
    run_dir = simulate(cfg, quiet=True)
    wall = time.perf_counter() - t0
    data = read(run_dir)
    parallel = max(1.0, min(cfg.data.num_sites, (os.cpu_count() or 1) / cfg.sim.client_cpus))
    rows = _rounds(data, parallel)
    return {
        "command_seconds": wall,
        "outside_rounds_seconds": wall - sum(r["round_seconds"] for r in rows),
        "rounds": rows,
        **_summary(rows, data["model"]["bytes"], cfg.data.num_sites),
    }


def ray_startup(cpus: int) -> dict[str, float]:
    """Seconds for ``ray.init`` and a first remote task's result (a worker started), and for
    ``ray.shutdown``: what a simulation pays before any ClientApp runs."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        ray.get(ray.remote(lambda: 1).remote())
        up = time.perf_counter() - t0
    finally:
        t1 = time.perf_counter()
        ray.shutdown()
    return {"ray_init_seconds": up, "ray_shutdown_seconds": time.perf_counter() - t1}


def run_inprocess(flat: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch

    # The in-process grid is a test double (tests/inprocess.py), not part of the product.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from inprocess import InProcessGrid

    from client.app import app as client_app
    from fedunroll.simulate import build_config, ensure_sites, pin_run_dir
    from server.app import run_federation

    torch.set_num_threads(1)
    cfg = pin_run_dir(build_config({**flat, "run.name": "bench-inprocess"}, out=str(out)))
    ensure_sites(cfg)
    grid = InProcessGrid({10 + i: client_app for i in range(cfg.data.num_sites)}, cfg.flat())
    t0 = time.perf_counter()
    data = run_federation(grid, cfg)
    wall = time.perf_counter() - t0
    rows = _rounds(data, 1.0)
    return {
        "command_seconds": wall,
        "handler_seconds_total": float(sum(grid.client_seconds)),
        "rounds": rows,
        **_summary(rows, data["model"]["bytes"], cfg.data.num_sites),
    }


def main(argv: list[str] | None = None) -> int:
    from fedunroll.overrides import parse_sets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "federation.json"))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="run-config override")
    p.add_argument("--data-root", help="site folder (default: a temporary synthetic one)")
    p.add_argument("--skip-simulation", action="store_true")
    p.add_argument("--skip-inprocess", action="store_true")
    args = p.parse_args(argv)

    flat = {**DEFAULTS, **parse_sets(args.set)}
    report: dict[str, Any] = {
        "benchmark": "fedunroll.federation/1",
        "config": flat,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-federation-") as tmp:
        flat["data.root"] = args.data_root or str(Path(tmp) / "sites")
        if not args.skip_inprocess:
            report["inprocess"] = run_inprocess(flat, Path(tmp) / "runs")
        if not args.skip_simulation:
            report["simulation"] = run_simulation(flat, Path(tmp) / "runs")
            report["simulation"].update(ray_startup(os.cpu_count() or 1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for mode in ("inprocess", "simulation"):
        if mode in report:
            r = report[mode]
            print(
                f"{mode:>10}: round {r['median_round_seconds']:.2f} s "
                f"(first {r['first_round_seconds']:.1f} s), "
                f"client compute {r['median_client_seconds_sum']:.2f} s, overhead "
                f"{r['median_overhead_seconds']:.2f} s ({100 * r['overhead_fraction']:.0f}%), "
                f"{r['sent_per_site_per_round_over_model']:.2f}x / "
                f"{r['received_per_site_per_round_over_model']:.2f}x model bytes per site per "
                f"round sent / received, first round {r['first_over_steady_round']:.1f}x steady"
            )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

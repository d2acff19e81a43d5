"""Privacy-utility of slice-level DP-SGD in a small federation (README "Privacy").

Federation: 3 synthetic non-IID sites (32x32, 4 coils, ``--slices`` slices each, split 50/25/25
into train/val/test), FedAvg, MoDL with 2 unrolls / 2 CG steps / 8-channel U-Net, ``--rounds``
rounds of ``--steps`` local steps (batch 1, Adam 1e-3), in process (tests/inprocess.py).
For each epsilon target in {1, 3, 8} (delta = 1e-5 per site) the noise multiplier is the
smallest with which every site stays within the target after all rounds (Opacus's RDP
accountant, Poisson rate 1 / N_k); epsilon = inf is the same training without DP (no clipping,
no noise). Reported on each site's test slices: mean and worst-site SSIM / PSNR of the final
global model, and zero-filled, over ``--seeds`` seeds.

    .venv/bin/python benchmarks/bench_privacy.py            # ~3-6 min on 2 CPU cores

Writes benchmarks/results/privacy_cpu.json and privacy_cpu.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DELTA = 1e-5
TARGETS = (1.0, 3.0, 8.0, math.inf)


def make_sites(root: Path, slices: int) -> None:
    from recon.data import generate_sites, prepare_site

    generate_sites(root, n_sites=3, n_slices=slices, matrix=32, overrides={"num_coils": 4})
    for k in range(3):
        prepare_site(root / f"site{k}", progress=False)


def base_config(root: Path, out: Path, rounds: int, steps: int) -> dict[str, Any]:
    return {
        "strategy.name": "fedavg",
        "num-server-rounds": rounds,
        "min-fit-clients": 3,
        "min-available-clients": 3,
        "node-wait-timeout": 5.0,
        "train.local-steps": steps,
        "model.num-unrolls": 2,
        "model.cg-iters": 2,
        "model.unet-chans": 8,
        "data.root": str(root),
        "data.num-sites": 3,
        "run.out": str(out),
        "run.local-only": False,
    }


def noise_for(target: float, sizes: list[int], steps: int) -> float:
    """The smallest sigma keeping every site (rate 1 / N_k) within ``target`` after ``steps``."""
    from recon.train.privacy import noise_for_epsilon

    return max(noise_for_epsilon(target, 1 / n, steps, DELTA) for n in sizes)


def run(flat: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))  # the in-process grid is a test double
    from inprocess import InProcessGrid

    from client.app import app as client_app
    from recon.config import parse_run_config
    from server.app import run_federation

    cfg = parse_run_config(flat)
    grid = InProcessGrid({10 + i: client_app for i in range(3)}, cfg.flat())
    return run_federation(grid, cfg)


def summarize(res: dict[str, Any], key: str) -> dict[str, float]:
    sites = res["final"][key]
    ssim = [m["ssim"] for m in sites.values()]
    psnr = [m["psnr"] for m in sites.values()]
    return {
        "ssim_mean": statistics.fmean(ssim),
        "ssim_worst": min(ssim),
        "psnr_mean": statistics.fmean(psnr),
        "psnr_worst": min(psnr),
    }


def initial_metrics(root: Path, flat: dict[str, Any]) -> dict[str, float]:
    """The untrained x_0 every run starts from (train.seed 0), on each site's test slices:
    what training, private or not, adds to."""
    from recon.config import parse_run_config
    from recon.data import SiteDataset
    from recon.train import evaluate
    from server.app import initial_model

    model = initial_model(parse_run_config(flat))
    sites = {
        f"site{k}": evaluate(model, SiteDataset(root / f"site{k}", split="test")).as_dict()  # type: ignore[arg-type]
        for k in range(3)
    }
    return summarize({"final": {"x0": sites}}, "x0")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "privacy_cpu"))
    args = ap.parse_args(argv)

    import torch

    from recon.data import SiteDataset

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sites"
        make_sites(root, args.slices)
        sizes = [len(SiteDataset(root / f"site{k}", split="train")) for k in range(3)]
        total_steps = args.rounds * args.steps
        untrained = initial_metrics(root, base_config(root, Path(tmp), 1, 1))
        for target in TARGETS:
            sigma = None if math.isinf(target) else noise_for(target, sizes, total_steps)
            for seed in range(args.seeds):
                flat = base_config(root, Path(tmp) / "runs", args.rounds, args.steps)
                flat.update({"train.seed": seed, "run.name": f"eps{target}-seed{seed}"})
                if sigma is not None:
                    flat.update({"dp.enabled": True, "dp.noise-multiplier": sigma})
                t = time.perf_counter()
                res = run(flat)
                row = {
                    "epsilon_target": None if math.isinf(target) else target,
                    "noise_multiplier": sigma,
                    "seed": seed,
                    "seconds": time.perf_counter() - t,
                    "epsilon_sites": res.get("privacy", {}).get("slice_level", {}).get("epsilon"),
                    "federated": summarize(res, "federated"),
                    "zero_filled": summarize(res, "zero_filled"),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = []
    for target in TARGETS:
        t_rows = [r for r in rows if (r["epsilon_target"] or math.inf) == target]
        entry: dict[str, Any] = {
            "epsilon": None if math.isinf(target) else target,
            "noise_multiplier": t_rows[0]["noise_multiplier"],
        }
        for k in ("ssim_mean", "ssim_worst", "psnr_mean", "psnr_worst"):
            vals = [r["federated"][k] for r in t_rows]
            entry[k] = statistics.fmean(vals)
            entry[k + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        table.append(entry)
    zf = {k: statistics.fmean(r["zero_filled"][k] for r in rows) for k in rows[0]["zero_filled"]}
    out = {
        "benchmark": "privacy",
        "setup": {
            "sites": 3,
            "train_slices": sizes,
            "matrix": 32,
            "coils": 4,
            "rounds": args.rounds,
            "local_steps": args.steps,
            "batch": "Poisson, rate 1 / N_k (expected 1 slice per step)",
            "clip": 1.0,
            "delta": DELTA,
            "accountant": "rdp (Opacus)",
            "strategy": "fedavg",
            "model": "MoDL Nu=2, NCG=2, U-Net 8 channels",
            "seeds": args.seeds,
        },
        "machine": {"platform": platform.platform(), "torch_threads": 1},
        "table": table,
        "zero_filled": zf,
        "untrained": untrained,
        "runs": rows,
        "total_seconds": time.perf_counter() - t0,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    plot(out, path.with_suffix(".png"))
    print(json.dumps({"table": table, "zero_filled": zf, "untrained": untrained}, indent=2))
    return 0


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = out["table"]
    labels = [("inf" if e["epsilon"] is None else f"{e['epsilon']:g}") for e in table]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("ssim", "psnr")):
        x = range(len(table))
        for kind, style in (("mean", "o-"), ("worst", "s--")):
            ys = [e[f"{metric}_{kind}"] for e in table]
            err = [e[f"{metric}_{kind}_sd"] for e in table]
            ax.errorbar(list(x), ys, yerr=err, fmt=style, capsize=3, label=f"{kind} site")
        ax.axhline(out["zero_filled"][f"{metric}_mean"], color="gray", ls=":", label="zero-filled")
        ax.axhline(out["untrained"][f"{metric}_mean"], color="k", ls="-.", label="untrained x0")
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("epsilon per site (delta 1e-5)")
        ax.set_ylabel(metric.upper())
        ax.legend(fontsize=8)
    fig.suptitle("Slice-level DP-SGD, 3 sites, FedAvg (mean +- sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""Privacy-utility of slice-level DP-SGD in the default federation (README "Privacy").

Federation: the default job of ``fedunroll simulate`` / ``make run``, read from the run
config's defaults (``RunConfig()``, not copied here): the ``data.num-sites`` synthetic non-IID
sites that ``fedunroll.simulate.ensure_sites`` generates from ``data.synth-slices``,
``data.synth-size``, ``data.synth-coils`` and ``data.seed`` (``generate_sites``, split 70/15/15
by volume), the default model, strategy, rounds, local steps, batch and learning rate, in
process (tests/inprocess.py). The only keys changed are ``run.out``, ``run.name``,
``data.root`` (a temporary folder), ``run.local-only = false`` (no baselines),
``node-wait-timeout`` (small: the in-process sites are there at once), ``train.seed`` (one per
seed) and the ``dp.*`` keys. The strategy is the default one when ``dp.enabled`` accepts it
(``RunConfig`` validation; today Scaffold with option ii, whose control variates are computed
from the DP-SGD update); should the default ever be refused, the closest allowed rule, FedAvg,
runs instead, and ``setup.strategy`` / ``setup.strategy_reason`` in the JSON say so.

For each epsilon target in {1, 3, 8} (``dp.delta`` = 1e-5 per site) the noise multiplier is
the smallest with which every site stays within the target after all rounds: Opacus's RDP
accountant via ``recon.train.privacy.noise_for_epsilon``, at each site's own Poisson rate
``batch-size / N_k`` (N_k counted from the site's generated training split) over
``rounds x local steps`` steps, the largest over the sites. epsilon = inf is the same training
without DP (no clipping, no noise): the non-private reference. Reported on each site's test
slices: mean and worst-site SSIM / PSNR of the final global model, zero-filled, and the
untrained x_0, over ``--seeds`` seeds (means, sd and the per-seed values), the epsilon each
site reached (``results.json`` ``privacy``) and the wall time of every run. A seed is
``train.seed`` (initial weights, slice order); DP-SGD's sampling and noise come from the OS
(``recon.train.privacy``), so a private run does not repeat exactly even at one seed.

    .venv/bin/python benchmarks/bench_privacy.py            # 8 runs, ~20 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_privacy.py --quick    # smoke: tiny sites, 2 x 2 steps

Writes benchmarks/results/privacy_cpu.json and privacy_cpu.png (``--quick``: a temporary
folder unless ``--out`` says where).
"""

from __future__ import annotations

import argparse
import io
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
METRICS = ("ssim_mean", "ssim_worst", "psnr_mean", "psnr_worst")
FALLBACK_STRATEGY = "fedavg"
NODE_WAIT = 5.0  # seconds; the in-process sites are there at once
# --quick: a smoke run of the same code path (tiny sites and model, 2 rounds x 2 local steps).
QUICK = {
    "num-server-rounds": 2,
    "train.local-steps": 2,
    "data.synth-slices": 15,
    "data.synth-size": 32,
    "data.synth-coils": 4,
    "model.num-unrolls": 2,
    "model.cg-iters": 2,
    "model.unet-chans": 8,
}


def default_flat() -> dict[str, Any]:
    """The default job's flat run config (what ``fedunroll simulate`` starts from)."""
    from recon.config import parse_run_config

    return parse_run_config({}).flat()


def choose_strategy(flat: dict[str, Any]) -> tuple[str, str | None]:
    """(strategy, why it is not the default one, or None): the configured strategy if
    ``dp.enabled`` accepts it, else FedAvg with the validation's refusal as the reason."""
    from recon.config import ConfigError, parse_run_config

    name = str(flat["strategy.name"])
    try:
        parse_run_config({**flat, "dp.enabled": True, "dp.noise-multiplier": 1.0})
    except ConfigError as err:
        return FALLBACK_STRATEGY, f"{name} refused with dp.enabled: {err}"
    return name, None


def make_sites(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Generate the sites as ``fedunroll simulate`` does and load every split once (coil maps
    cached before the timed runs); returns each site's slice counts and preset."""
    from fedunroll.simulate import ensure_sites
    from recon.config import parse_run_config
    from recon.data import SiteDataset

    cfg = parse_run_config(flat)
    log = io.StringIO()
    out: dict[str, dict[str, Any]] = {}
    for site in ensure_sites(cfg, log=log):
        info = json.loads((site / "site.json").read_text())
        counts = {}
        for split in ("train", "val", "test"):
            limit = (cfg.data.max_train_slices or None) if split == "train" else None
            ds = SiteDataset(site, split=split, **cfg.data.dataset_kwargs(max_slices=limit))
            counts[split] = len(ds)
        preset = info["preset"]
        out[site.name] = {
            "preset": preset["name"],
            "matrix": preset["matrix"],
            "coils": preset["num_coils"],
            "slices": counts,
        }
    return out


def noise_for(flat: dict[str, Any], target: float, train_slices: dict[str, int]) -> float:
    """The smallest sigma keeping every site (rate ``batch-size / N_k``) within ``target`` after
    all rounds, as the site accounts for it (``client.privacy.site_epsilon``)."""
    from recon.config import parse_run_config
    from recon.train.privacy import noise_for_epsilon, sample_rate, steps_per_round

    cfg = parse_run_config(flat)
    train = cfg.train.model_copy(update={"steps": cfg.local_steps or None})
    rounds = cfg.federation.num_server_rounds
    return max(
        noise_for_epsilon(
            target,
            sample_rate(cfg.train.batch_size, n),
            rounds * steps_per_round(train, n),
            cfg.dp.delta,
            cfg.dp.accountant,
        )
        for n in train_slices.values()
    )


def planned_epsilon(flat: dict[str, Any], train_slices: dict[str, int]) -> dict[str, float]:
    """Each site's epsilon after all rounds as its client computes it (a check of
    :func:`noise_for` before the run)."""
    from client.privacy import site_epsilon
    from recon.config import parse_run_config

    cfg = parse_run_config(flat)
    rounds = cfg.federation.num_server_rounds
    return {s: site_epsilon(cfg, n, rounds) for s, n in train_slices.items()}


def run(flat: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))  # the in-process grid is a test double
    from inprocess import InProcessGrid

    from client.app import app as client_app
    from recon.config import parse_run_config
    from server.app import run_federation

    cfg = parse_run_config(flat)
    n = cfg.data.num_sites
    grid = InProcessGrid({10 + i: client_app for i in range(n)}, cfg.flat())
    return run_federation(grid, cfg)


def summarize(sites: dict[str, dict[str, float]]) -> dict[str, Any]:
    ssim = {s: m["ssim"] for s, m in sites.items()}
    psnr = {s: m["psnr"] for s, m in sites.items()}
    return {
        "ssim_mean": statistics.fmean(ssim.values()),
        "ssim_worst": min(ssim.values()),
        "psnr_mean": statistics.fmean(psnr.values()),
        "psnr_worst": min(psnr.values()),
        "worst_site": {
            "ssim": min(ssim, key=ssim.__getitem__),
            "psnr": min(psnr, key=psnr.__getitem__),
        },
        "sites": {s: {"ssim": ssim[s], "psnr": psnr[s]} for s in sites},
    }


def initial_metrics(flat: dict[str, Any], sites: list[str]) -> dict[str, Any]:
    """The untrained x_0 a run starts from (its ``train.seed``), on each site's test slices:
    what training, private or not, adds to."""
    from recon.config import parse_run_config
    from recon.data import SiteDataset
    from recon.train import evaluate
    from server.app import initial_model

    cfg = parse_run_config(flat)
    model = initial_model(cfg)
    root = Path(cfg.data.root)
    kwargs = cfg.data.dataset_kwargs()
    return summarize(
        {
            s: evaluate(model, SiteDataset(root / s, split="test", **kwargs)).as_dict()  # type: ignore[arg-type]
            for s in sites
        }
    )


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def table_entry(target: float, t_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One epsilon target over the seeds (keys as before: ``ssim_mean``, ``ssim_mean_sd``, ...)."""
    reached: dict[str, float] = {}
    for r in t_rows:
        for s, e in (r["epsilon_sites"] or {}).items():
            reached[s] = max(reached.get(s, 0.0), e)
    entry: dict[str, Any] = {
        "epsilon": None if math.isinf(target) else target,
        "noise_multiplier": t_rows[0]["noise_multiplier"],
        "epsilon_reached": reached or None,
        "epsilon_reached_max": max(reached.values()) if reached else None,
    }
    for k in METRICS:
        st = _stats([r["federated"][k] for r in t_rows])
        entry[k], entry[k + "_sd"], entry[k + "_per_seed"] = st["mean"], st["sd"], st["per_seed"]
    for k in METRICS:
        entry["zero_filled_" + k] = statistics.fmean(r["zero_filled"][k] for r in t_rows)
    secs = [r["seconds"] for r in t_rows]
    entry["seconds"], entry["seconds_per_seed"] = statistics.fmean(secs), secs
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sites, 2 x 2 steps")
    ap.add_argument("--rounds", type=int, help="num-server-rounds (default: the run config's)")
    ap.add_argument("--steps", type=int, help="train.local-steps (default: the run config's)")
    ap.add_argument("--slices", type=int, help="data.synth-slices (default: the run config's)")
    ap.add_argument("--seeds", type=int, default=2, help="train.seed 0 .. SEEDS-1")
    ap.add_argument("--out", help="output path without suffix (default results/privacy_cpu)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    for key, value in (
        ("num-server-rounds", args.rounds),
        ("train.local-steps", args.steps),
        ("data.synth-slices", args.slices),
    ):
        if value is not None:
            overrides[key] = value
    if args.out:
        out_path = Path(args.out)
    elif args.quick:
        out_path = Path(tempfile.gettempdir()) / "privacy_quick_cpu"
    else:
        out_path = RESULTS / "privacy_cpu"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = {
            **default_flat(),
            **overrides,
            "data.root": str(Path(tmp) / "sites"),
            "run.out": str(Path(tmp) / "runs"),
            "run.local-only": False,
            "node-wait-timeout": NODE_WAIT,
            "dp.delta": DELTA,
        }
        strategy, reason = choose_strategy(base)
        base["strategy.name"] = strategy
        sites = make_sites(base)
        train_slices = {s: info["slices"]["train"] for s, info in sites.items()}
        print(json.dumps({"sites": sites, "strategy": strategy}), flush=True)
        from recon.config import parse_run_config

        cfg0 = parse_run_config(base)
        rounds, local = cfg0.federation.num_server_rounds, cfg0.local_steps
        untrained = [
            initial_metrics({**base, "train.seed": seed}, list(sites)) for seed in range(args.seeds)
        ]
        for target in TARGETS:
            dp: dict[str, Any] = {"dp.enabled": False}
            sigma = None
            if not math.isinf(target):
                sigma = noise_for(base, target, train_slices)
                dp = {"dp.enabled": True, "dp.noise-multiplier": sigma}
                planned = planned_epsilon({**base, **dp}, train_slices)
                assert max(planned.values()) <= target * 1.001, (target, planned)
            for seed in range(args.seeds):
                flat = {**base, **dp, "train.seed": seed, "run.name": f"eps{target}-seed{seed}"}
                t = time.perf_counter()
                res = run(flat)
                if res.get("status") != "completed":
                    raise RuntimeError(f"run eps={target} seed={seed}: {res.get('status')}")
                row = {
                    "epsilon_target": None if math.isinf(target) else target,
                    "noise_multiplier": sigma,
                    "seed": seed,
                    "seconds": time.perf_counter() - t,
                    "epsilon_sites": res.get("privacy", {}).get("slice_level", {}).get("epsilon"),
                    "federated": summarize(res["final"]["federated"]),
                    "zero_filled": summarize(res["final"]["zero_filled"]),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        config = parse_run_config({**base, "train.seed": 0}).flat()
    table = [
        table_entry(target, [r for r in rows if (r["epsilon_target"] or math.inf) == target])
        for target in TARGETS
    ]
    non_private = table[-1]
    for entry in table:
        entry["minus_non_private"] = {k: entry[k] - non_private[k] for k in METRICS}
    zf = {k: statistics.fmean(r["zero_filled"][k] for r in rows) for k in METRICS}
    x0 = {k: statistics.fmean(u[k] for u in untrained) for k in METRICS}
    out = {
        "benchmark": "privacy",
        "setup": {
            "federation": "quick smoke run (--quick)" if args.quick else "default (RunConfig())",
            "overrides": {
                **overrides,
                "run.local-only": False,
                "node-wait-timeout": NODE_WAIT,
                "dp.delta": DELTA,
                "train.seed": list(range(args.seeds)),
                "dp.enabled / dp.noise-multiplier": "per epsilon target (table)",
            },
            "sites": sites,
            "train_slices": train_slices,
            "rounds": rounds,
            "local_steps": local,
            "total_steps": rounds * local,
            "batch": f"Poisson, rate train.batch-size / N_k (batch-size {cfg0.train.batch_size})",
            "clip": cfg0.dp.clip,
            "delta": DELTA,
            "accountant": f"{cfg0.dp.accountant} (Opacus)",
            "strategy": strategy,
            "strategy_default": default_flat()["strategy.name"],
            "strategy_reason": reason
            or "the default strategy: the run config accepts it with dp.enabled",
            "model": cfg0.model.model_dump(by_alias=True),
            "seeds": args.seeds,
            "config": {
                k: v for k, v in config.items() if k not in ("data.root", "run.out", "run.name")
            },
        },
        "machine": {"platform": platform.platform(), "torch_threads": 1},
        "table": table,
        "zero_filled": zf,
        "untrained": x0,
        "runs": rows,
        "total_seconds": time.perf_counter() - t0,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    plot(out, out_path.with_suffix(".png"))
    brief = [
        {
            k: e[k]
            for k in ("epsilon", "noise_multiplier", "epsilon_reached_max", *METRICS, "seconds")
        }
        for e in table
    ]
    print(json.dumps({"table": brief, "zero_filled": zf, "untrained": x0}, indent=2))
    print(f"wrote {out_path.with_suffix('.json')} and .png ({out['total_seconds']:.0f} s)")
    return 0


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, setup = out["table"], out["setup"]
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
        ax.set_xlabel(f"epsilon per site (delta {setup['delta']:g})")
        ax.set_ylabel(metric.upper())
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Slice-level DP-SGD, {len(setup['sites'])} sites, {setup['strategy']}, "
        f"{setup['rounds']} x {setup['local_steps']} steps (mean +- sd over {setup['seeds']} seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

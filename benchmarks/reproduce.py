"""Reproduce the papers' comparisons at an affordable size, over seeds, with 95% intervals.

One command runs six comparisons on synthetic sites (``recon.data.generate_sites``), every
federation in process (``tests/inprocess.py``'s grid with the real ClientApp, no Ray), each once
per seed 0..S-1 (``train.seed``: the initial weights and the slice order; the data and masks are
fixed), and writes ``reproduce_<scale>.json``, ``reproduce_<scale>.md`` (tables) and
``reproduce_<scale>.png`` (the paired differences with their intervals):

1. FedAvg vs FedAdam vs Scaffold, IID and non-IID (Levac et al. 2023, Tables 2-3);
2. federated vs local-only vs centralized with few slices per site (Levac et al. 2023, Sec. 4.1);
3. fine-tuning a federated (Scaffold) model at a held-out site (Levac et al. 2023, Fig. 7);
4. GLEAM vs end-to-end at equal architecture and at equal memory (GLEAM Tables II-III), with
   ``benchmarks/bench_gleam.py``'s worker;
5. fairness-adjusted aggregation (fairfedavg, GAutoMRI Eq. 9-11) vs FedAvg on the spread of the
   per-site error across deliberately unequal sites (GAutoMRI Fig. 8);
6. the federated-searched NAS denoiser vs the U-Net (GAutoMRI Table IV direction).

Every number is a mean over the sites' test splits per seed; the interval is Student's t over
the seeds (paired: the difference is taken seed by seed, same initial weights). Seeds are never
chosen: always 0..S-1. A direction "reproduces" when the interval of the paired difference
excludes 0 on the paper's side, is "opposite" when it excludes 0 on the other side, and is
"inconclusive" otherwise; a claim of no difference is "consistent" when the interval contains 0.

Scales: ``--quick`` (smoke, ~minutes), ``--scale cpu`` (the committed report, 2 CPU cores) and
``--scale gpu`` (the papers' model sizes, needs a CUDA device; see :data:`SCALES`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

for _k, _v in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
):
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Sizes of each scale. "gpu" is the papers' setting where it can be (Levac et al. 2023: Nu = 6,
# NCG = 6, a ~481k-weight U-Net (16 channels), 50 slices per site, 24,000 total local steps as
# 240 rounds x 100; 320 x 320 images, 15 coils); it needs a CUDA device and hours, and is not
# runnable on the 2-core CPU machine the committed report comes from.
SCALES: dict[str, dict[str, Any]] = {
    "quick": dict(
        seeds=2, size=32, coils=4, slices=20, unrolls=2, cg=2, chans=8, rounds=2, steps=3,
        low_slices=2, gleam_unrolls=2, gleam_budget=1, gleam_steps=8, nas_rounds=1,
        nas_steps=2, nas_channels=4, nas_cells=1, pers_epochs=1, pers_folds=2, device="cpu",
    ),
    "cpu": dict(
        seeds=3, size=32, coils=4, slices=30, unrolls=2, cg=2, chans=8, rounds=5, steps=10,
        low_slices=2, gleam_unrolls=3, gleam_budget=1, gleam_steps=100, nas_rounds=2,
        nas_steps=5, nas_channels=4, nas_cells=1, pers_epochs=2, pers_folds=2, device="cpu",
    ),
    "gpu": dict(
        seeds=5, size=320, coils=15, slices=50, unrolls=6, cg=6, chans=16, rounds=240,
        steps=100, low_slices=5, gleam_unrolls=6, gleam_budget=2, gleam_steps=3000,
        nas_rounds=50, nas_steps=100, nas_channels=16, nas_cells=3, pers_epochs=10,
        pers_folds=5, device="cuda",
    ),
}  # fmt: skip

N_SITES = 4  # training sites of every federation (the first four presets of Levac Table 1)


# --------------------------------------------------------------------------- statistics
def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% Student-t interval over the seeds (``ci`` is None with one seed)."""
    from scipy import stats

    xs = [float(v) for v in values]
    n = len(xs)
    mean = statistics.fmean(xs)
    if n < 2:
        return {"mean": mean, "ci": None, "n": n, "values": xs}
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(xs) / math.sqrt(n)
    return {"mean": mean, "ci": [mean - half, mean + half], "n": n, "values": xs}


def verdict(iv: dict[str, Any], expected: int) -> str:
    """``expected`` +1 / -1: the paper's sign of the difference; 0: the paper finds none."""
    ci = iv["ci"]
    if ci is None:
        return "one seed: no interval"
    lo, hi = ci
    if expected == 0:
        return "consistent (CI contains 0)" if lo <= 0 <= hi else "differs (CI excludes 0)"
    if lo <= 0 <= hi:
        side = "same sign" if iv["mean"] * expected > 0 else "opposite sign"
        return f"inconclusive (CI contains 0, mean of the {side})"
    return "reproduced" if (lo > 0) == (expected > 0) else "opposite"


def site_mean(metrics: dict[str, dict[str, float]], key: str, sites: Sequence[str]) -> float:
    return statistics.fmean(float(metrics[s][key]) for s in sites)


# --------------------------------------------------------------------------- data and runs
class Bench:
    """The scale's sizes, the synthetic site roots and the in-process federation runner."""

    def __init__(self, scale: str, work: Path, threads: int, log: Callable[[str], None]):
        self.s = SCALES[scale]
        self.scale = scale
        self.work = work
        self.threads = threads
        self.log = log
        self.seeds = list(range(self.s["seeds"]))
        self.runs = 0

    # --- data --------------------------------------------------------------------------
    def sites(self, name: str, **kw: Any) -> Path:
        """``work/name/site{k}`` (generated once, coil maps cached)."""
        from recon.data import generate_sites, prepare_site

        root = self.work / name
        if not root.exists():
            n = kw.pop("n_sites", N_SITES)
            s = self.s
            generate_sites(
                root,
                n_sites=n,
                n_slices=s["slices"],
                matrix=s["size"],
                overrides={"num_coils": s["coils"]},
                **kw,
            )
            for k in range(n):
                prepare_site(root / f"site{k}", progress=False)
        return root

    def unequal_sites(self) -> Path:
        """The four default sites made more unequal: the two small hospitals (30% of a large
        one's slices in the presets) also get three times the k-space noise (GAutoMRI Fig. 8's
        setting of sites that a size-weighted average serves unequally)."""
        from recon.data.synth.presets import site_presets

        presets = site_presets()[:N_SITES]
        presets[2:] = [dataclasses.replace(p, noise=3 * p.noise) for p in presets[2:]]
        return self.sites("unequal", presets=presets)

    # --- runs --------------------------------------------------------------------------
    def flat(self, root: Path, seed: int, **overrides: Any) -> dict[str, Any]:
        s = self.s
        flat: dict[str, Any] = {
            "num-server-rounds": s["rounds"],
            "min-fit-clients": N_SITES,
            "min-available-clients": N_SITES,
            "round-grace": 0.0,
            "node-wait-timeout": 30.0,
            "train.local-steps": s["steps"],
            "train.seed": seed,
            "model.num-unrolls": s["unrolls"],
            "model.cg-iters": s["cg"],
            "model.unet-chans": s["chans"],
            "run.local-only": False,
            "run.device": s["device"],
            "data.root": str(root),
            "data.num-sites": N_SITES,
            "data.synth-slices": s["slices"],
            "data.synth-size": s["size"],
            "data.synth-coils": s["coils"],
            "fedopt.eta": 3e-3,
            "run.out": str(self.work / "runs"),
        }
        flat.update(overrides)
        self.runs += 1
        flat["run.name"] = f"r{self.runs:03d}"
        return flat

    def federate(self, root: Path, seed: int, clients: int = N_SITES, **kw: Any) -> dict:
        from inprocess import InProcessGrid

        from client.app import app as client_app
        from recon.config import parse_run_config
        from server.app import run_federation

        flat = self.flat(root, seed, **kw)
        t0 = time.perf_counter()
        grid = InProcessGrid({10 + i: client_app for i in range(clients)}, flat)
        res = run_federation(grid, parse_run_config(flat))
        if res["status"] != "completed":
            raise RuntimeError(f"federation {flat['run.name']} {kw}: {res['status']}")
        self.log(
            f"    {kw.get('strategy.name', 'scaffold')} seed {seed} {root.name} "
            f"{ {k: v for k, v in kw.items() if k != 'strategy.name'} }: "
            f"{time.perf_counter() - t0:.0f} s"
        )
        return res


def fed_metrics(res: dict) -> dict[str, dict[str, float]]:
    return {site: dict(m) for site, m in res["final"]["federated"].items()}


def summary(per_seed: list[dict[str, dict[str, float]]], sites: list[str]) -> dict[str, Any]:
    """Site-mean SSIM / PSNR / NRMSE per seed with their intervals."""
    return {
        k: t_interval([site_mean(m, k, sites) for m in per_seed]) for k in ("ssim", "psnr", "nrmse")
    }


def paired(
    a: list[dict[str, dict[str, float]]], b: list[dict[str, dict[str, float]]], sites: list[str]
) -> dict[str, Any]:
    """``a - b`` seed by seed, site-mean SSIM and PSNR."""
    return {
        k: t_interval([site_mean(x, k, sites) - site_mean(y, k, sites) for x, y in zip(a, b)])
        for k in ("ssim", "psnr")
    }


# --------------------------------------------------------------------------- experiments
def exp_strategies(b: Bench, directions: list[dict]) -> dict[str, Any]:
    """Levac et al. 2023 Tables 2-3: adaptive methods ~ FedAvg when IID, better when non-IID.

    The non-IID Scaffold run also holds out a fifth site and personalizes (experiment 3)."""
    out: dict[str, Any] = {}
    roots = {"iid": b.sites("iid", iid=True), "noniid": b.sites("noniid", n_sites=N_SITES + 1)}
    sites = [f"site{k}" for k in range(N_SITES)]
    personal: list[dict[str, Any]] = []
    for dist, root in roots.items():
        per: dict[str, list] = {"fedavg": [], "fedadam": [], "scaffold": []}
        zero_filled: list = []
        for seed in b.seeds:
            for name in per:
                kw: dict[str, Any] = {"strategy.name": name}
                clients = N_SITES
                if dist == "noniid" and name == "scaffold":
                    kw.update(personalize_overrides(b))
                    clients = N_SITES + 1
                res = b.federate(root, seed, clients, **kw)
                per[name].append(fed_metrics(res))
                zero_filled.append(res["final"]["zero_filled"])
                if res.get("personalization"):
                    personal.append(res["personalization"])
        sec: dict[str, Any] = {name: summary(v, sites) for name, v in per.items()}
        sec["zero_filled"] = summary(zero_filled, sites)
        for name in ("fedadam", "scaffold"):
            diff = paired(per[name], per["fedavg"], sites)
            sec[f"{name}_minus_fedavg"] = diff
            expected = 0 if dist == "iid" else 1
            table = "Table 2" if dist == "iid" else "Table 3"
            claim = f"{name} ~ FedAvg (IID)" if dist == "iid" else f"{name} > FedAvg (non-IID)"
            directions.append(
                direction(
                    f"1. {claim}", f"Levac et al. 2023, {table}", "SSIM", diff["ssim"], expected
                )  # fmt: skip
            )
        sec["per_seed"] = per
        out[dist] = sec
    out["_noniid_fedavg"] = out["noniid"]["per_seed"]["fedavg"]
    out["_personalization"] = personal
    return out


def personalize_overrides(b: Bench) -> dict[str, Any]:
    s = b.s
    return {
        "data.unseen-sites": 1,
        "personalize.enabled": True,
        "personalize.lrs": "1e-3",
        "personalize.folds": s["pers_folds"],
        "personalize.max-epochs": s["pers_epochs"],
        "personalize.patience": 1,
        "personalize.min-gain": 0.0,
    }


def exp_personalization(personal: list[dict[str, Any]], directions: list[dict]) -> dict:
    """Levac et al. 2023 Fig. 7: fine-tuning the federated model at an unseen site helps."""
    out: dict[str, Any] = {}
    for kind, seen in (("unseen", False), ("seen", True)):
        gains: dict[str, list[float]] = {
            "ssim": [],
            "psnr": [],
        }  # per seed, mean over the sites of that kind
        for p in personal:
            entries = [e for e in p.values() if e.get("seen") == seen and e.get("after")]
            for k in gains:
                gains[k].append(statistics.fmean(e["after"][k] - e["before"][k] for e in entries))
        out[kind] = {k: t_interval(v) for k, v in gains.items() if v}
        out[f"{kind}_decisions"] = [
            [e.get("decision") for e in p.values() if e.get("seen") == seen] for p in personal
        ]
    if "ssim" in out["unseen"]:
        directions.append(
            direction(
                "3. fine-tuning gain at the unseen site > 0",
                "Levac et al. 2023, Fig. 7",
                "SSIM",
                out["unseen"]["ssim"],
                1,
            )  # fmt: skip
        )
    out["per_seed"] = personal
    return out


def exp_low_data(b: Bench, directions: list[dict]) -> dict[str, Any]:
    """Levac et al. 2023 Sec. 4.1: with few slices per site the federation beats training
    alone and is on par with pooling the data."""
    from recon.config import parse_run_config
    from recon.train.baselines import centralized, local_only

    root = b.sites("noniid", n_sites=N_SITES + 1)
    sites = [f"site{k}" for k in range(N_SITES)]
    dirs = {s: root / s for s in sites}
    low = b.s["low_slices"]
    per: dict[str, list] = {"federated": [], "local_only": [], "centralized": []}
    for seed in b.seeds:
        kw = {"strategy.name": "fedavg", "data.max-train-slices": low}
        res = b.federate(root, seed, **kw)
        per["federated"].append(fed_metrics(res))
        cfg = parse_run_config(b.flat(root, seed, **kw))
        common: dict[str, Any] = dict(
            data_kwargs=cfg.data.dataset_kwargs(), max_train_slices=low, progress=False
        )
        total = b.s["rounds"] * b.s["steps"]
        t0 = time.perf_counter()
        per["local_only"].append(
            local_only(dirs, cfg.model, cfg.train, total, b.s["device"], **common)
        )
        per["centralized"].append(
            centralized(dirs, cfg.model, cfg.train, total, b.s["device"], **common)
        )
        b.log(f"    local-only + centralized seed {seed}: {time.perf_counter() - t0:.0f} s")
    out: dict[str, Any] = {"train_slices_per_site": low}
    out.update({k: summary(v, sites) for k, v in per.items()})
    out["federated_minus_local_only"] = d1 = paired(per["federated"], per["local_only"], sites)
    out["federated_minus_centralized"] = d2 = paired(per["federated"], per["centralized"], sites)
    directions.append(
        direction(
            "2. federated > local-only (low data)",
            "Levac et al. 2023, Sec. 4.1",
            "SSIM",
            d1["ssim"],
            1,
        )  # fmt: skip
    )
    directions.append(
        direction(
            "2. federated ~ centralized (low data)",
            "Levac et al. 2023, Sec. 4.1",
            "SSIM",
            d2["ssim"],
            0,
        )  # fmt: skip
    )
    out["per_seed"] = per
    return out


def exp_gleam(b: Bench, directions: list[dict]) -> dict[str, Any]:
    """GLEAM Tables II-III with bench_gleam's worker, in process, on one IID site."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gleam

    s = b.s
    site = b.sites("iid", iid=True) / "site0"
    base = dict(
        device=s["device"], threads=b.threads, cg_iters=s["cg"], chans=s["chans"], lam=0.05,
        lr=2e-3, loss="ssim", data={"kind": "site", "dir": str(site)}, arch="modl", warmup=0,
        steps=s["gleam_steps"], eval=True, mode="quality",
    )  # fmt: skip
    n, bud = s["gleam_unrolls"], s["gleam_budget"]
    settings = {
        "equal_architecture": {"e2e": (n, None), "gleam": (n, n)},
        # GLEAM's modules of B unrolls hold the activations of an e2e net of B unrolls
        "equal_memory": {"e2e": (bud, None), "gleam": (3 * bud, 3)},
    }
    out: dict[str, Any] = {}
    for name, methods in settings.items():
        runs: dict[str, list] = {m: [] for m in methods}
        for seed in b.seeds:
            for method, (unrolls, modules) in methods.items():
                t0 = time.perf_counter()
                spec = dict(base, method=method, unrolls=unrolls, modules=modules, seed=seed)
                r = bench_gleam.run_worker(spec)
                runs[method].append(r)
                b.log(f"    {name} {method} N={unrolls} seed {seed}: "
                      f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
        sec: dict[str, Any] = {}
        for method, (unrolls, modules) in methods.items():
            sec[method] = {
                "unrolls": unrolls,
                "modules": modules,
                "psnr": t_interval([r["psnr"] for r in runs[method]]),
                "ssim": t_interval([r["ssim"] for r in runs[method]]),
            }
        sec["psnr_zero_filled"] = runs["e2e"][0]["psnr_zero_filled"]
        diff = {
            k: t_interval([g[k] - e[k] for g, e in zip(runs["gleam"], runs["e2e"])])
            for k in ("psnr", "ssim")
        }
        sec["gleam_minus_e2e"] = diff
        sec["per_seed"] = runs
        out[name] = sec
        if name == "equal_architecture":
            directions.append(
                direction(
                    "4. GLEAM ~ e2e (equal architecture)", "GLEAM Table II", "PSNR", diff["psnr"], 0
                )  # fmt: skip
            )
        else:
            directions.append(
                direction(
                    "4. GLEAM > e2e (equal memory)", "GLEAM Table III", "PSNR", diff["psnr"], 1
                )  # fmt: skip
            )
    out["train_steps"] = s["gleam_steps"]
    return out


def spread(metrics: dict[str, dict[str, float]], sites: list[str]) -> dict[str, float]:
    errs = [float(metrics[s]["nrmse"]) for s in sites]
    return {
        "std": statistics.pstdev(errs),
        "worst_minus_best": max(errs) - min(errs),
        "mean": statistics.fmean(errs),
    }


def exp_fairness(b: Bench, directions: list[dict]) -> dict[str, Any]:
    """GAutoMRI Fig. 8: fairness-adjusted weights narrow the spread of the per-site error."""
    root = b.unequal_sites()
    sites = [f"site{k}" for k in range(N_SITES)]
    per: dict[str, list] = {"fedavg": [], "fairfedavg": []}
    for seed in b.seeds:
        for name in per:
            kw: dict[str, Any] = {"strategy.name": name}
            per[name].append(fed_metrics(b.federate(root, seed, **kw)))
    out: dict[str, Any] = {"error": "NRMSE on each site's test split"}
    for name, v in per.items():
        sp = [spread(m, sites) for m in v]
        out[name] = {k: t_interval([x[k] for x in sp]) for k in sp[0]}
        out[name]["ssim"] = t_interval([site_mean(m, "ssim", sites) for m in v])
    diffs = {}
    for k in ("std", "worst_minus_best", "mean"):
        diffs[k] = t_interval(
            [spread(f, sites)[k] - spread(a, sites)[k] for f, a in zip(per["fairfedavg"],
                                                                       per["fedavg"])]
        )  # fmt: skip
    out["fairfedavg_minus_fedavg"] = diffs
    directions.append(
        direction(
            "5. fairfedavg narrows the per-site error spread",
            "GAutoMRI Fig. 8",
            "std of NRMSE",
            diffs["std"],
            -1,
        )  # fmt: skip
    )
    directions.append(
        direction(
            "5. fairfedavg narrows worst - best",
            "GAutoMRI Fig. 8",
            "NRMSE worst - best",
            diffs["worst_minus_best"],
            -1,
        )  # fmt: skip
    )
    out["per_seed"] = per
    return out


def exp_nas(b: Bench, unet: list[dict], directions: list[dict]) -> dict[str, Any]:
    """GAutoMRI Table IV direction: the federated-searched denoiser beats the U-Net (FedAvg,
    non-IID, same rounds and local steps; the U-Net runs are experiment 1's)."""
    s = b.s
    root = b.sites("noniid", n_sites=N_SITES + 1)
    sites = [f"site{k}" for k in range(N_SITES)]
    nas: list[dict] = []
    params = None
    for seed in b.seeds:
        kw = {
            "strategy.name": "fedavg",
            "model.denoiser": "nas",
            "model.nas-channels": s["nas_channels"],
            "model.nas-cells": s["nas_cells"],
            "nas.search-rounds": s["nas_rounds"],
            "nas.search-steps": s["nas_steps"],
        }
        res = b.federate(root, seed, **kw)
        params = res["model"].get("num_parameters")
        nas.append(fed_metrics(res))
    out: dict[str, Any] = {"nas": summary(nas, sites), "unet": summary(unet, sites)}
    out["nas_minus_unet"] = diff = paired(nas, unet, sites)
    out["nas_parameters"] = params
    directions.append(
        direction("6. searched NAS net > U-Net", "GAutoMRI Table IV", "SSIM", diff["ssim"], 1)
    )
    out["per_seed"] = nas
    return out


def direction(claim: str, source: str, metric: str, iv: dict, expected: int) -> dict:
    return {
        "claim": claim,
        "source": source,
        "metric": metric,
        "expected_sign": expected,
        "mean": iv["mean"],
        "ci95": iv["ci"],
        "verdict": verdict(iv, expected),
    }


# --------------------------------------------------------------------------- report
def _iv(iv: dict[str, Any] | None, digits: int = 4) -> str:
    if not iv:
        return "-"
    if iv["ci"] is None:
        return f"{iv['mean']:.{digits}f}"
    lo, hi = iv["ci"]
    return f"{iv['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(report: dict[str, Any]) -> str:
    r = report
    s = r["sizes"]
    lines = [
        f"# Papers' findings reproduced ({r['scale']} scale)",
        "",
        f"`{r['command']}`: {r['wall_seconds'] / 60:.1f} min wall time on {r['env']['machine']}, "
        f"seeds {r['seeds']} (never chosen), {s['size']} px, {s['coils']} coils, MoDL "
        f"Nu={s['unrolls']} NCG={s['cg']} U-Net {s['chans']} channels, {s['rounds']} rounds x "
        f"{s['steps']} local steps, {N_SITES} synthetic sites. Mean over seeds [95% t-interval]; "
        "differences are paired seed by seed. A direction is *reproduced* when the interval "
        "excludes 0 on the paper's side.",
        "",
        "## Directions",
        "",
        "| claim | source | metric | difference [95% CI] | verdict |",
        "|---|---|---|---|---|",
    ]
    for d in r["directions"]:
        iv = {"mean": d["mean"], "ci": d["ci95"]}
        lines.append(
            f"| {d['claim']} | {d['source']} | {d['metric']} | {_iv(iv)} | {d['verdict']} |"
        )

    def metric_table(title: str, rows: dict[str, dict[str, Any]]) -> None:
        lines.extend(["", f"### {title}", "", "| | SSIM | PSNR (dB) |", "|---|---|---|"])
        for name, m in rows.items():
            lines.append(f"| {name} | {_iv(m.get('ssim'))} | {_iv(m.get('psnr'), 2)} |")

    sec = r["sections"]
    if "strategies" in sec:
        lines.extend(["", "## 1. FedAvg vs FedAdam vs Scaffold (Levac et al. 2023, Tables 2-3)"])
        for dist in ("iid", "noniid"):
            d = sec["strategies"][dist]
            rows = {k: d[k] for k in ("zero_filled", "fedavg", "fedadam", "scaffold") if k in d}
            rows |= {k: d[k] for k in ("fedadam_minus_fedavg", "scaffold_minus_fedavg")}
            metric_table(dist.replace("noniid", "non-IID").replace("iid", "IID"), rows)
    if "low_data" in sec:
        d = sec["low_data"]
        lines.extend(["", f"## 2. Low-data regime ({d['train_slices_per_site']} training slices "
                          "per site; Levac et al. 2023 Sec. 4.1)"])  # fmt: skip
        keys = ("federated", "local_only", "centralized", "federated_minus_local_only",
                "federated_minus_centralized")  # fmt: skip
        metric_table("site-mean test metrics", {k: d[k] for k in keys})
    if "personalization" in sec:
        d = sec["personalization"]
        lines.extend(["", "## 3. Personalization (Levac et al. 2023, Fig. 7)", "",
                      "Fine-tuned minus global (Scaffold, non-IID), on the held-out site and "
                      "on the training sites:"])  # fmt: skip
        metric_table("after - before", {"unseen site": d["unseen"], "seen sites": d["seen"]})
    if "gleam" in sec:
        d = sec["gleam"]
        lines.extend(["", f"## 4. GLEAM vs end-to-end ({d['train_steps']} steps; GLEAM "
                          "Tables II-III)"])  # fmt: skip
        for name in ("equal_architecture", "equal_memory"):
            x = d[name]
            rows = {
                f"e2e N={x['e2e']['unrolls']}": x["e2e"],
                f"GLEAM N={x['gleam']['unrolls']}, M={x['gleam']['modules']}": x["gleam"],
                "GLEAM - e2e": x["gleam_minus_e2e"],
            }
            metric_table(f"{name.replace('_', ' ')} (zero-filled {x['psnr_zero_filled']} dB)",
                         rows)  # fmt: skip
    if "fairness" in sec:
        d = sec["fairness"]
        lines.extend(["", "## 5. Fairness-adjusted aggregation (GAutoMRI Fig. 8)", "",
                      "Per-site NRMSE over 4 unequal sites (two small noisy hospitals):", "",
                      "| | std | worst - best | mean | site-mean SSIM |",
                      "|---|---|---|---|---|"])  # fmt: skip
        for name in ("fedavg", "fairfedavg", "fairfedavg_minus_fedavg"):
            x = d[name]
            lines.append(
                f"| {name} | {_iv(x['std'])} | {_iv(x['worst_minus_best'])} | "
                f"{_iv(x['mean'])} | {_iv(x.get('ssim'))} |"
            )
    if "nas" in sec:
        d = sec["nas"]
        lines.extend(["", "## 6. Searched NAS denoiser vs U-Net (GAutoMRI Table IV direction)"])
        metric_table(
            f"FedAvg, non-IID (NAS net: {d['nas_parameters']} weights)",
            {"NAS": d["nas"], "U-Net": d["unet"], "NAS - U-Net": d["nas_minus_unet"]},
        )
    lines.extend(["", "Everything above comes from one run of `benchmarks/reproduce.py`; "
                      f"raw per-seed numbers in `{r['json_name']}`.", ""])  # fmt: skip
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel of paired differences (mean and 95% CI) per direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = report["directions"]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(dirs) + 1.5))
    for i, d in enumerate(dirs):
        scale = 1.0
        lo, hi = d["ci95"] or (d["mean"], d["mean"])
        colour = {"reproduced": "tab:green", "opposite": "tab:red"}.get(
            d["verdict"], "tab:blue" if d["verdict"].startswith("consistent") else "tab:grey"
        )
        if d["verdict"].startswith("differs"):
            colour = "tab:orange"
        ax.errorbar(
            [d["mean"] * scale], [i], xerr=[[d["mean"] - lo], [hi - d["mean"]]], fmt="o",
            color=colour, capsize=4,
        )  # fmt: skip
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(dirs)))
    ax.set_yticklabels([f"{d['claim']} ({d['metric']})" for d in dirs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("paired difference, mean and 95% t-interval over seeds (symlog)")
    ax.set_title(
        f"reproduce.py --scale {report['scale']}, seeds {report['seeds']}\ngreen reproduced, "
        "red opposite, grey inconclusive; claims of no difference: blue hold, orange fail",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
SECTIONS = ("strategies", "low_data", "personalization", "gleam", "fairness", "nas")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--quick", action="store_true", help="= --scale quick (smoke run, minutes)")
    p.add_argument("--seeds", type=int, help="override the scale's number of seeds (0..S-1)")
    p.add_argument("--out-dir", default=str(RESULTS), help="where reproduce_<scale>.* go")
    p.add_argument("--work-dir", help="synthetic sites and run folders (default: a temp dir)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--from-json", help="only redraw the .md and .png of this report JSON")
    args = p.parse_args(argv)
    if args.from_json:
        path = Path(args.from_json)
        saved: dict[str, Any] = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(saved))
        plot(saved, path.with_suffix(".png"))
        return saved
    scale = "quick" if args.quick else args.scale
    import torch

    if SCALES[scale]["device"] == "cuda" and not torch.cuda.is_available():
        p.error("--scale gpu needs a CUDA device (none here); use --scale cpu")
    if args.seeds:
        SCALES[scale]["seeds"] = args.seeds
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))  # InProcessGrid
    sys.path.insert(0, str(ROOT))
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="reproduce_"))
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(scale, work, args.threads, log)
    directions: list[dict] = []
    sections: dict[str, Any] = {}
    timings: dict[str, float] = {}
    unet_noniid: list[dict] | None = None

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        log(f"{name} ...")
        t = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        log(f"{name}: {timings[name]:.0f} s")
        return value

    if only & {"strategies", "personalization", "nas"}:
        strat = timed("strategies", lambda: exp_strategies(b, directions))
        unet_noniid = strat.pop("_noniid_fedavg")
        personal = strat.pop("_personalization")
        if "strategies" in only:
            sections["strategies"] = strat
        if "personalization" in only:
            sections["personalization"] = exp_personalization(personal, directions)
    if "low_data" in only:
        sections["low_data"] = timed("low_data", lambda: exp_low_data(b, directions))
    if "gleam" in only:
        sections["gleam"] = timed("gleam", lambda: exp_gleam(b, directions))
    if "fairness" in only:
        sections["fairness"] = timed("fairness", lambda: exp_fairness(b, directions))
    if "nas" in only and unet_noniid is not None:
        sections["nas"] = timed("nas", lambda: exp_nas(b, unet_noniid, directions))
    if "strategies" not in only:
        directions[:] = [d for d in directions if not d["claim"].startswith("1.")]
    directions.sort(key=lambda d: d["claim"][:2])

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"reproduce_{scale}"
    cmd = "python benchmarks/reproduce.py " + ("--quick" if args.quick else f"--scale {scale}")
    report: dict[str, Any] = {
        "benchmark": "reproduce",
        "scale": scale,
        "command": cmd + (f" --seeds {args.seeds}" if args.seeds else ""),
        "seeds": b.seeds,
        "sizes": SCALES[scale],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "section_seconds": timings,
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), "
            f"torch.set_num_threads({args.threads})",
        },
        "json_name": stem.with_suffix(".json").name,
        "directions": directions,
        "sections": sections,
    }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    log(f"wrote {stem}.json, .md, .png ({report['wall_seconds'] / 60:.1f} min)")
    for d in directions:
        print(f"  {d['claim']}: {_iv({'mean': d['mean'], 'ci': d['ci95']})} -> {d['verdict']}")
    return report


if __name__ == "__main__":
    main()

"""Memory, time and quality of end-to-end vs checkpointing vs GLEAM training (GLEAM Tables I-V).

Three measurements, written to ``--out`` (JSON) with a PNG next to it:

1. **Same architecture, memory and time** (GLEAM Tables I, II, V): MoDL with one U-Net per
   unroll, trained end to end, with one checkpoint per unroll, and with GLEAM (M = N). Each method
   runs in a fresh subprocess; the peak is the resident-set high-water mark (``VmHWM``, reset
   after setup through ``/proc/self/clear_refs``) on CPU, ``torch.cuda.max_memory_allocated`` on
   CUDA, over a short run after one warm-up step. ``peak_extra_mb`` = that peak minus the memory
   before the run (weights, data); ``activations_and_grads_mb`` = ``peak_extra_mb`` minus Adam's
   moments, which the memory workers allocate when the optimisers are built (``EagerAdam``).
2. **Equal architecture, quality**: e2e vs GLEAM at N unrolls, same steps, PSNR / SSIM on the
   held-out slices of a synthetic site, and the per-unroll PSNR curve (GLEAM Fig. 9).
3. **Equal memory, quality** (GLEAM Tables III-IV): e2e with ``B`` unrolls vs GLEAM with ``3B``
   unrolls in 3 modules of ``B`` (each module is the e2e network's size), same steps.

The quality runs use unrolled PGD with a ResNet per unroll by default (``--quality-arch``; seed
004's equal-memory comparison, Table III, is 2D PGD), repeated over ``--seeds`` initialisations
(the JSON keeps every seed and the mean, the gains are paired by seed).

Usage::

    python benchmarks/bench_gleam.py --out runs/bench_gleam.json                  # CPU defaults
    python benchmarks/bench_gleam.py --size 64 --coils 4 --unrolls 4 --quick --out /tmp/b.json
    python benchmarks/bench_gleam.py --device cuda --size 320 --coils 15 --unrolls 8 --out g.json
    python benchmarks/bench_gleam.py --device cuda:0 --pgleam-devices cuda:0,cuda:1 ...  # 2 GPUs

CPU runs set ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the workers (see the
compute notes: at glibc defaults greedy steps pay 3-15% in page faults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Timing runs: the compute notes' settings (no page-fault tax on greedy steps).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "8589934592"}
# Memory runs: every block >= 64 KiB is its own mapping, unmapped on free, so the resident set
# follows the live tensors and the high-water mark is the training peak.
MEMORY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


# --------------------------------------------------------------------------- worker side


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def phantom_samples(n: int, size: int, coils: int, seed: int) -> list[Any]:
    """Smooth complex phantoms with known smooth coil maps and 1D random masks (R ~ 4).

    Used for the memory/time runs, where content does not matter and ESPIRiT at large matrix
    sizes would cost minutes.
    """
    import torch
    from torch.nn import functional as F

    from recon.data.sample import Sample
    from recon.physics import fft2c

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        z = F.interpolate(torch.randn(1, 2, 8, 8, generator=g), size=(size, size), mode="bicubic")
        yy, xx = torch.meshgrid(
            torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij"
        )
        support = ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 < 1).float()
        x = torch.complex(1 + 0.3 * z[0, 0], 0.3 * z[0, 1]) * support
        m = F.interpolate(torch.randn(1, 2 * coils, 3, 3, generator=g), size=(size, size))
        maps = torch.complex(m[0, :coils], m[0, coils:]) + 2.0
        maps = maps / maps.abs().pow(2).sum(0, keepdim=True).sqrt()
        cols = torch.rand(size, generator=g) < 0.2
        cols[size // 2 - size // 25 - 1 : size // 2 + size // 25 + 1] = True
        mask = cols.float().expand(size, size).clone()
        target = (maps * x).abs().pow(2).sum(0).sqrt()
        out.append(Sample(mask * fft2c(maps * x), mask, maps, target, {"slice": i}, image=x))
    return out


def _load_data(spec: dict[str, Any], split: str) -> list[Any]:
    data = spec["data"]
    if data["kind"] == "phantom":
        seed = data["seed"] + (0 if split == "train" else 1000)
        n = data["n"] if split == "train" else data.get("n_test", 4)
        return phantom_samples(n, data["size"], data["coils"], seed)
    from recon.data import SiteDataset

    ds = SiteDataset(data["dir"], split=split, accel=data.get("accel", 4), maps_method="espirit")
    return [ds[i] for i in range(len(ds))]


def _use_eager_adam() -> None:
    """Make every ``torch.optim.Adam`` allocate its moments at construction (same numbers).

    Adam normally allocates them at its first step, i.e. module by module under GLEAM, which
    would blur the activation peak with optimiser state; built eagerly, the state is one known
    constant, ``2 x weights``, that the memory report subtracts.
    """
    import torch

    class EagerAdam(torch.optim.Adam):
        def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(params, *args, **kwargs)
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p].update(
                        step=torch.tensor(0.0),
                        exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                        exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                    )

    torch.optim.Adam = EagerAdam  # type: ignore[misc]


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, train and (optionally) evaluate one method in this fresh process."""
    import torch

    from recon.models import build_model, count_parameters
    from recon.train import TrainConfig, evaluate
    from recon.train.methods import local_train

    torch.set_num_threads(spec["threads"])
    if spec["mode"] == "memory":
        _use_eager_adam()
    device = torch.device(spec["device"])
    train_set = _load_data(spec, "train")
    test_set = _load_data(spec, "test") if spec.get("eval") else []
    torch.manual_seed(spec["seed"])
    arch = spec.get("arch", "modl")
    model = build_model(
        arch=arch,
        denoiser="unet" if arch == "modl" else "resnet",
        num_unrolls=spec["unrolls"],
        cg_iters=spec["cg_iters"],
        shared=False,
        unet_chans=spec["chans"],
        lam_init=spec["lam"],
    ).to(device)
    kwargs: dict[str, Any] = {}
    if spec["method"] == "gleam":
        kwargs["num_modules"] = spec["modules"]
        if spec.get("devices"):  # P-GLEAM (Alg. 2): module m on devices[m % D]
            kwargs["devices"] = spec["devices"]
    cfg = dict(lr=spec["lr"], loss=spec["loss"], seed=spec["seed"])
    cuda = device.type == "cuda"
    # every CUDA device the run touches; the memory figure is the largest per-device peak
    gpus = sorted(
        {torch.device(d) for d in [device, *(spec.get("devices") or [])] if "cuda" in str(d)},
        key=str,
    )

    def fit(steps: int) -> Any:
        return local_train(
            spec["method"], model, train_set, TrainConfig(steps=steps, **cfg), device, **kwargs
        )

    import gc

    out: dict[str, Any] = {k: spec[k] for k in ("method", "unrolls", "modules", "device", "mode")}
    out["params"] = count_parameters(model)
    if spec.get("warmup"):  # lazy initialisations and first-touch costs stay out of the numbers
        fit(spec["warmup"])
    gc.collect()
    if cuda:
        base_by_gpu = {}
        for g in gpus:
            torch.cuda.synchronize(g)
            torch.cuda.reset_peak_memory_stats(g)
            base_by_gpu[g] = torch.cuda.memory_allocated(g) / 2**20
        base = base_by_gpu[device if device.index is not None else gpus[0]]
    else:
        hwm_reset = _reset_hwm()
        base = _status_mb("VmRSS")
    res = fit(spec["steps"])
    out.update(
        steps=spec["steps"],
        time_per_iter_s=round(res.seconds / spec["steps"], 4),
        final_loss=round(res.final_loss, 5),
    )
    if spec["mode"] == "memory":
        if cuda:
            extra = {}
            for g in gpus:
                torch.cuda.synchronize(g)
                extra[g] = torch.cuda.max_memory_allocated(g) / 2**20 - base_by_gpu[g]
            busiest = max(extra, key=lambda g: extra[g])
            base, peak = base_by_gpu[busiest], base_by_gpu[busiest] + extra[busiest]
            out["memory"] = f"cuda max_memory_allocated ({busiest}, the largest of {len(gpus)})"
        else:
            peak = _status_mb("VmHWM") if hwm_reset else resource.getrusage(0).ru_maxrss / 1024
            out["memory"] = "VmHWM after clear_refs" if hwm_reset else "ru_maxrss (not reset)"
        # Adam's moments are allocated when the optimisers are built (EagerAdam), before any
        # forward, and stay: removing them leaves the peak of activations + live gradients.
        adam = 2 * out["params"] * 4 / 2**20
        out.update(
            base_mb=round(base, 1),
            peak_mb=round(peak, 1),
            peak_extra_mb=round(peak - base, 1),
            adam_state_mb=round(adam, 1),
            activations_and_grads_mb=round(peak - base - adam, 1),
        )
    if test_set:
        ev = evaluate(model, test_set, device, per_unroll=True)
        out["psnr"] = round(float(ev["psnr"]), 3)  # type: ignore[arg-type]
        out["ssim"] = round(float(ev["ssim"]), 4)  # type: ignore[arg-type]
        out["psnr_per_unroll"] = [round(v, 3) for v in ev["psnr_per_unroll"]]  # type: ignore[attr-defined]
        zf = evaluate(None, test_set)
        out["psnr_zero_filled"] = round(float(zf["psnr"]), 3)  # type: ignore[arg-type]
        out["ssim_zero_filled"] = round(float(zf["ssim"]), 4)  # type: ignore[arg-type]
        out["n_test"] = len(test_set)
    return out


# --------------------------------------------------------------------------- parent side


def spawn(spec: dict[str, Any], log: bool = True) -> dict[str, Any]:
    """Run one worker in a fresh interpreter and return its JSON result."""
    malloc = MEMORY_MALLOC_ENV if spec["mode"] == "memory" else MALLOC_ENV
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(malloc if spec["device"] == "cpu" else {}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['method']} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if log:
        keys = ("method", "unrolls", "modules", "peak_extra_mb", "time_per_iter_s", "psnr")
        print("  " + ", ".join(f"{k}={result.get(k)}" for k in keys), flush=True)
    return result


def peak_memory(base: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """The :data:`MEMORY_KEYS` of one short run (1 warm-up + 2 steps) under MEMORY_MALLOC_ENV."""
    run = spawn(dict(base, **spec, mode="memory", warmup=1, steps=2, eval=False), log=False)
    return {k: run[k] for k in MEMORY_KEYS}


def measure(
    base: dict[str, Any], specs: dict[str, dict[str, Any]], repeats: int
) -> dict[str, dict[str, Any]]:
    """Peak memory (one short run per method under MEMORY_MALLOC_ENV) and time per iteration.

    The timing runs are interleaved (e2e, checkpoint, gleam, e2e, ...) ``repeats`` times and the
    median is kept, so a burst of load on a shared machine hits every method alike; every sample
    is in ``time_samples_s``.
    """
    peaks = {name: peak_memory(base, **spec) for name, spec in specs.items()}
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in specs}
    for _ in range(repeats):
        for name, spec in specs.items():
            samples[name].append(spawn(dict(base, **spec, mode="time"), log=False))
    out = {}
    for name in specs:
        times = [r["time_per_iter_s"] for r in samples[name]]
        run = dict(samples[name][-1], time_per_iter_s=statistics.median(times))
        run["time_samples_s"] = times
        run.update(peaks[name])
        keys = ("method", "unrolls", "modules", "activations_and_grads_mb", "time_per_iter_s")
        print(f"  {name}: " + ", ".join(f"{k}={run.get(k)}" for k in keys), flush=True)
        out[name] = run
    return out


def make_site(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One synthetic site (``recon.data.generate_sites``), coil maps cached once here."""
    from recon.data import SiteDataset, generate_sites

    generate_sites(
        root,
        n_sites=1,
        n_slices=args.slices,
        seed=args.seed,
        matrix=args.quality_size,
        iid=True,
        overrides={"num_coils": args.quality_coils},
    )
    site = root / "site0"
    for split in ("train", "test"):
        SiteDataset(site, split=split, maps_method="espirit")  # fills the map cache
    return {"kind": "site", "dir": str(site)}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


MEMORY_KEYS = (
    "memory",
    "base_mb",
    "peak_mb",
    "peak_extra_mb",
    "adam_state_mb",
    "activations_and_grads_mb",
)


def _mean(values: list[float], digits: int = 3) -> float:
    return round(sum(values) / len(values), digits)


def quality_runs(base: dict[str, Any], seeds: list[int], **spec: Any) -> dict[str, Any]:
    """Train and evaluate one method once per seed; the means plus every seed's numbers."""
    runs = [spawn(dict(base, **spec, seed=seed)) for seed in seeds]
    first = runs[0]
    curves = [r["psnr_per_unroll"] for r in runs]
    return {
        **{k: first[k] for k in ("method", "unrolls", "modules", "params", "steps", "n_test")},
        "psnr": _mean([r["psnr"] for r in runs]),
        "ssim": _mean([r["ssim"] for r in runs], 4),
        "psnr_per_unroll": [_mean([c[j] for c in curves]) for j in range(len(curves[0]))],
        "psnr_zero_filled": first["psnr_zero_filled"],
        "ssim_zero_filled": first["ssim_zero_filled"],
        "time_per_iter_s": _mean([r["time_per_iter_s"] for r in runs], 4),
        "per_seed": [
            {"seed": seed}
            | {k: r[k] for k in ("psnr", "ssim", "psnr_per_unroll", "final_loss", "wall_s")}
            for seed, r in zip(seeds, runs)
        ],
    }


def paired_gain(e2e: dict[str, Any], gleam: dict[str, Any]) -> dict[str, Any]:
    """GLEAM minus e2e PSNR / SSIM, seed by seed (same initialisation seed and batch order)."""
    gains = [round(g["psnr"] - e["psnr"], 3) for e, g in zip(e2e["per_seed"], gleam["per_seed"])]
    ssim_gains = [
        round(g["ssim"] - e["ssim"], 4) for e, g in zip(e2e["per_seed"], gleam["per_seed"])
    ]
    return {
        "psnr_gain_gleam_minus_e2e": _mean(gains),
        "psnr_gain_per_seed": gains,
        "ssim_gain_gleam_minus_e2e": _mean(ssim_gains, 4),
        "ssim_gain_per_seed": ssim_gains,
        "gleam_better_psnr_in_seeds": sum(g > 0 for g in gains),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON output path (PNG written next to it); required")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=128, help="matrix of the memory/time runs")
    p.add_argument("--coils", type=int, default=8)
    p.add_argument("--unrolls", type=int, default=6, help="N of the same-architecture runs")
    p.add_argument("--cg-iters", type=int, default=6)
    p.add_argument("--chans", type=int, default=16, help="U-Net width (16: 481k weights)")
    p.add_argument("--lam", type=float, default=0.05, help="MoDL lambda (fixed under GLEAM)")
    p.add_argument(
        "--pgleam-devices",
        help="comma-separated devices (cuda:0,cuda:1) for an extra P-GLEAM run (GLEAM Alg. 2)",
    )
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--timing-repeats", type=int, default=3, help="interleaved timing runs")
    p.add_argument("--timing-slices", type=int, default=4, help="phantoms of the timing runs")
    p.add_argument("--quality-size", type=int, default=64)
    p.add_argument("--quality-coils", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument(
        "--quality-arch",
        choices=["pgd", "modl"],
        default="pgd",
        help="quality runs: unrolled PGD + ResNet (GLEAM Table III) or MoDL + U-Net",
    )
    p.add_argument("--seeds", type=int, default=1, help="initialisations of the quality runs")
    p.add_argument("--budget-unrolls", type=int, default=2, help="B: e2e unrolls at equal memory")
    p.add_argument("--slices", type=int, default=120, help="slices of the synthetic site")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--loss", default="ssim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="where to write the synthetic site (default: a temp dir)")
    p.add_argument("--phantom-quality", action="store_true", help="quality runs on phantoms")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--quick", action="store_true", help="few steps, for a smoke run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    if not args.out:
        p.error("--out is required")
    if args.quick:
        args.warmup, args.timing_steps, args.timing_repeats = 1, 4, 1
        args.train_steps, args.slices = min(args.train_steps, 120), min(args.slices, 40)
        args.seeds = 1

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    import torch

    common = dict(
        device=args.device,
        threads=args.threads,
        cg_iters=args.cg_iters,
        chans=args.chans,
        lam=args.lam,
        lr=args.lr,
        loss=args.loss,
        seed=args.seed,
    )
    report: dict[str, Any] = {
        "benchmark": "bench_gleam",
        "config": vars(args) | {"worker": None},
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "device_name": torch.cuda.get_device_name(0)
            if args.device.startswith("cuda")
            else platform.processor() or platform.machine(),
            "malloc_env": MALLOC_ENV if args.device == "cpu" else None,
        },
    }

    # 1. same architecture: memory and time per iteration
    print(
        f"[1/3] memory/time, MoDL N={args.unrolls}, {args.size}px, {args.coils} coils", flush=True
    )
    phantom = {
        "kind": "phantom",
        "size": args.size,
        "coils": args.coils,
        "n": args.timing_slices,
        "seed": 0,
    }
    timing = dict(common, data=phantom, warmup=args.warmup, steps=args.timing_steps)
    specs: dict[str, dict[str, Any]] = {
        name: {"method": method, "unrolls": args.unrolls, "modules": mods}
        for name, method, mods in [
            ("e2e", "e2e", None),
            ("checkpoint", "checkpoint", None),
            ("gleam", "gleam", args.unrolls),
        ]
    }
    if args.pgleam_devices:
        devices = [d.strip() for d in args.pgleam_devices.split(",") if d.strip()]
        specs["pgleam"] = dict(specs["gleam"], devices=devices)
    runs = measure(timing, specs, args.timing_repeats)
    e2e, ckpt, gl = runs["e2e"], runs["checkpoint"], runs["gleam"]
    m = args.unrolls
    report["memory_time"] = {
        "runs": runs,
        "memory_ratio_e2e_over_gleam": ratio(e2e["peak_extra_mb"], gl["peak_extra_mb"]),
        "memory_ratio_e2e_over_checkpoint": ratio(e2e["peak_extra_mb"], ckpt["peak_extra_mb"]),
        "time_ratio_gleam_over_e2e": ratio(gl["time_per_iter_s"], e2e["time_per_iter_s"]),
        "time_ratio_checkpoint_over_gleam": ratio(ckpt["time_per_iter_s"], gl["time_per_iter_s"]),
        "activation_ratio_e2e_over_gleam": ratio(
            e2e["activations_and_grads_mb"], gl["activations_and_grads_mb"]
        ),
        "activation_ratio_e2e_over_checkpoint": ratio(
            e2e["activations_and_grads_mb"], ckpt["activations_and_grads_mb"]
        ),
        # issue 4's target: GLEAM activations <= e2e activations / (0.8 M); gradients included
        "target_gleam_activations_mb_at_most": round(
            e2e["activations_and_grads_mb"] / (0.8 * m), 1
        ),
        "target_memory_met": gl["activations_and_grads_mb"]
        <= e2e["activations_and_grads_mb"] / (0.8 * m),
        "target_time_met": gl["time_per_iter_s"] <= 1.1 * e2e["time_per_iter_s"]
        and gl["time_per_iter_s"] < ckpt["time_per_iter_s"],
    }
    if "pgleam" in runs:
        report["memory_time"]["time_ratio_pgleam_over_gleam"] = ratio(
            runs["pgleam"]["time_per_iter_s"], gl["time_per_iter_s"]
        )

    # 2-3. quality at equal architecture and at equal memory
    if not args.skip_quality:
        if args.phantom_quality:
            qdata: dict[str, Any] = {
                "kind": "phantom",
                "size": args.quality_size,
                "coils": args.quality_coils,
                "n": args.slices,
                "n_test": 8,
                "seed": 1,
            }
        else:
            root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="bg_"))
            print(f"  synthetic site in {root}", flush=True)
            qdata = make_site(args, root)
        quality = dict(
            common,
            data=qdata,
            arch=args.quality_arch,
            warmup=0,
            steps=args.train_steps,
            eval=True,
            mode="quality",
        )
        seeds = list(range(args.seed, args.seed + args.seeds))
        n, b = args.unrolls, args.budget_unrolls
        print(
            f"[2/3] equal architecture {args.quality_arch} N={n}, {args.train_steps} steps, "
            f"seeds {seeds}",
            flush=True,
        )
        arch: dict[str, Any] = {
            "e2e": quality_runs(quality, seeds, method="e2e", unrolls=n, modules=None),
            "gleam": quality_runs(quality, seeds, method="gleam", unrolls=n, modules=n),
        }
        arch.update(paired_gain(arch["e2e"], arch["gleam"]))
        report["equal_architecture"] = arch
        print(f"[3/3] equal memory: e2e N={b} vs GLEAM N={3 * b} (3 modules)", flush=True)
        mem: dict[str, Any] = {}
        for k, u, mods in (("e2e", b, None), ("gleam", 3 * b, 3)):
            mem[k] = quality_runs(quality, seeds, method=k, unrolls=u, modules=mods)
            mem[k].update(peak_memory(quality, method=k, unrolls=u, modules=mods))
        mem.update(paired_gain(mem["e2e"], mem["gleam"]))
        mem["memory_ratio_gleam_over_e2e"] = ratio(
            mem["gleam"]["peak_extra_mb"], mem["e2e"]["peak_extra_mb"]
        )
        mem["activation_ratio_gleam_over_e2e"] = ratio(
            mem["gleam"]["activations_and_grads_mb"], mem["e2e"]["activations_and_grads_mb"]
        )
        report["equal_memory"] = mem
        report["quality_data"] = qdata

    out_path.write_text(json.dumps(report, indent=2) + "\n")
    png = out_path.with_suffix(".png")
    plot(report, png)
    print(f"wrote {out_path} and {png}")


def plot(report: dict[str, Any], path: Path) -> None:
    """Memory and time bars (1), per-unroll PSNR (2), equal-memory PSNR (3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if "equal_architecture" in report else 1
    fig, axes = plt.subplots(1, panels + 1, figsize=(4.2 * (panels + 1), 3.6), squeeze=False)
    ax = axes[0]
    runs = report["memory_time"]["runs"]
    names = list(runs)
    colors = ["C0", "C1", "C2", "C3"][: len(names)]
    ax[0].bar(names, [runs[k]["activations_and_grads_mb"] for k in names], color=colors)
    ax[0].set_ylabel("peak activations + gradients (MB)")
    ax[0].set_title(f"MoDL N={runs['e2e']['unrolls']}: memory")
    ax[1].bar(names, [runs[k]["time_per_iter_s"] for k in names], color=colors)
    ax[1].set_ylabel("time per iteration (s)")
    ax[1].set_title("time per iteration")
    if panels == 3:
        arch = report["equal_architecture"]
        for k, c in (("e2e", "C0"), ("gleam", "C2")):
            curve = [arch[k]["psnr_zero_filled"]] + arch[k]["psnr_per_unroll"]
            ax[2].plot(range(len(curve)), curve, "o-", color=c, label=k)
        ax[2].set_xlabel("N_inf (unrolls run at inference)")
        ax[2].set_ylabel("PSNR (dB), held-out")
        qarch = {"pgd": "PGD", "modl": "MoDL"}[report["config"].get("quality_arch", "modl")]
        ax[2].set_title(f"equal architecture ({qarch} N={arch['e2e']['unrolls']}): early exit")
        ax[2].legend()
        mem = report["equal_memory"]
        labels = [f"e2e N={mem['e2e']['unrolls']}", f"GLEAM N={mem['gleam']['unrolls']}"]
        vals = [mem["e2e"]["psnr"], mem["gleam"]["psnr"]]
        bars = ax[3].bar(labels, vals, color=["C0", "C2"])
        for bar, k in zip(bars, ("e2e", "gleam")):
            ax[3].annotate(
                f"{mem[k]['activations_and_grads_mb']:.0f} MB",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
            )
        for i, k in enumerate(("e2e", "gleam")):
            seeds = [r["psnr"] for r in mem[k]["per_seed"]]
            ax[3].plot([i] * len(seeds), seeds, "k.", zorder=3)
        ax[3].axhline(mem["e2e"]["psnr_zero_filled"], color="grey", ls="--", lw=1)
        ax[3].set_ylim(min(vals + [mem["e2e"]["psnr_zero_filled"]]) - 1, max(vals) + 1)
        ax[3].set_ylabel("PSNR (dB), held-out")
        ax[3].set_title(f"equal memory ({qarch}; dashed: zero-filled)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

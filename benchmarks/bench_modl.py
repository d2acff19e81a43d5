"""MoDL cost per slice: forward and forward+backward time and peak memory, against the FFT floor.

Each configuration runs in a fresh subprocess so that its peak memory (CPU: the resident-set
high-water mark above the process's state after setup; CUDA: ``max_memory_allocated``) is its
own. The floor is the time of the FFT pairs a MoDL forward cannot avoid
(``Nu * (1 + 2 * NCG) + 1`` centered 2D FFTs over all coils), measured in the same run.

    python benchmarks/bench_modl.py --out benchmarks/results/modl.json [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = [(64, 4), (128, 8), (320, 15)]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _timeit(fn, device: str, repeats: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_one(size: int, coils: int, unrolls: int, cg: int, device: str, repeats: int) -> dict:
    import torch

    from recon.data.sample import Sample
    from recon.models import build_model, count_parameters
    from recon.physics import SenseOp, fft2c, ifft2c
    from recon.train.losses import ssim_loss

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(1, coils, size, size, dtype=torch.complex64, generator=g)
    maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = (torch.rand(1, size, size, generator=g) < 0.25).float()
    x = torch.randn(1, size, size, dtype=torch.complex64, generator=g)
    maps, mask, x = maps.to(device), mask.to(device), x.to(device)
    op = SenseOp(maps, mask)
    y = op.forward(x)
    sample = Sample(y, mask, maps, op.rss(x).detach())
    model = build_model(num_unrolls=unrolls, cg_iters=cg).to(device)

    def fwd() -> None:
        with torch.no_grad():
            model(y, op)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        loss = ssim_loss(model(y, op), sample, op)  # type: ignore[arg-type]
        loss.backward()

    k = y.clone()

    def ffts() -> None:
        with torch.no_grad():
            for _ in range(unrolls * (1 + 2 * cg) // 2 + 1):
                ifft2c(fft2c(k))

    base_mb = _rss_mb()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t_fft = _timeit(ffts, device, repeats)
    t_fwd = _timeit(fwd, device, repeats)
    peak_fwd = (
        (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        if device == "cuda"
        else _rss_mb() - base_mb
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_bwd = _timeit(fwd_bwd, device, repeats)
    peak_train = (
        (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        if device == "cuda"
        else _rss_mb() - base_mb
    )
    return {
        "size": size,
        "coils": coils,
        "unrolls": unrolls,
        "cg_iters": cg,
        "num_parameters": count_parameters(model),
        "fft_floor_s": t_fft,
        "forward_s": t_fwd,
        "forward_backward_s": t_bwd,
        "forward_over_fft_floor": t_fwd / t_fft,
        "forward_backward_over_forward": t_bwd / t_fwd,
        "peak_forward_mb": peak_fwd,
        "peak_train_mb": peak_train,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/modl.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--unrolls", type=int, default=6)
    parser.add_argument("--cg-iters", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="only 64x64/4 coils, 2 repeats")
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one configuration, JSON on stdout
        import torch

        from recon.runtime import tune_malloc

        tune_malloc()  # as the fedunroll entry points do (recon/runtime.py)

        if args.device == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads()))
        row = run_one(
            args.one[0], args.one[1], args.unrolls, args.cg_iters, args.device, args.repeats
        )
        print(json.dumps(row))
        return 0
    sizes = SIZES[:1] if args.quick else SIZES
    repeats = 2 if args.quick else args.repeats
    rows = []
    for size, coils in sizes:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(size),
            str(coils),
            "--device",
            args.device,
            "--unrolls",
            str(args.unrolls),
            "--cg-iters",
            str(args.cg_iters),
            "--repeats",
            str(repeats),
        ]
        print(
            f"[bench_modl] {size}x{size}, {coils} coils, "
            f"Nu={args.unrolls}, NCG={args.cg_iters} ...",
            file=sys.stderr,
            flush=True,
        )
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"  forward {row['forward_s'] * 1e3:.1f} ms "
            f"({row['forward_over_fft_floor']:.1f}x FFT floor), "
            f"forward+backward {row['forward_backward_s'] * 1e3:.1f} ms, "
            f"peak train +{row['peak_train_mb']:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    import torch

    result = {
        "benchmark": "modl",
        "device": args.device,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"[bench_modl] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

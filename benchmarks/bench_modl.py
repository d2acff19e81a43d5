"""MoDL cost per slice against the FFT floor and a plain PyTorch MoDL, measured interleaved.

For each size (default 128x128 / 8 coils and 320x320 / 15 coils; Nu=6, NCG=6, the 481k U-Net,
batch 1) one fresh subprocess times, round-robin and ``--repeats`` times (medians reported):

* ``fft_floor``: the FFTs a MoDL forward cannot avoid, bare ``torch.fft.fft2`` / ``ifft2`` over
  all coils (``Nu * 2 * NCG`` for the CG normals plus one for ``A^H y``), no shifts;
* ``denoiser_floor``: the U-Net alone, ``Nu`` calls (no grad): with the FFT floor, what a MoDL
  forward cannot avoid whatever its physics does (``forward_over_floors``);
* ``project``: :func:`recon.models.build_model` forward (no grad) and training step
  (forward, SSIM loss on the RSS magnitude, backward);
* ``yardstick``: the same network written the straightforward way in this file
  (:class:`PlainMoDL`: ``torch.fft`` with ``fftshift`` / ``ifftshift``, coil expansion by
  broadcasting, a textbook CG, ``A^H y`` in every unroll, the SSIM of a ones/n ``conv2d``; the
  fastMRI U-Net's ``nn.InstanceNorm2d``, :func:`plain_unet`), with the project model's
  weights (its output is checked against the project's).

Ratios are the medians of the per-repeat ratios, so a machine shared with other work (load
drifts between repeats) still compares like with like. Each size's peak memory is the resident
set (CUDA: ``max_memory_allocated``) above the process's state after setup, over the project
model's steps.

    python benchmarks/bench_modl.py --out benchmarks/results/modl_cpu.json [--device cuda]
    python benchmarks/bench_modl.py --quick      # 64x64 / 4 coils, 2 repeats (a smoke test)

``--device cuda`` runs the denoiser under bf16 autocast (``--amp``, FFT, CG and loss stay fp32)
and feeds the inputs from pinned host memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

SIZES = [(128, 8), (320, 15)]
TARGET_STEP_OVER_YARDSTICK = 0.75
TARGET_FORWARD_OVER_FFT_AT_320 = 2.0


# --- the yardstick: MoDL written the straightforward way -------------------------------------
def plain_fft2c(x: torch.Tensor) -> torch.Tensor:
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    x = torch.fft.fft2(x, dim=(-2, -1), norm="ortho")
    return torch.fft.fftshift(x, dim=(-2, -1))


def plain_ifft2c(k: torch.Tensor) -> torch.Tensor:
    k = torch.fft.ifftshift(k, dim=(-2, -1))
    k = torch.fft.ifft2(k, dim=(-2, -1), norm="ortho")
    return torch.fft.fftshift(k, dim=(-2, -1))


def plain_ssim(x: torch.Tensor, y: torch.Tensor, win: int = 7) -> torch.Tensor:
    """Mean SSIM of ``[B, H, W]`` images, uniform window by conv2d (fastMRI's SSIMLoss style)."""
    x, y = x.unsqueeze(1), y.unsqueeze(1)
    dr = y.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    w = torch.ones(1, 1, win, win, dtype=x.dtype, device=x.device) / win**2
    n = win**2
    cov = n / (n - 1)
    ux, uy = F.conv2d(x, w), F.conv2d(y, w)
    uxx, uyy, uxy = F.conv2d(x * x, w), F.conv2d(y * y, w), F.conv2d(x * y, w)
    vx, vy, vxy = cov * (uxx - ux * ux), cov * (uyy - uy * uy), cov * (uxy - ux * uy)
    c1, c2 = (0.01 * dr) ** 2, (0.03 * dr) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def plain_unet(net: nn.Module) -> nn.Module:
    """A copy of the project U-Net (same layers, same weights) with the normalisation layer the
    fastMRI reference U-Net uses, ``nn.InstanceNorm2d`` followed by the in-place LeakyReLU: the
    U-Net as a straightforward MoDL writes it. The project computes the same normalisation as a
    group norm (:class:`recon.models.denoisers.InstanceNorm`)."""
    from recon.models.denoisers import InstanceNorm

    plain = copy.deepcopy(net)
    swapped = 0
    for seq in plain.modules():
        if isinstance(seq, nn.Sequential):
            for i, layer in enumerate(seq):
                if isinstance(layer, InstanceNorm):
                    seq[i] = nn.InstanceNorm2d(layer.num_features, eps=layer.eps)
                    swapped += 1
    if not swapped:
        raise RuntimeError("the project U-Net has no InstanceNorm layer to write plainly")
    return plain


class PlainMoDL(nn.Module):
    """MoDL (Nu unrolls of U-Net denoiser then NCG CG steps), no tricks."""

    def __init__(self, unet: nn.Module, num_unrolls: int, cg_iters: int, log_lam: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.num_unrolls, self.cg_iters = num_unrolls, cg_iters
        self.log_lam = nn.Parameter(log_lam.detach().clone())

    @staticmethod
    def A(x: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask * plain_fft2c(maps * x[:, None])

    @staticmethod
    def AH(y: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.sum(maps.conj() * plain_ifft2c(mask * y), dim=1)

    def cg(self, b: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lam = self.log_lam.exp()
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = torch.sum(r.conj() * r).real
        for _ in range(self.cg_iters):
            Ap = self.AH(self.A(p, maps, mask), maps, mask) + lam * p
            alpha = rs / torch.sum(p.conj() * Ap).real
            x = x + alpha * p
            r = r - alpha * Ap
            rs_new = torch.sum(r.conj() * r).real
            p = r + (rs_new / rs) * p
            rs = rs_new
        return x

    def forward(self, y: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.AH(y, maps, mask)
        for _ in range(self.num_unrolls):
            chans = torch.stack([x.real, x.imag], dim=1)
            out = self.unet(chans)
            z = x + torch.complex(out[:, 0], out[:, 1])
            x = self.cg(self.AH(y, maps, mask) + self.log_lam.exp() * z, maps, mask)
        return x

    @staticmethod
    def loss(x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rss = torch.sqrt(torch.sum((maps * x[:, None]).abs() ** 2, dim=1).clamp_min(1e-12))
        return 1.0 - plain_ssim(rss, target).mean()


# --- measurement ------------------------------------------------------------------------------
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _setup(
    size: int, coils: int, unrolls: int, cg: int, device: str, amp: bool, compile: bool = False
) -> dict[str, Any]:
    from recon.data.sample import Sample
    from recon.models import build_model
    from recon.models.unrolled import MoDL, set_denoiser_autocast
    from recon.physics import SenseOp
    from recon.train.losses import ssim_loss

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(1, coils, size, size, dtype=torch.complex64, generator=g)
    maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = (torch.rand(1, size, size, generator=g) < 0.25).float()
    x = torch.randn(1, size, size, dtype=torch.complex64, generator=g)
    if device == "cuda":  # host tensors from pinned memory, copied asynchronously
        maps, mask, x = (t.pin_memory().to(device, non_blocking=True) for t in (maps, mask, x))
    op = SenseOp(maps, mask)
    with torch.no_grad():
        y = op.forward(x)
        target = op.rss(x)
    sample = Sample(y, mask, maps, target)
    model = build_model(num_unrolls=unrolls, cg_iters=cg).to(device)
    assert isinstance(model, MoDL)
    if amp:
        set_denoiser_autocast(model, torch.bfloat16)
    denoiser = model.denoiser(0)
    plain = PlainMoDL(plain_unet(denoiser.net), unrolls, cg, model.lam.log()).to(device)

    def project_forward() -> None:
        with torch.no_grad():
            model(y, SenseOp(maps, mask))

    def step_of(net: nn.Module) -> Any:
        def step() -> None:
            net.zero_grad(set_to_none=True)
            physics = SenseOp(maps, mask)  # built per batch, as the trainer does
            loss = ssim_loss(net(y, physics), sample, physics)  # type: ignore[arg-type]
            loss.backward()

        return step

    project_step = step_of(model)

    def plain_forward() -> None:
        with torch.no_grad():
            plain(y, maps, mask)

    def plain_step() -> None:
        plain.zero_grad(set_to_none=True)
        loss = plain.loss(plain(y, maps, mask), maps, target)
        loss.backward()

    k = y.clone()
    n_pairs = unrolls * cg

    def fft_floor() -> None:
        with torch.no_grad():
            for _ in range(n_pairs):
                torch.fft.ifft2(torch.fft.fft2(k, norm="ortho"), norm="ortho")
            torch.fft.ifft2(k, norm="ortho")

    chans = torch.stack([x.real, x.imag], dim=1)

    def denoiser_floor() -> None:  # the CNN alone, Nu times: what no physics change removes
        with torch.no_grad():
            for _ in range(unrolls):
                denoiser.net(chans)

    extra: dict[str, Any] = {}
    if compile:  # train.compile = true: the same model with its U-Net compiled (recon.train.accel)
        from recon.train.accel import compile_denoisers

        compiled = build_model(num_unrolls=unrolls, cg_iters=cg).to(device)
        compiled.load_state_dict(model.state_dict())
        if amp:
            set_denoiser_autocast(compiled, torch.bfloat16)
        compile_denoisers(compiled)
        extra = {"compiled_step": step_of(compiled)}  # first called after the peak is measured

    # the yardstick computes the same thing (checked before timing)
    with torch.no_grad():
        a = model(y, SenseOp(maps, mask))
        b = plain(y, maps, mask)
    return {
        **extra,
        "model": model,
        "agreement": float((a - b).abs().max() / b.abs().max()),
        "fft_floor": fft_floor,
        "denoiser_floor": denoiser_floor,
        "project_forward": project_forward,
        "yardstick_forward": plain_forward,
        "project_step": project_step,
        "yardstick_step": plain_step,
    }


def run_one(
    size: int,
    coils: int,
    unrolls: int,
    cg: int,
    device: str,
    repeats: int,
    amp: bool,
    compile: bool = False,
):
    from recon.models import count_parameters

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    bench = _setup(size, coils, unrolls, cg, device, amp, compile)
    model, agreement, project_step = bench["model"], bench["agreement"], bench["project_step"]
    base_mb = _rss_mb()
    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    project_step()  # warm-up of the project model alone: its peak
    sync()
    peak_train = (
        (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        if device == "cuda"
        else _rss_mb() - base_mb
    )
    compile_s = None
    if compile:  # the one-off compile, timed apart (after the peak: ru_maxrss only grows)
        t0 = time.perf_counter()
        bench["compiled_step"]()
        sync()
        compile_s = time.perf_counter() - t0
    names: tuple[str, ...] = ("fft_floor", "denoiser_floor", "project_forward")
    names += ("yardstick_forward", "project_step", "yardstick_step")
    names += ("compiled_step",) if compile else ()
    fns = {name: bench[name] for name in names}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved: every repeat times each variant once
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    med = {f"{name}_s": statistics.median(t) for name, t in times.items()}
    compiled = (
        {
            "compile_s": compile_s,
            "compiled_step_over_yardstick": ratio("compiled_step", "yardstick_step"),
            "compiled_step_over_step": ratio("compiled_step", "project_step"),
        }
        if compile
        else {}
    )
    return {
        "size": size,
        "coils": coils,
        "unrolls": unrolls,
        "cg_iters": cg,
        "batch": 1,
        "repeats": repeats,
        "num_parameters": count_parameters(model),
        "yardstick_max_rel_difference": agreement,
        **med,
        "forward_s": med["project_forward_s"],
        "forward_backward_s": med["project_step_s"],
        "step_over_yardstick": ratio("project_step", "yardstick_step"),
        "forward_over_yardstick": ratio("project_forward", "yardstick_forward"),
        "forward_over_fft_floor": ratio("project_forward", "fft_floor"),
        "yardstick_forward_over_fft_floor": ratio("yardstick_forward", "fft_floor"),
        # the U-Net alone (Nu calls) against the FFTs: forward / FFT floor cannot go below
        # 1 + this; forward_over_floors is the forward against FFTs + U-Net together
        "denoiser_over_fft_floor": ratio("denoiser_floor", "fft_floor"),
        "forward_over_floors": statistics.median(
            f / (a + b)
            for f, a, b in zip(
                times["project_forward"], times["fft_floor"], times["denoiser_floor"], strict=True
            )
        ),
        "step_over_fft_floor": ratio("project_step", "fft_floor"),
        "step_over_forward": ratio("project_step", "project_forward"),
        "peak_train_mb": peak_train,
        **compiled,
        "times_s": times,
    }


def profile_table(size: int, coils: int, unrolls: int, cg: int, rows: int = 15) -> str:
    """Markdown: the top ``rows`` ops by self CPU time of one project training step and one
    yardstick step (torch.profiler, after two warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile

    bench = _setup(size, coils, unrolls, cg, "cpu", False)
    out = [f"## {size}x{size}, {coils} coils, Nu={unrolls}, NCG={cg}, batch 1\n"]
    for name in ("project_step", "yardstick_step"):
        fn = bench[name]
        fn()
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        out.append(f"### {name.replace('_', ' ')}: {total / 1e3:.0f} ms self CPU in all\n")
        out.append("| op | self CPU ms | % | calls |")
        out.append("|---|---:|---:|---:|")
        for e in events[:rows]:
            ms = e.self_cpu_time_total / 1e3
            out.append(
                f"| `{e.key}` | {ms:.1f} | {100 * e.self_cpu_time_total / total:.1f} | {e.count} |"
            )
        out.append("")
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['size']}x{r['size']}\n{r['coils']} coils" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    ax = axes[0]
    xs = range(len(rows))
    bars = [("step", "step_over_yardstick"), ("fwd", "forward_over_yardstick")]
    if "compiled_step_over_yardstick" in rows[0]:
        bars.insert(1, ("step, train.compile", "compiled_step_over_yardstick"))
    w = 0.8 / len(bars)
    for j, (label, key) in enumerate(bars):
        offset = (j - (len(bars) - 1) / 2) * w
        ax.bar([i + offset for i in xs], [r[key] for r in rows], w, label=label)
    ax.axhline(TARGET_STEP_OVER_YARDSTICK, color="k", ls="--", lw=1, label="step target")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("time / plain PyTorch MoDL")
    ax.legend(fontsize=8)
    ax = axes[1]
    w = 0.35
    ax.bar([i - w / 2 for i in xs], [r["forward_over_fft_floor"] for r in rows], w, label="project")
    ax.bar(
        [i + w / 2 for i in xs],
        [r["yardstick_forward_over_fft_floor"] for r in rows],
        w,
        label="plain",
    )
    ax.axhline(TARGET_FORWARD_OVER_FFT_AT_320, color="k", ls="--", lw=1, label="target (320)")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("forward / FFT floor")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"MoDL Nu={rows[0]['unrolls']}, NCG={rows[0]['cg_iters']}, {result['device']}, "
        f"{result['threads']} threads (medians of interleaved repeats)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/modl_cpu.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--unrolls", type=int, default=6)
    parser.add_argument("--cg-iters", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the denoiser")
    parser.add_argument("--quick", action="store_true", help="only 64x64/4 coils, 2 repeats")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the step with train.compile = true (compile time reported apart)",
    )
    parser.add_argument(
        "--sizes", default="128x8,320x15", help="comma-separated SIZExCOILS (default 128x8,320x15)"
    )
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile", metavar="MD", help="write the top-15 ops of one step per size to MD and exit"
    )
    args = parser.parse_args()
    amp = args.amp or args.device == "cuda"
    sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",") if item]
    if args.profile:
        torch.set_num_threads(args.threads)
        parts = [
            "# One MoDL training step, top 15 ops by self CPU time\n",
            f"`python benchmarks/bench_modl.py --profile {args.profile}` (torch "
            f"{torch.__version__}, {args.threads} threads; one step each, so the shares matter "
            "more than the milliseconds).\n",
        ]
        parts += [profile_table(s, c, args.unrolls, args.cg_iters) for s, c in sizes]
        Path(args.profile).write_text("\n".join(parts))
        print(f"[bench_modl] wrote {args.profile}", file=sys.stderr)
        return 0
    if args.one:  # child process: one configuration, JSON on stdout
        from recon.runtime import tune_malloc

        tune_malloc()  # as the fedunroll entry points do (recon/runtime.py)
        torch.set_num_threads(args.threads)
        size, coils = args.one
        row = run_one(
            size, coils, args.unrolls, args.cg_iters, args.device, args.repeats, amp, args.compile
        )
        print(json.dumps(row))
        return 0
    sizes = [(64, 4)] if args.quick else sizes
    repeats = 2 if args.quick else args.repeats
    rows = []
    for size, coils in sizes:
        cmd = [sys.executable, __file__, "--one", str(size), str(coils), "--device", args.device]
        cmd += ["--unrolls", str(args.unrolls), "--cg-iters", str(args.cg_iters)]
        cmd += ["--repeats", str(repeats), "--threads", str(args.threads)]
        cmd += ["--amp"] if amp else []
        cmd += ["--compile"] if args.compile else []
        print(f"[bench_modl] {size}x{size}, {coils} coils ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"  step {row['project_step_s'] * 1e3:.0f} ms = {row['step_over_yardstick']:.2f}x "
            f"plain MoDL; forward {row['forward_over_fft_floor']:.2f}x FFT floor "
            f"(plain {row['yardstick_forward_over_fft_floor']:.2f}x; the U-Net alone "
            f"{row['denoiser_over_fft_floor']:.2f}x, forward {row['forward_over_floors']:.2f}x "
            "FFTs + U-Net), "
            f"peak train +{row['peak_train_mb']:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
        if args.compile:
            print(
                f"  train.compile: step {row['compiled_step_s'] * 1e3:.0f} ms = "
                f"{row['compiled_step_over_yardstick']:.2f}x plain MoDL "
                f"({row['compiled_step_over_step']:.2f}x eager; "
                f"compiled in {row['compile_s']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    big = [r for r in rows if r["size"] >= 320]
    result = {
        "benchmark": "modl",
        "device": args.device,
        "amp": amp,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": args.threads,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "targets": {
            "step_over_yardstick_max": TARGET_STEP_OVER_YARDSTICK,
            "forward_over_fft_floor_at_320_max": TARGET_FORWARD_OVER_FFT_AT_320,
            "step_met": all(r["step_over_yardstick"] <= TARGET_STEP_OVER_YARDSTICK for r in rows),
            "compiled_step_met": all(
                r["compiled_step_over_yardstick"] <= TARGET_STEP_OVER_YARDSTICK for r in rows
            )
            if args.compile
            else None,
            "forward_met": bool(big)
            and all(r["forward_over_fft_floor"] <= TARGET_FORWARD_OVER_FFT_AT_320 for r in big),
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    print(f"[bench_modl] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

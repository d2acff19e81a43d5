"""Whole-image vs inside-the-object metrics, and the effect of calibrating coil maps as a scanner.

Two measurements on synthetic sites (``recon.data.synth``), written to ``--out`` (JSON) with a
PNG next to it:

1. **Support vs whole image** on one site (default the brain T1 3T preset, 8 coils): SSIM /
   NRMSE / PSNR on the whole image and inside the object's support
   (:func:`recon.metrics.support_mask`), plus fastMRI's per-volume SSIM, for zero-filled,
   SENSE, CS (:func:`recon.reconstruct.cs_l1_wavelet`) and a briefly trained MoDL, on the
   held-out slices. SENSE and CS zero the background where the ESPIRiT maps vanish, which costs
   them whole-image SSIM against a noisy reference, not SSIM inside the object.
2. **Calibration** on the default four sites: SENSE (and, on the first site, the trained model)
   with coil maps from a fully sampled 24x24 centre (the old default) vs from the ACS lines the
   mask keeps (``SiteDataset``'s default; on these small matrices the 8-line floor).

Usage::

    python benchmarks/bench_support_metrics.py                 # ~2 min on 2 CPU cores
    python benchmarks/bench_support_metrics.py --quick --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recon.data import SiteDataset, generate_sites  # noqa: E402
from recon.data.sample import Sample, collate  # noqa: E402
from recon.metrics import nrmse, psnr, ssim, support_mask, support_metrics, volume_ssim  # noqa: E402
from recon.models import build_model  # noqa: E402
from recon.reconstruct import cs_l1_wavelet  # noqa: E402
from recon.train import TrainConfig, train  # noqa: E402
from recon.train.trainer import zero_filled  # noqa: E402

OLD_CALIB = 24  # the former default: a fully sampled 24x24 centre


def _sense(s: Sample) -> torch.Tensor:
    import sigpy.mri.app as app

    x = app.SenseRecon(
        s.kspace.numpy(), s.maps.numpy(), lamda=1e-2, weights=s.mask.numpy(), max_iter=30,
        show_pbar=False,
    ).run()  # fmt: skip
    return torch.from_numpy(np.asarray(x, dtype=np.complex64))


def _cs(s: Sample) -> torch.Tensor:
    x, _ = cs_l1_wavelet(s.kspace.numpy(), s.maps.numpy(), s.mask.numpy())
    return torch.from_numpy(x)


def _images(ds: SiteDataset, method: str, model: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RSS images and references ``[S, H, W]`` of every slice of ``ds``."""
    out, ref = [], []
    for s in ds:
        b = collate([s])
        phys = b.physics()
        with torch.no_grad():
            if method == "zero-filled":
                img = zero_filled(b)
            elif method == "model":
                img = phys.rss(model(b.kspace, phys))
            else:
                img = phys.rss((_sense(s) if method == "sense" else _cs(s))[None])
        out.append(img[0])
        ref.append(b.target[0])
    return torch.stack(out), torch.stack(ref)


def _scores(img: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    inside = support_metrics(img, ref, support_mask(ref))
    return {
        "ssim": float(ssim(img, ref).mean()),
        "nrmse": float(nrmse(img, ref).mean()),
        "psnr": float(psnr(img, ref).mean()),
        "support_ssim": float(inside["ssim"].mean()),
        "support_nrmse": float(inside["nrmse"].mean()),
        "support_psnr": float(inside["psnr"].mean()),
        "volume_ssim": volume_ssim(img, ref),
    }


def _model(ds: SiteDataset, steps: int) -> Any:
    torch.manual_seed(0)
    model = build_model(num_unrolls=3, cg_iters=3, unet_chans=8, unet_pools=2)
    train(model, ds, TrainConfig(steps=steps, lr=2e-3, seed=0), progress=False)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/support_metrics.json"))
    p.add_argument("--slices", type=int, default=30, help="slices per synthetic site")
    p.add_argument("--steps", type=int, default=150, help="MoDL training steps")
    p.add_argument("--sites", type=int, default=4, help="sites of the calibration comparison")
    p.add_argument("--quick", action="store_true", help="smoke run: 32 px, 2 sites, 10 steps")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    matrix = 32 if args.quick else None
    steps = 10 if args.quick else args.steps
    n_sites = 2 if args.quick else args.sites
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_sites(root, n_sites=n_sites, n_slices=args.slices, matrix=matrix)
        site0 = root / "site0"
        train_set, test_set = SiteDataset(site0, "train"), SiteDataset(site0, "test")
        model = _model(train_set, steps)
        support: dict[str, Any] = {}
        for method in ("zero-filled", "sense", "cs", "model"):
            support[method] = _scores(*_images(test_set, method, model))
            print(method, {k: round(v, 4) for k, v in support[method].items()}, flush=True)
        calibration: dict[str, Any] = {}
        for site in sorted(root.glob("site*")):
            row: dict[str, Any] = {}
            for label, calib in (("fully_sampled_24x24", OLD_CALIB), ("acquired_acs", None)):
                test = SiteDataset(site, "test", calib=calib, cache_dir=root / f"c{label}")
                row[label] = {
                    "calibration": test.calibration,
                    "sampling": test.sampling().as_dict(),
                    "sense": _scores(*_images(test, "sense")),
                }
                if site.name == "site0":  # the model trained and evaluated with these maps
                    tr = SiteDataset(site, "train", calib=calib, cache_dir=root / f"c{label}")
                    row[label]["model"] = _scores(*_images(test, "model", _model(tr, steps)))
            calibration[site.name] = row
            print(site.name, json.dumps(row)[:400], flush=True)
    report = {
        "what": "whole-image vs inside-the-object metrics (recon.metrics) on the held-out slices "
        "of synthetic site0; SENSE (and a MoDL on site0) with coil maps from a fully sampled "
        "24x24 centre vs from the mask's ACS lines (8-line floor)",
        "setup": {
            "slices_per_site": args.slices,
            "matrix": matrix or "presets (48-80 px)",
            "modl": {"num_unrolls": 3, "cg_iters": 3, "unet_chans": 8, "steps": steps},
            "mask": "random1d R=4, 8% ACS, seed 0",
            "support": "reference RSS, Gaussian sigma 2 px, > 10% of max, holes filled",
            "threads": torch.get_num_threads(),
        },
        "support_vs_whole": support,
        "calibration": calibration,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {report['seconds']} s")
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    sup = report["support_vs_whole"]
    methods = list(sup)
    x = np.arange(len(methods))
    for i, (key, label) in enumerate(
        (
            ("ssim", "whole image"),
            ("support_ssim", "inside the object"),
            ("volume_ssim", "per volume"),
        )
    ):
        a.bar(x + (i - 1) * 0.27, [sup[m][key] for m in methods], 0.27, label=label)
    a.set_xticks(x, methods)
    a.set_ylabel("SSIM")
    a.set_ylim(0, 1)
    a.set_title("site0 held-out slices")
    a.legend(fontsize=8)
    cal = report["calibration"]
    sites = list(cal)
    x = np.arange(len(sites))
    for i, (label, name) in enumerate(
        (
            ("fully_sampled_24x24", "maps from full 24x24"),
            ("acquired_acs", "maps from ACS (floor 8)"),
        )
    ):
        b.bar(
            x + (i - 0.5) * 0.4, [cal[s][label]["sense"]["nrmse"] for s in sites], 0.4, label=name
        )
    b.set_xticks(x, sites)
    b.set_ylabel("SENSE NRMSE (whole image)")
    b.set_title("coil-map calibration")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())

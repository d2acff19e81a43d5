"""``fedunroll train`` (centralized / single-site) and ``fedunroll recon`` (reconstruct a file)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedunroll.errors import guard as _guard
from recon.runtime import resolve_device

if TYPE_CHECKING:
    from recon.config import RunConfig

DEFAULT_DATA = Path("data/synth")

# `fedunroll recon --cs-lambda` default (recon.reconstruct.CS_LAMBDA; kept here so that
# building the parser imports no torch)
CS_LAMBDA = 1e-3

ARCH_NAMES = {"modl": "MoDL", "pgd": "unrolled PGD"}

# Defaults of `fedunroll train` that differ from the run config's (the federated default job):
# the paper's MoDL (Levac et al. 2023 Sec. 3.1: Nu=6, NCG=6), trained for 300 steps (a couple of
# minutes on CPU). Every other key, and every key of `recon` and `personalize`, defaults as in
# `fedunroll config`.
TRAIN_DEFAULTS: dict[str, Any] = {
    "model.num-unrolls": 6,
    "model.cg-iters": 6,
    "train.local-steps": 300,
}

KEYS_HELP = (
    "Keys are the run config's, the same for every command (`fedunroll config` lists them with "
    "their defaults)."
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE.toml", help="TOML overrides ([model] [train] [data] ... tables)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one run-config key, e.g. --set model.num-unrolls=4 --set train.lr=1e-3 "
        "--set data.accel=8 (see `fedunroll config`)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")


def load_run_config(args: argparse.Namespace, defaults: Mapping[str, Any] = {}) -> RunConfig:
    """Defaults < config file < ``--set``, parsed into the one :class:`~recon.config.RunConfig`.

    ``train.method`` (e2e, checkpoint, gleam, layerwise) is checked against the architecture
    here, before any data is read; an unknown key fails naming its near matches.
    """
    from fedunroll.overrides import load_config_file, parse_sets
    from recon.config import parse_run_config

    return parse_run_config({**defaults, **load_config_file(args.config), **parse_sets(args.set)})


def default_sites(root: Path = DEFAULT_DATA, n_sites: int = 4) -> list[Path]:
    """The embedded synthetic sites, generated on first use."""
    from recon.data import generate_sites

    if not any(root.glob("site*")):
        print(f"generating {n_sites} synthetic sites in {root} ...", file=sys.stderr, flush=True)
        generate_sites(root, n_sites=n_sites)
    return sorted(p for p in root.glob("site*") if p.is_dir())


def _dataset(site: Path, split: str, cfg: RunConfig):  # type: ignore[no-untyped-def]
    """A site's split as the federation's sites load it (``data.max-train-slices``: train)."""
    from recon.data import SiteDataset

    limit = cfg.data.max_train_slices if split == "train" else 0
    return SiteDataset(site, split=split, **cfg.data.dataset_kwargs(max_slices=limit or None))


def format_table(rows: dict[str, dict[str, dict[str, float]]], methods: list[str]) -> str:
    """Per-site table: one row per site, SSIM / NRMSE / PSNR for each method."""
    head = f"{'site':<10}" + "".join(f"| {m:^26} " for m in methods)
    sub = f"{'':<10}" + "".join(f"| {'SSIM':>7} {'NRMSE':>7} {'PSNR':>8} " for _ in methods)
    lines = [head, sub, "-" * len(sub)]
    for site, by_method in rows.items():
        cells = []
        for m in methods:
            r = by_method.get(m)
            cells.append(
                f"| {r['ssim']:7.4f} {r['nrmse']:7.4f} {r['psnr']:8.2f} " if r else f"| {'-':^26} "
            )
        lines.append(f"{site:<10}" + "".join(cells))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import ConcatDataset

    from recon.models import build_model, count_parameters
    from recon.models.checkpoint import save_checkpoint
    from recon.train import evaluate
    from recon.train.methods import local_train

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_run_config(args, TRAIN_DEFAULTS)
    model_cfg, train_cfg = cfg.model, cfg.train
    device = resolve_device(args.device)
    options = cfg.method_options()
    sites = [Path(s) for s in args.sites] or default_sites()
    out = Path(args.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    train_sets = [_dataset(s, "train", cfg) for s in sites]
    test_sets = {s.name: _dataset(s, args.eval_split, cfg) for s in sites}
    model = build_model(model_cfg)
    n_train = sum(len(d) for d in train_sets)
    print(
        f"{ARCH_NAMES[model_cfg.arch]} ({model_cfg.denoiser}, Nu={model_cfg.num_unrolls}, "
        f"NCG={model_cfg.cg_iters}): {count_parameters(model):,} weights; "
        f"{n_train} training slices from {len(sites)} site(s); device {device}; "
        f"method {train_cfg.method}" + "".join(f" {k}={v}" for k, v in options.items() if v),
        flush=True,
    )
    sampling = {
        name: {**ds.sampling().as_dict(), "calibration": dict(ds.calibration)}
        for name, ds in test_sets.items()
    }
    for name, ds in test_sets.items():
        print(
            f"{name}: sampling {ds.sampling().describe()}; coil maps from "
            f"{ds.calibration['lines']} calibration lines ({ds.calibration['source']})",
            flush=True,
        )
    union: ConcatDataset = ConcatDataset(train_sets)
    result = local_train(
        train_cfg.method,
        model,
        union,  # type: ignore[arg-type]
        train_cfg,
        device,
        progress=True,
        **options,
    )
    print(
        f"trained {result.steps} steps in {result.seconds:.1f} s, "
        f"final loss {result.final_loss:.4f}"
    )
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, ds in test_sets.items():
        ours = evaluate(model, ds, device)
        zf = evaluate(None, ds, device)
        table[name] = {
            "zero-filled": zf.as_dict(),
            "model": ours.as_dict(),
        }
    print(
        f"\n{args.eval_split} slices, RSS magnitude (sampling: "
        + "; ".join(f"{n} {test_sets[n].sampling().describe()}" for n in test_sets)
        + "):"
    )
    print(format_table(table, ["zero-filled", "model"]))
    out.mkdir(parents=True, exist_ok=True)
    # the run config travels with the weights: `recon` and `personalize` load the same slices
    save_checkpoint(model, model_cfg, out / "model.pt", run_config=cfg.flat())
    results = {
        "schema": "fedunroll.train/1",
        "sites": [str(s) for s in sites],
        "config": {
            "model": model_cfg.model_dump(),
            "train": train_cfg.model_dump(),
            "data": cfg.data.model_dump(),
            **({train_cfg.method: options} if options else {}),
        },
        "train": {
            "steps": result.steps,
            "seconds": result.seconds,
            "final_loss": result.final_loss,
        },
        "sampling": sampling,
        "final": table,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / 'model.pt'} and {out / 'results.json'}")
    return 0


def cmd_recon(args: argparse.Namespace) -> int:
    from recon.reconstruct import describe_report, reconstruct_file

    data_cfg = load_run_config(args).data
    prospective = True if args.prospective else (False if args.retrospective else None)
    report = reconstruct_file(
        args.input,
        method=args.method,
        out=args.out,
        checkpoint=args.checkpoint,
        data=data_cfg,
        device=resolve_device(args.device),
        png_dir=args.png,
        cs_lambda=args.cs_lambda,
        num_unrolls=args.num_unrolls,
        prospective=prospective,
        mask=args.mask,
        cache_dir=args.cache_dir,
        cs_iters=args.cs_iters,
        nifti=not args.no_nifti,
    )
    print(describe_report(report))
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    from recon.config import VALID_KEYS
    from recon.models.checkpoint import load_checkpoint, save_checkpoint
    from recon.train.personalize import PersonalizeConfig, personalize

    load_run_config(args)  # a bad key fails before the checkpoint is read
    device = resolve_device(args.device)
    model, model_cfg, ckpt = load_checkpoint(args.checkpoint, device)
    # The run config that trained the model (a federation's or `fedunroll train`'s: the same data
    # pipeline, loss and seed), under --config / --set; keys of an older version are dropped.
    trained = {k: v for k, v in (ckpt.get("run_config") or {}).items() if k in VALID_KEYS}
    cfg = load_run_config(args, trained)
    p = cfg.personalize
    p_cfg = PersonalizeConfig(
        lrs=p.lr_values,
        max_epochs=p.max_epochs,
        folds=p.folds,
        patience=p.patience,
        min_gain=p.min_gain,
        loss=cfg.train.loss,
        seed=cfg.train.seed,
    )
    site = Path(args.site)
    train_set, test_set = _dataset(site, "train", cfg), _dataset(site, "test", cfg)
    out = Path(args.out or f"runs/personalize-{site.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(
        f"personalizing {args.checkpoint} at {site} ({len(train_set)} training slices, "
        f"{len(test_set)} test slices): {p_cfg.folds}-fold CV over r_fine in {list(p_cfg.lrs)}, "
        f"N_fine <= {p_cfg.max_epochs} epochs",
        flush=True,
    )
    tuned, report = personalize(model, train_set, p_cfg, device, test_set=test_set, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        tuned, model_cfg, out / "personalized_model.pt", source=str(args.checkpoint), site=site.name
    )
    report.update(site=str(site), checkpoint=str(args.checkpoint), config=p_cfg.model_dump())
    (out / "personalize.json").write_text(json.dumps(report, indent=2))
    b, a = report["before"], report["after"]
    print(report["decision"])
    print(
        f"test slices: SSIM {b['ssim']:.4f} -> {a['ssim']:.4f}, NRMSE {b['nrmse']:.4f} -> "
        f"{a['nrmse']:.4f}, PSNR {b['psnr']:.2f} -> {a['psnr']:.2f} dB"
    )
    print(
        f"wrote {out / 'personalized_model.pt'} and {out / 'personalize.json'} "
        "(nothing left the site)"
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        help="train a model centrally (or at one site) and evaluate it per site",
        description="Centralized / single-site training of MoDL or unrolled PGD. Without SITE "
        "arguments it trains on the embedded synthetic sites (generated on first use). "
        + KEYS_HELP
        + " Its own defaults: "
        + ", ".join(f"{k}={v}" for k, v in TRAIN_DEFAULTS.items())
        + " (the paper's MoDL).",
    )
    p.add_argument("sites", nargs="*", help="site folders (site/{train,val,test}/*.h5)")
    p.add_argument("--out", help="run directory (default runs/train-<time>)")
    p.add_argument("--eval-split", default="test", choices=["val", "test"])
    _add_config_args(p)
    p.set_defaults(func=_guard(cmd_train))

    r = sub.add_parser(
        "recon",
        help="reconstruct an h5 file (SENSE, CS, zero-filled or a trained model)",
        description="Reconstruct every slice of a fastMRI-layout multi-coil h5 file. "
        "Prospective: k-space undersampled at acquisition (exact zeros on the skipped lines; "
        "detected, or --prospective) is reconstructed with the mask read from its zero lines "
        "(or --mask) and coil maps from its acquired ACS lines; there is no reference, so no "
        "metrics. Retrospective: a fully sampled file is undersampled with --mask or the mask "
        "keys data.mask (random1d | equispaced1d | poisson2d), data.accel (R, ACS lines "
        "included), data.acs-frac (fully sampled centre, also the coil-map calibration lines) "
        "and data.seed, and SSIM / NRMSE / PSNR are printed against the fully sampled RSS, on "
        "the whole image and inside the object. Also data.crop and data.maps (espirit | "
        "jsense). Writes <stem>.<method>.h5 / .nii.gz / .json and png/ previews into --out "
        "(default runs/recon-<time>/), and the coil-map cache into <out>/cache, never next to "
        "the input. " + KEYS_HELP + " Here only data.* matter.",
    )
    r.add_argument("input", help="fastMRI-layout multi-coil h5 file")
    r.add_argument(
        "--method",
        default="sense",
        choices=["sense", "cs", "zero-filled", "model"],
        help="default sense (needs no checkpoint)",
    )
    r.add_argument("--checkpoint", help="model checkpoint (required for --method model)")
    r.add_argument(
        "--out",
        help="output folder (default runs/recon-<time>/); a path ending in .h5 names the image "
        "file (the report is next to it, .json)",
    )
    mode = r.add_mutually_exclusive_group()
    mode.add_argument(
        "--prospective",
        action="store_true",
        help="the file is undersampled at acquisition (default: detected from its zero lines)",
    )
    mode.add_argument(
        "--retrospective",
        action="store_true",
        help="the file is fully sampled: undersample it with --mask or the data.* mask keys",
    )
    r.add_argument(
        "--mask",
        metavar="FILE.npy|.h5",
        help="sampling mask [W], [H, W] or [slices, H, W] (h5: dataset 'mask'), phase encode "
        "along W; instead of the data.* mask keys or the file's zero lines",
    )
    r.add_argument("--png", help="folder for PNG previews (default <out>/png)")
    r.add_argument("--no-nifti", action="store_true", help="skip the NIfTI output")
    r.add_argument("--cache-dir", help="coil-map cache (default <out>/cache)")
    r.add_argument(
        "--cs-lambda",
        type=float,
        default=CS_LAMBDA,
        help=f"CS L1 weight relative to max |W A^H y| (default {CS_LAMBDA:g})",
    )
    r.add_argument("--cs-iters", type=int, default=100, help="CS iterations (default 100)")
    r.add_argument("--num-unrolls", type=int, help="early-exit inference with N_inf unrolls")
    _add_config_args(r)
    r.set_defaults(func=_guard(cmd_recon))

    pz = sub.add_parser(
        "personalize",
        help="fine-tune a global model at one site, hyper-parameters by k-fold CV",
        description="Client-side personalization (Levac et al. 2023 Sec. 3.4): choose the "
        "fine-tuning "
        "learning rate and epochs by k-fold cross-validation on the site's training slices, "
        "fine-tune, and report test metrics before and after. Keys: personalize.lrs, "
        "personalize.max-epochs, personalize.folds, personalize.patience, personalize.min-gain, "
        "data.* (defaults: the checkpoint's run config). Everything stays at the site. "
        + KEYS_HELP,
    )
    pz.add_argument("--checkpoint", required=True, help="global model (e.g. RUN/final_model.pt)")
    pz.add_argument("--site", required=True, help="site folder (site/{train,val,test}/*.h5)")
    pz.add_argument("--out", help="output folder (default runs/personalize-<site>-<time>)")
    _add_config_args(pz)
    pz.set_defaults(func=_guard(cmd_personalize))

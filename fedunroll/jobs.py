"""``fedunroll train`` (centralized / single-site) and ``fedunroll recon`` (reconstruct a file)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from recon.runtime import resolve_device

DEFAULT_DATA = Path("data/synth")


class DataConfig(BaseModel):
    """How slices are undersampled (Levac et al. 2023 Sec. 3.1 defaults: 1D random, R=4, 8% ACS)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mask: str = "random1d"
    accel: float = Field(4.0, ge=1)
    acs_frac: float = Field(0.08, gt=0, lt=1)
    seed: int = 0
    max_slices: int | None = Field(None, ge=1)
    maps: str = "espirit"
    crop: str = ""  # image-domain centre crop "HxW" (fastMRI readout oversampling); "" = none

    @field_validator("crop", mode="before")
    @classmethod
    def _crop(cls, value: Any) -> str:
        from recon.data.dataset import crop_text

        return crop_text(value)

    def dataset_kwargs(self, **extra: Any) -> dict[str, Any]:
        """:class:`~recon.data.dataset.SiteDataset` keyword arguments (``extra`` passed on)."""
        from recon.data.dataset import dataset_kwargs

        return dataset_kwargs(
            mask=self.mask,
            accel=self.accel,
            acs_frac=self.acs_frac,
            seed=self.seed,
            maps=self.maps,
            crop=self.crop,
            **extra,
        )


class GleamOptions(BaseModel):
    """``train.method = "gleam"`` (GLEAM Alg. 1 / 2): ``modules`` M (0: one per unroll),
    ``devices`` for P-GLEAM (module m on ``devices[m % D]``), per-module ``lrs`` / ``losses``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modules: int = Field(0, ge=0)
    devices: list[str] = []
    lrs: list[float] | None = None
    losses: list[str] | None = None


class LayerwiseOptions(BaseModel):
    """``train.method = "layerwise"`` (Ozturkler et al., ISMRM 2021): steps per convex block (0:
    split evenly)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps_per_block: int = Field(0, ge=0)


class TrainJob(NamedTuple):
    """A job's validated configuration: ``[model] [train] [data] [gleam] [layerwise]``."""

    model: Any  # recon.models.ModelConfig
    train: Any  # recon.train.TrainConfig
    data: DataConfig
    method: str
    gleam: GleamOptions
    layerwise: LayerwiseOptions

    def method_options(self) -> dict[str, Any]:
        """Keyword options of :func:`recon.train.methods.local_train` for ``train.method``."""
        from recon.train.methods import method_options

        g = self.gleam
        return method_options(
            self.method,
            gleam_modules=g.modules,
            gleam_devices=[resolve_device(d) for d in g.devices],
            gleam_lrs=g.lrs,
            gleam_losses=g.losses,
            steps_per_block=self.layerwise.steps_per_block,
        )


ARCH_NAMES = {"modl": "MoDL", "pgd": "unrolled PGD"}

# Defaults of the centralized job: the paper's MoDL, trained briefly (a couple of minutes on CPU).
TRAIN_DEFAULTS: dict[str, Any] = {"train.steps": 300, "train.lr": 1e-3}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with [model] [train] [data] tables")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one key, e.g. model.num_unrolls=4 train.lr=1e-3 data.accel=8 "
        "train.method=gleam gleam.modules=3",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")


def load_job_config(args: argparse.Namespace, defaults: dict[str, Any]) -> TrainJob:
    """Merge defaults < config file < --set into a validated :class:`TrainJob`.

    ``train.method`` (e2e, checkpoint, gleam, layerwise) picks the trainer; it is checked
    against the architecture here, before any data is read.
    """
    from fedunroll.overrides import load_config_file, parse_sets, split_sections
    from recon.models import ModelConfig
    from recon.train import TrainConfig
    from recon.train.methods import check_method

    flat = {**defaults, **load_config_file(args.config), **parse_sets(args.set)}
    groups = split_sections(flat, {"model", "train", "data", "gleam", "layerwise"})
    method = str(groups["train"].pop("method", "e2e"))
    model = build_section("model", ModelConfig, groups["model"])
    gleam = build_section("gleam", GleamOptions, groups["gleam"])
    try:
        check_method(method, model.num_unrolls, model.shared, model.denoiser, gleam.modules)
    except ValueError as exc:
        raise ValueError(f"bad configuration: {exc}") from None
    return TrainJob(
        model=model,
        train=build_section("train", TrainConfig, groups["train"]),
        data=build_section("data", DataConfig, groups["data"]),
        method=method,
        gleam=gleam,
        layerwise=build_section("layerwise", LayerwiseOptions, groups["layerwise"]),
    )


def build_section(section: str, cls: type[BaseModel], values: dict[str, Any]) -> Any:
    """Validate one config table; errors name the full key (``model.num_unroll: ...``)."""
    from pydantic import ValidationError

    try:
        return cls(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in (section, *err["loc"]))
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {msg} (got {err.get('input')!r})")
        raise ValueError("bad configuration: " + "; ".join(problems)) from None


def default_sites(root: Path = DEFAULT_DATA, n_sites: int = 4) -> list[Path]:
    """The embedded synthetic sites, generated on first use."""
    from recon.data import generate_sites

    if not any(root.glob("site*")):
        print(f"generating {n_sites} synthetic sites in {root} ...", file=sys.stderr, flush=True)
        generate_sites(root, n_sites=n_sites)
    return sorted(p for p in root.glob("site*") if p.is_dir())


def _dataset(site: Path, split: str, data: DataConfig):  # type: ignore[no-untyped-def]
    from recon.data import SiteDataset

    return SiteDataset(site, split=split, **data.dataset_kwargs(max_slices=data.max_slices))


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
    job = load_job_config(args, TRAIN_DEFAULTS)
    model_cfg, train_cfg, data_cfg = job.model, job.train, job.data
    device = resolve_device(args.device)
    options = job.method_options()
    sites = [Path(s) for s in args.sites] or default_sites()
    out = Path(args.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    train_sets = [_dataset(s, "train", data_cfg) for s in sites]
    test_sets = {s.name: _dataset(s, args.eval_split, data_cfg) for s in sites}
    model = build_model(model_cfg)
    n_train = sum(len(d) for d in train_sets)
    print(
        f"{ARCH_NAMES[model_cfg.arch]} ({model_cfg.denoiser}, Nu={model_cfg.num_unrolls}, "
        f"NCG={model_cfg.cg_iters}): {count_parameters(model):,} weights; "
        f"{n_train} training slices from {len(sites)} site(s); device {device}; "
        f"method {job.method}" + "".join(f" {k}={v}" for k, v in options.items() if v),
        flush=True,
    )
    union: ConcatDataset = ConcatDataset(train_sets)
    result = local_train(
        job.method,
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
            "zero-filled": {k: float(zf[k]) for k in ("ssim", "nrmse", "psnr")},  # type: ignore[arg-type]
            "model": {k: float(ours[k]) for k in ("ssim", "nrmse", "psnr")},  # type: ignore[arg-type]
        }
    print(f"\n{args.eval_split} slices, RSS magnitude:")
    print(format_table(table, ["zero-filled", "model"]))
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, model_cfg, out / "model.pt", data_config=data_cfg.model_dump())
    results = {
        "schema": "fedunroll.train/1",
        "sites": [str(s) for s in sites],
        "config": {
            "model": model_cfg.model_dump(),
            "train": {**train_cfg.model_dump(), "method": job.method},
            "data": data_cfg.model_dump(),
            **({job.method: options} if options else {}),
        },
        "train": {
            "steps": result.steps,
            "seconds": result.seconds,
            "final_loss": result.final_loss,
        },
        "final": table,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / 'model.pt'} and {out / 'results.json'}")
    return 0


def cmd_recon(args: argparse.Namespace) -> int:
    from recon.reconstruct import reconstruct_file

    data_cfg = load_job_config(args, {}).data
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
    )
    m = report["mean"]
    print(
        f"{report['method']}: {len(report['slices'])} slices of {report['file']} "
        f"-> {report['out']}\n"
        f"mean SSIM {m['ssim']:.4f}  NRMSE {m['nrmse']:.4f}  PSNR {m['psnr']:.2f} dB "
        f"(vs fully sampled RSS; per-slice values in {report['report']})"
    )
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    from fedunroll.overrides import load_config_file, parse_sets, split_sections
    from recon.data.dataset import data_values_from_flat
    from recon.models.checkpoint import load_checkpoint, save_checkpoint
    from recon.train.personalize import PersonalizeConfig, personalize

    device = resolve_device(args.device)
    model, model_cfg, ckpt = load_checkpoint(args.checkpoint, device)
    # The data pipeline that trained the model (federated run config or `fedunroll train`),
    # unless overridden by --config / --set.
    run_cfg = ckpt.get("run_config") or {}
    data_defaults = {f"data.{k}": v for k, v in data_values_from_flat(run_cfg).items()}
    for k, v in (ckpt.get("data_config") or {}).items():
        if v is not None:
            data_defaults[f"data.{k}"] = v
    flat = {**data_defaults, **load_config_file(args.config), **parse_sets(args.set)}
    groups = split_sections(flat, {"data", "personalize"})
    data_cfg = build_section("data", DataConfig, groups["data"])
    p_cfg = build_section("personalize", PersonalizeConfig, groups["personalize"])
    site = Path(args.site)
    train_set, test_set = _dataset(site, "train", data_cfg), _dataset(site, "test", data_cfg)
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


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "train",
        help="train a model centrally (or at one site) and evaluate it per site",
        description="Centralized / single-site training of MoDL or unrolled PGD. Without SITE "
        "arguments it trains on the embedded synthetic sites (generated on first use).",
    )
    p.add_argument("sites", nargs="*", help="site folders (site/{train,val,test}/*.h5)")
    p.add_argument("--out", help="run directory (default runs/train-<time>)")
    p.add_argument("--eval-split", default="test", choices=["val", "test"])
    _add_config_args(p)
    p.set_defaults(func=_guard(cmd_train))

    r = sub.add_parser(
        "recon",
        help="reconstruct an h5 file (zero-filled, SENSE, CS or a trained model)",
        description="Retrospectively undersample a fully sampled fastMRI-layout h5 file, "
        "reconstruct every slice and write the images; prints SSIM/NRMSE/PSNR against the fully "
        "sampled RSS.",
    )
    r.add_argument("input", help="fastMRI-layout multi-coil h5 file")
    r.add_argument("--method", default="model", choices=["zero-filled", "sense", "cs", "model"])
    r.add_argument("--checkpoint", help="model checkpoint (required for --method model)")
    r.add_argument("--out", help="output h5 (default <input stem>.<method>.h5 next to the input)")
    r.add_argument("--png", help="folder for PNG images of every slice")
    r.add_argument("--cs-lambda", type=float, default=1e-3, help="L1-wavelet weight for CS")
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
        "personalize.max_epochs, personalize.folds, personalize.patience, personalize.min_gain, "
        "data.*. Everything stays at the site.",
    )
    pz.add_argument("--checkpoint", required=True, help="global model (e.g. RUN/final_model.pt)")
    pz.add_argument("--site", required=True, help="site folder (site/{train,val,test}/*.h5)")
    pz.add_argument("--out", help="output folder (default runs/personalize-<site>-<time>)")
    _add_config_args(pz)
    pz.set_defaults(func=_guard(cmd_personalize))


def _guard(fn):  # type: ignore[no-untyped-def]
    """Turn expected user errors into one clear line and exit code 2 (tracebacks stay for bugs)."""

    def run(args: argparse.Namespace) -> int:
        from pydantic import ValidationError

        from recon.data import DataError

        try:
            return fn(args)
        except (DataError, ValueError, FileNotFoundError, ValidationError) as exc:
            print(f"fedunroll {args.command}: error: {exc}", file=sys.stderr)
            return 2

    return run

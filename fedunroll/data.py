"""``fedunroll synth``, ``prepare`` and ``convert``: the data subcommands of the CLI.

:func:`register` adds them to an ``argparse`` sub-parser set; each sets ``args.func`` to a handler
``(args) -> int`` (the process exit code: 0 ok, 1 some bad files (``prepare``), 2 usage error or
unusable input, reported on one line by :func:`fedunroll.errors.guard`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedunroll.errors import guard

# Heavy imports (numpy, h5py, sigpy, torch via the package) live in the handlers, so that
# ``fedunroll --help`` stays instant.
METHODS = ("espirit", "jsense")
SPLITS = ("train", "val", "test")


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def is_site_dir(path: Path) -> bool:
    """A site folder has ``*.h5`` files directly or in ``train/``, ``val/``, ``test/``."""
    return any(path.glob("*.h5")) or any((path / s).is_dir() for s in SPLITS)


def expand_sites(path: Path) -> list[Path]:
    """``path`` itself if it is a site, else its site sub-folders (e.g. the output of ``synth``)."""
    if is_site_dir(path):
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and is_site_dir(p))


def cmd_synth(args: argparse.Namespace) -> int:
    """Write synthetic sites and print one line per site."""
    from recon.data.synth import generate_sites, get_preset

    if args.sites < 1 or args.slices < 1:
        _err("--sites and --slices must be >= 1")
        return 2
    if args.matrix is not None and args.matrix < 8:
        _err(f"--matrix must be >= 8 pixels, got {args.matrix}")
        return 2
    try:
        get_preset(args.iid_preset)
    except ValueError as err:
        _err(str(err))
        return 2
    t0 = time.perf_counter()
    try:
        infos = generate_sites(
            args.out,
            n_sites=args.sites,
            n_slices=args.slices,
            seed=args.seed,
            matrix=args.matrix,
            iid=args.iid,
            iid_preset=args.iid_preset,
            slices_per_volume=args.slices_per_volume,
        )
    except (FileExistsError, ValueError) as err:
        _err(str(err))
        return 2
    dt = time.perf_counter() - t0
    mode = f"IID ({args.iid_preset})" if args.iid else "non-IID (one distribution per site)"
    print(
        f"wrote {len(infos)} synthetic sites to {args.out} in {dt:.1f} s, {mode}, seed {args.seed}"
    )
    print(f"{'site':<8}{'preset':<18}{'acq':<13}{'B0':>5}{'coils':>6}{'matrix':>9}  train/val/test")
    for info in infos:
        p = info["preset"]
        n = info["slices"]
        matrix = "x".join(str(m) for m in p["matrix"])
        print(
            f"{info['name']:<8}{p['name']:<18}{info['acquisition']:<13}{p['field_strength']:>4}T"
            f"{p['num_coils']:>6}{matrix:>9}  {n['train']}/{n['val']}/{n['test']}"
        )
    if args.prepare:
        return _prepare_all([Path(args.out)], "espirit", None, False, not args.no_progress)
    print(f"next: fedunroll prepare {args.out}   (coil maps, cached per site)")
    return 0


def _prepare_all(
    roots: list[Path],
    method: str,
    calib: int | None,
    force: bool,
    progress: bool,
    workers: int = 1,
    crop: tuple[int, int] | None = None,
    accel: float | None = None,
) -> int:
    from recon.data.prepare import prepare_site

    sites: list[Path] = []
    for root in roots:
        if not root.is_dir():
            _err(f"{root}: field 'site_dir': is not a directory")
            return 2
        found = expand_sites(root)
        if not found:
            _err(f"{root}: field 'site_dir': no .h5 files (expected {{train,val,test}}/*.h5)")
            return 1
        sites += found
    rc = 0
    for site in sites:
        rep = prepare_site(
            site,
            method=method,
            calib=calib,
            force=force,
            progress=progress,
            workers=workers,
            crop=crop,
            accel=accel,
        )
        cropped = f" ({crop[0]}x{crop[1]} crop)" if crop else ""
        print(
            f"{site}: {rep['files']} files, {rep['slices']} slices, maps {method}{cropped}: "
            f"{rep['computed']} computed, {rep['reused']} reused, {rep['seconds']:.1f} s "
            f"-> {rep['cache_dir']}"
        )
        print(f"{site}: checked {rep['checks']}")
        for msg in rep["warnings"]:
            print(f"warning: {msg}", file=sys.stderr)
        for msg in rep["errors"]:
            _err(msg)
        if rep["errors"]:
            print(f"{site}: {len(rep['errors'])} bad file(s) skipped; the others are usable")
            rc = 1
        if rep["files"] == 0:
            _err(f"{site}: field 'site_dir': no usable files")
            rc = 1
    return rc


def cmd_prepare(args: argparse.Namespace) -> int:
    """Validate sites and cache coil maps; non-zero exit if any file is bad."""
    if args.workers < 1:
        _err(f"--workers must be >= 1, got {args.workers}")
        return 2
    if args.accel is not None and args.accel < 1:
        _err(f"--accel must be >= 1, got {args.accel}")
        return 2
    from recon.data.dataset import parse_crop

    try:
        crop = parse_crop(args.crop)
    except ValueError as err:
        _err(f"--crop: {err}")
        return 2
    return _prepare_all(
        [Path(p) for p in args.site_dirs],
        args.method,
        args.calib,
        args.force,
        not args.no_progress,
        args.workers,
        crop,
        args.accel,
    )


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert ISMRMRD / MATLAB v7.3 / other h5 k-space to a checked fastMRI-layout file."""
    from recon.data.checks import describe
    from recon.data.convert import convert

    rep = convert(
        args.input,
        args.output,
        var=args.var,
        layout=args.layout,
        fftshift=args.fftshift,
        overwrite=args.overwrite,
    )
    what = rep.source_format + (f" '{rep.variable}'" if rep.variable else "")
    layout = f", layout {rep.layout}" if rep.layout else ""
    shape = ", ".join(str(n) for n in rep.shape)
    print(f"wrote {rep.output}: kspace [{shape}] [slices, coils, H, W] from {what}{layout}")
    for note in rep.notes:
        print(f"  {note}")
    print(f"checked {describe(rep.checks.ran)}")
    for finding in rep.checks.findings:
        print(f"warning: {finding}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``synth`` and ``prepare`` subcommands (handlers in ``args.func``)."""
    p = subparsers.add_parser(
        "synth",
        help="write synthetic multi-coil demo sites (fastMRI layout)",
        description=(
            "Write N synthetic hospitals (OUT/site{k}/{train,val,test}/*.h5 + site.json). "
            "Non-IID: each site has its own anatomy, contrast, field strength, coils, noise and "
            "matrix (Table 1 of the FL-MRI study); --iid: one distribution split over sites."
        ),
    )
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    p.add_argument("--slices", type=int, default=50, help="slices per site, all splits (50)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--iid", action="store_true", help="one distribution for all sites")
    p.add_argument("--iid-preset", default="knee_pdfs_15t", help="distribution used by --iid")
    p.add_argument("--matrix", type=int, default=None, help="square matrix for all sites (px)")
    p.add_argument("--slices-per-volume", type=int, default=5, help="slices per file (5)")
    p.add_argument("--prepare", action="store_true", help="also compute coil maps (ESPIRiT)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=guard(cmd_synth))

    q = subparsers.add_parser(
        "prepare",
        help="validate a site's h5 files and cache coil maps",
        description=(
            "Check SITE_DIR/{train,val,test}/*.h5 (or a folder of sites) and compute coil "
            "maps once per slice, cached in SITE_DIR/.cache/maps-METHOD/. Checks before any "
            "work: layout [slices, coils, H, W], finite values, k-space centred, fully sampled "
            "(and --accel against the coil count); maps that come out non-finite are never "
            "cached. Bad files are reported with file and field; the good ones stay usable "
            "(exit code 1 if any is bad)."
        ),
    )
    q.add_argument("site_dirs", nargs="+", metavar="SITE_DIR", help="site folder(s)")
    q.add_argument("--method", choices=METHODS, default="espirit", help="coil-map estimator")
    q.add_argument("--calib", type=int, default=None, help="calibration width (default 24)")
    q.add_argument("--force", action="store_true", help="recompute even if cached")
    q.add_argument("--workers", type=int, default=1, help="parallel processes (1)")
    q.add_argument(
        "--crop",
        default="",
        metavar="HxW",
        help="maps of the centre HxW image crop, e.g. 320x320 for fastMRI's 2x readout "
        "oversampling (as data.crop=HxW in training)",
    )
    q.add_argument(
        "--accel",
        type=float,
        default=None,
        metavar="R",
        help="the acceleration you will train at (data.accel): warn for files with fewer coils",
    )
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=guard(cmd_prepare))

    c = subparsers.add_parser(
        "convert",
        help="convert ISMRMRD raw data, MATLAB v7.3 or other h5 k-space to the fastMRI layout",
        description=(
            "Write INPUT's k-space as a fastMRI-layout OUTPUT.h5 (kspace complex64 "
            "[slices, coils, H, W], H readout, W phase encode), checked like `prepare` checks "
            "(layout, finite values, k-space centred; undersampling and acceleration reported). "
            "INPUT: ISMRMRD raw data (lines sorted by the encoding counters, missing lines "
            "zero-filled, header kept as ismrmrd_header), a MATLAB v7.3 .mat file or any h5 file."
        ),
    )
    c.add_argument("input", metavar="INPUT", help="ISMRMRD .h5, MATLAB v7.3 .mat or .h5")
    c.add_argument("output", metavar="OUTPUT.h5", help="the fastMRI-layout file to write")
    c.add_argument(
        "--var",
        default=None,
        metavar="NAME",
        help="variable / dataset holding k-space (default: kspace, else the only complex one)",
    )
    c.add_argument(
        "--layout",
        default=None,
        help="its axes, one letter each: s slices, c coils, h H (readout), w W (phase encode), "
        "r a real/imag axis of 2; numpy order for h5 (default schw), MATLAB size() order for "
        ".mat (default hwcs = kspace(kx, ky, coil, slice)); e.g. shwc for coil-last",
    )
    c.add_argument(
        "--fftshift",
        action="store_true",
        help="centre k-space stored uncentred (numpy.fft.fftshift over H and W)",
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT.h5")
    c.set_defaults(func=guard(cmd_convert))

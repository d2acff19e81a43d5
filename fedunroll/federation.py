"""Subcommands owned by ``server/``: ``simulate`` (add more with one ``_add_*`` function each)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="federate the sites in a Flower simulation (default: 4 synthetic sites, Scaffold)",
        description="Run a federated training in a Flower simulation (Ray backend) with a "
        "SuperLink started and always stopped by this command. Without arguments: generate "
        "the embedded synthetic sites if missing, federate 4 non-IID sites with Scaffold and "
        "print SSIM/NRMSE/PSNR per site for the federated model, zero-filled and local-only "
        "training. Keys are the one run config's, the same as for `fedunroll train` "
        "(e.g. strategy.name, num-server-rounds, train.local-steps, model.num-unrolls, "
        "data.root): `fedunroll config` lists every key with its default and one line of help.",
    )
    p.add_argument("--config", metavar="FILE.toml", help="TOML overrides (e.g. configs/iid.toml)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one run-config key, e.g. --set strategy.name=fedavg --set "
        "num-server-rounds=5 (see `fedunroll config`)",
    )
    p.add_argument("--out", help="parent folder of the run directory (default: runs)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its checkpoint")
    p.add_argument("--num-sites", type=int, help="number of sites (simulated SuperNodes)")
    p.add_argument("--quiet", action="store_true", help="do not stream the Flower logs")
    p.add_argument(
        "--dashboard",
        nargs="?",
        const=8050,
        type=int,
        metavar="PORT",
        help="serve the live dashboard of the run on 127.0.0.1 (default port 8050) while it runs",
    )
    p.set_defaults(func=cmd_simulate)


def _add_report(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        help="tables and figures of a run (report.md, PNGs) from its results.json",
        description="Read RUN_DIR/results.json (also of a failed or unfinished run) and write "
        "RUN_DIR/report.md (per-site SSIM/NRMSE/PSNR of the federated model and the baselines, "
        "per-round aggregates) with metrics_vs_round.png, site_bars.png and, when the data and "
        "RUN_DIR/final_model.pt are at hand, recon_grid.png.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds results.json)")
    p.add_argument(
        "--data", metavar="DIR", help="the sites' parent folder (default: data.root of the run)"
    )
    p.add_argument("--device", default="cpu", help="device for the recon grid (default: cpu)")
    p.add_argument("--no-grid", action="store_true", help="skip the reconstruction grid")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """``fedunroll report``: 0 when written, 2 on a missing or malformed results.json."""
    from fedunroll import report

    return report.command(args)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands to the ``fedunroll`` parser."""
    _add_simulate(sub)
    _add_report(sub)


def cmd_simulate(args: argparse.Namespace) -> int:
    """``fedunroll simulate``: returns 0 on a completed run, 1 on a failed one, 2 on bad input."""
    from pydantic import ValidationError

    from fedunroll.overrides import load_config_file, parse_sets
    from fedunroll.simulate import (
        SimulationError,
        build_config,
        check_run_free,
        ensure_sites,
        pin_run_dir,
        resume_config,
        run_simulation,
    )
    from recon.config import ConfigError
    from recon.data import DataError
    from server import results
    from server.runlock import RunInUseError

    cfg = None
    try:
        if args.resume:
            check_run_free(Path(args.resume))  # a live run is refused before anything starts
        overrides = {**load_config_file(args.config), **parse_sets(args.set)}
        if args.resume:
            cfg = resume_config(Path(args.resume), overrides)
        else:
            cfg = build_config(overrides, out=args.out, num_sites=args.num_sites)
        cfg = pin_run_dir(cfg)
        ensure_sites(cfg)
        with _dashboard(args, cfg):
            run_dir = run_simulation(cfg, quiet=args.quiet)
    except (ConfigError, ValidationError, DataError, FileNotFoundError, FileExistsError) as exc:
        print(f"fedunroll simulate: error: {exc}", file=sys.stderr)
        return 2
    except RunInUseError as exc:
        print(f"fedunroll simulate: error: {exc}", file=sys.stderr)
        return 2
    except SimulationError as exc:
        print(f"fedunroll simulate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "fedunroll simulate: interrupted; all Flower and Ray processes stopped. "
            f"Continue with: fedunroll simulate --resume {_run_dir_hint(cfg)}",
            file=sys.stderr,
        )
        return 130
    try:
        data = results.read(run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fedunroll simulate: the run wrote no valid results ({exc}); see "
              f"{run_dir / 'simulation.log'}", file=sys.stderr)  # fmt: skip
        return 1
    if data["status"] != "completed":
        print(f"fedunroll simulate: run {data['status']}", file=sys.stderr)
        print(f"resume with: fedunroll simulate --resume {run_dir}", file=sys.stderr)
        return 1
    add_baselines(run_dir, cfg, data)
    print(summary(data, run_dir))
    return 0


def _dashboard(args: argparse.Namespace, cfg: Any) -> Any:
    """``--dashboard``: the run's dashboard beside it (fedunroll.dashboard.beside_run)."""
    import contextlib

    if getattr(args, "dashboard", None) is None:
        return contextlib.nullcontext()
    from fedunroll.dashboard import beside_run
    from server.app import run_dir_of

    return beside_run(run_dir_of(cfg), args.dashboard)


def _run_dir_hint(cfg: Any) -> str:
    from server.app import run_dir_of

    return str(run_dir_of(cfg)) if cfg is not None else "RUN_DIR"


def add_baselines(run_dir: Path, cfg: Any, data: dict[str, Any]) -> None:
    """Local-only (and centralized) training of the same sites, written into results.json."""
    from fedunroll.simulate import run_baselines
    from server import results

    try:
        out = run_baselines(cfg, data)
    except ImportError:
        print("recon.train.baselines is not available: no local-only column", file=sys.stderr)
        return
    if out:
        data["final"].update(out)
        results.write(run_dir, data)


def summary(data: dict[str, Any], run_dir: Path) -> str:
    """The per-site table (test slices, RSS magnitude) and where the run lives."""
    final = data["final"]
    columns = [
        ("federated", f"federated ({data['config'].get('strategy.name')})"),
        ("zero_filled", "zero-filled"),
        ("local_only", "local-only"),
        ("centralized", "centralized"),
    ]
    columns = [(k, label) for k, label in columns if final.get(k)]
    head = f"{'site':<10}" + "".join(f"| {label:^26} " for _, label in columns)
    sub = f"{'':<10}" + "".join(f"| {'SSIM':>7} {'NRMSE':>7} {'PSNR':>8} " for _ in columns)
    lines = [head, sub, "-" * len(sub)]
    for site in data["sites"]:
        cells = []
        for key, _ in columns:
            m = final[key].get(site)
            cells.append(
                f"| {m['ssim']:7.4f} {m['nrmse']:7.4f} {m['psnr']:8.2f} " if m else f"| {'-':^26} "
            )
        lines.append(f"{site:<10}" + "".join(cells))
    t = data["timings"]
    rounds = len(data["rounds"])
    sent = sum(r["bytes_sent"] for r in data["rounds"])
    return (
        f"\nrun {data['name']}: {rounds} rounds in {t['rounds_seconds']:.1f} s "
        f"(total {t['total_seconds']:.1f} s), {sent / 1e6:.1f} MB sent\n"
        f"test slices, RSS magnitude:\n"
        + "\n".join(lines)
        + f"\n\nresults: {run_dir / 'results.json'}"
    )

"""``fedunroll reproduce``: the papers' comparisons over seeds (``benchmarks/reproduce.py``).

A thin front: it runs the benchmark script of the source checkout with the same options
(``--quick``, ``--scale cpu|gpu``, ``--seeds``, ``--out-dir``, ...). An installed wheel has no
``benchmarks/`` folder; the command then says so.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"
OPTIONS = ("scale", "seeds", "out_dir", "work_dir", "threads", "only")


def cmd_reproduce(args: argparse.Namespace) -> int:
    if not SCRIPT.is_file():
        print(f"fedunroll reproduce needs a source checkout ({SCRIPT} not found)", file=sys.stderr)
        return 2
    cmd = [sys.executable, str(SCRIPT)] + (["--quick"] if args.quick else [])
    for name in OPTIONS:
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return subprocess.call(cmd)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedunroll reproduce [--quick | --scale cpu|gpu] [...]``."""
    p = sub.add_parser(
        "reproduce",
        help="reproduce the papers' comparisons over seeds with 95%% intervals",
        description="Run benchmarks/reproduce.py: FedAvg / FedAdam / Scaffold (IID, non-IID), "
        "federated vs local-only vs centralized, personalization at an unseen site, GLEAM vs "
        "end-to-end, fairfedavg vs FedAvg, NAS vs U-Net; writes "
        "benchmarks/results/reproduce_<scale>.json, .md and .png.",
    )
    p.add_argument("--quick", action="store_true", help="tiniest size, a few minutes (smoke)")
    p.add_argument("--scale", choices=["quick", "cpu", "gpu"], help="default: cpu")
    p.add_argument("--seeds", type=int, help="seeds 0..S-1 (default: the scale's)")
    p.add_argument("--out-dir", help="default: benchmarks/results")
    p.add_argument("--work-dir", help="synthetic sites and runs (default: a temp dir)")
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    p.add_argument("--only", help="comma-separated sections, e.g. strategies,gleam")
    p.set_defaults(func=cmd_reproduce)

"""The ``fedunroll`` command line: one parser, subcommands registered by the modules that own them.

Heavy imports (torch, flwr, ray) happen inside the handlers, so ``fedunroll --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules exposing ``register(subparsers)``; each adds subcommands with ``set_defaults(func=...)``.
COMMAND_MODULES = [
    "fedunroll.data",  # synth, prepare
    "fedunroll.jobs",  # train, recon, personalize
    "fedunroll.federation",  # simulate, report
    "fedunroll.overrides",  # config
    "fedunroll.dashboard",  # dashboard
    "fedunroll.reproduce",  # reproduce (benchmarks/reproduce.py)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedunroll",
        description="Federated training of unrolled MRI reconstruction networks across hospitals.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside the module: surface it
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from recon.runtime import tune_malloc

    tune_malloc()  # no page fault per large tensor; inherited by the processes simulate starts
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

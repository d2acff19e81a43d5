"""``--config FILE.toml`` and ``--set key=value`` overrides, shared by every command.

Keys are the run config's (:mod:`recon.config`), namespaced and dashed (``model.num-unrolls``,
``train.lr``, ``data.acs-frac``); values are parsed as TOML (``4``, ``1e-3``, ``true``,
``"poisson2d"``), falling back to a bare string. ``fedunroll config`` lists every key.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; a missing ``=`` is an error naming it."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value")
        out[key.strip()] = parse_value(value.strip())
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> flat dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def load_config_file(path: str | Path | None) -> dict[str, Any]:
    """Flat dotted keys from a TOML file (errors name the file)."""
    if path is None:
        return {}
    p = Path(path)
    try:
        return flatten(tomllib.loads(p.read_text()))
    except FileNotFoundError:
        raise ValueError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {p}: {exc}") from None


def toml_value(value: Any) -> str:
    """One TOML value (run-config values are scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def format_keys(sections: list[str] | None = None, command: str = "simulate") -> str:
    """Every run-config key (of ``sections``, all when empty) as TOML with its default and its
    one-line description; ``command = "train"`` shows ``fedunroll train``'s own defaults."""
    from recon.config import SECTIONS, describe_keys

    known = ["federation", *SECTIONS]
    unknown = [s for s in sections or [] if s not in known]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {known}")
    overrides: dict[str, Any] = {}
    if command == "train":
        from fedunroll.jobs import TRAIN_DEFAULTS

        overrides = TRAIN_DEFAULTS
    lines: list[str] = []
    current = None
    for key, (default, description) in describe_keys().items():
        section = key.partition(".")[0] if "." in key else "federation"
        if sections and section not in sections:
            continue
        if section != current:
            current = section
            title = "federation-wide keys (no section)" if section == "federation" else section
            lines += [""] * bool(lines) + [f"# [{title}]"]
        mark = f" (fedunroll {command})" if key in overrides else ""
        setting = f"{json.dumps(key)} = {toml_value(overrides.get(key, default))}"
        lines.append(f"{setting:<38} # {description}{mark}")
    return "\n".join(lines)


def cmd_config(args: argparse.Namespace) -> int:
    try:
        print(format_keys(args.sections, args.command_defaults))
    except ValueError as exc:
        print(f"fedunroll config: error: {exc}", file=sys.stderr)
        return 2
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedunroll config``: the run-config keys with their defaults and one line of help."""
    p = sub.add_parser(
        "config",
        help="list every run-config key with its default and one line of help",
        description="Every key of the one run config, shared by train, recon, personalize, "
        "simulate and the Flower apps (pass them with --set KEY=VALUE, in a --config TOML file "
        "or with `flwr run --run-config`), with its default and what it does. The output is "
        "valid TOML: save it as a starting --config file.",
    )
    p.add_argument(
        "sections", nargs="*", metavar="SECTION", help="only these sections (e.g. model train)"
    )
    p.add_argument(
        "--for",
        dest="command_defaults",
        choices=["simulate", "train"],
        default="simulate",
        help="whose defaults to show: the federation's (default) or `fedunroll train`'s",
    )
    p.set_defaults(func=cmd_config)

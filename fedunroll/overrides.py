"""``--config FILE.toml`` and ``--set key=value`` overrides, shared by every command.

Keys are namespaced (``model.num_unrolls``, ``train.lr``, ``data.accel``); values are parsed as
TOML (``4``, ``1e-3``, ``true``, ``"poisson2d"``), falling back to a bare string.
"""

from __future__ import annotations

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


def split_sections(flat: dict[str, Any], sections: set[str]) -> dict[str, dict[str, Any]]:
    """Group ``section.key`` entries; an unknown section or a key without one is an error."""
    grouped: dict[str, dict[str, Any]] = {s: {} for s in sections}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ValueError(
                f"unknown config key {key!r}; keys look like <section>.<name> with section in "
                f"{sorted(sections)}"
            )
        grouped[section][name.replace("-", "_")] = value
    return grouped

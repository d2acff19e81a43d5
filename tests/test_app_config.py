"""Run config: parsed once, namespaced, unknown keys and bad values named; presets valid."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedunroll.overrides import load_config_file
from fedunroll.simulate import build_config, to_toml
from recon.config import VALID_KEYS, ConfigError, default_flat, parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_product_default_job() -> None:
    cfg = parse_run_config({})
    assert cfg.strategy.name == "scaffold"
    assert cfg.data.num_sites == 4 and not cfg.data.iid
    assert cfg.train.train_config().steps == cfg.train.local_steps
    assert cfg.model.to_model_config().num_unrolls == cfg.model.num_unrolls


def test_pyproject_declares_every_key_with_its_default() -> None:
    # `flwr run --run-config` only accepts keys declared in [tool.flwr.app.config]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    assert declared == default_flat()
    assert set(declared) == set(VALID_KEYS)


def test_namespaced_values_reach_their_section() -> None:
    cfg = parse_run_config(
        {"strategy.name": "fedprox", "fedprox.mu": 0.5, "train.lr": 1e-4, "num-server-rounds": 7}
    )
    assert (cfg.strategy.name, cfg.fedprox.mu, cfg.train.lr) == ("fedprox", 0.5, 1e-4)
    assert cfg.federation.num_server_rounds == 7
    assert cfg.flat()["fedprox.mu"] == 0.5


@pytest.mark.parametrize(
    ("flat", "named"),
    [
        ({"train.lrr": 1e-3}, "'train.lrr'; did you mean 'train.lr'"),
        ({"mu": 0.1}, "unknown run-config key 'mu'"),
        ({"fedprox.mu": -1.0}, "'fedprox.mu'"),
        ({"strategy.name": "fedsgd"}, "'strategy.name'"),
        ({"num-server-rounds": 0}, "'num-server-rounds'"),
        ({"num-server-rounds": 2.5}, "'num-server-rounds'"),
        ({"train.lr": float("nan")}, "'train.lr': must be finite"),
        ({"scaffold.option": "iii"}, "'scaffold.option'"),
        ({"data.mask": "spiral"}, "'data.mask'"),
        ({"data.crop": "320x"}, "'data.crop'"),
        ({"min-fit-clients": 3, "min-available-clients": 2}, "min-available-clients"),
        ({"min-fit-clients": 5, "min-available-clients": 5}, "data.num-sites"),
    ],
)
def test_bad_keys_and_values_fail_naming_the_key(flat, named) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config(flat)
    assert named in str(err.value)


def test_config_is_frozen() -> None:
    cfg = parse_run_config({})
    with pytest.raises(Exception):  # noqa: B017 (pydantic's frozen-instance error)
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_toml_round_trip_is_what_flwr_run_reads() -> None:
    flat = default_flat()
    assert tomllib.loads(to_toml(flat)) == flat


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_presets_parse(preset: Path) -> None:
    overrides = load_config_file(preset)
    cfg = build_config(overrides)
    assert Path(cfg.data.root).is_absolute() and Path(cfg.run.out).is_absolute()


def test_num_sites_flag_lowers_the_minimums() -> None:
    cfg = build_config({}, num_sites=1)
    assert cfg.data.num_sites == 1 and cfg.federation.min_fit_clients == 1

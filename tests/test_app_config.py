"""Run config: parsed once, namespaced, unknown keys and bad values named; presets valid."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from fedunroll.jobs import TRAIN_DEFAULTS, load_run_config
from fedunroll.overrides import load_config_file
from fedunroll.simulate import build_config, to_toml
from recon.config import (
    SECTIONS,
    VALID_KEYS,
    ConfigError,
    FederationConfig,
    default_flat,
    describe_keys,
    parse_run_config,
)
from recon.models import ModelConfig
from recon.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_product_default_job() -> None:
    cfg = parse_run_config({})
    assert cfg.strategy.name == "scaffold"
    assert cfg.data.num_sites == 4 and not cfg.data.iid
    # the sections are the core's own configurations: nothing copied, nothing renamed
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.train, TrainConfig)
    assert cfg.local_steps == cfg.train.steps == 20
    assert (cfg.model.num_unrolls, cfg.model.cg_iters) == (4, 4)  # the federation's small MoDL
    assert ModelConfig().num_unrolls == 6  # the core's: Levac et al. 2023


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
        ({"model.num_unrolls": 4}, "'model.num_unrolls'; did you mean 'model.num-unrolls'?"),
        ({"train.steps": 300}, "'train.steps'; did you mean 'train.local-steps'?"),
        ({"train.method": "sgd"}, "unknown train.method 'sgd'"),
        ({"gleam.lrs": "1e-3,fast"}, "'gleam.lrs'"),
        (
            {"train.method": "gleam", "model.shared": False, "gleam.lrs": "1e-3"},
            "gleam.lrs needs one value per GLEAM module (4)",
        ),
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
        ({"sim.ray-address": "ray://head:10001"}, "'sim.ray-address'"),
        ({"sim.ray-address": "head:port"}, "is not HOST:PORT"),
        ({"sim.ray-address": "head:70000"}, "is not HOST:PORT"),
    ],
)
def test_bad_keys_and_values_fail_naming_the_key(flat, named) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config(flat)
    assert named in str(err.value)


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [("", None), ("auto", None), (" head:6379 ", ("head", 6379)), ("[::1]:6380", ("::1", 6380))],
)
def test_ray_address_is_parsed_once_into_the_endpoint_simulate_checks(address, endpoint) -> None:
    assert parse_run_config({"sim.ray-address": address}).sim.ray_endpoint == endpoint


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


def test_every_key_has_one_line_of_help() -> None:
    described = describe_keys()
    assert list(described) == list(VALID_KEYS)
    for key, (_, help_text) in described.items():
        assert help_text and "\n" not in help_text, key
    for cls in (FederationConfig, *SECTIONS.values()):
        assert all(f.description for f in cls.model_fields.values()), cls.__name__


def test_none_able_values_are_toml_scalars() -> None:
    cfg = parse_run_config({"train.grad-clip": 0.5, "model.nas-genotype": "g.json"})
    assert (cfg.train.grad_clip, cfg.model.nas_genotype) == (0.5, "g.json")
    cfg = parse_run_config({"train.grad-clip": 0, "train.local-steps": 0})
    assert cfg.train.grad_clip is None and cfg.train.steps is None  # no clipping; epochs
    assert cfg.model.nas_genotype is None and cfg.flat()["model.nas-genotype"] == ""
    assert tomllib.loads(to_toml(cfg.flat())) == cfg.flat()


def test_lists_are_comma_separated_text() -> None:
    cfg = parse_run_config(
        {"gleam.devices": ["cpu", "cpu"], "gleam.lrs": "1e-3, 5e-4", "gleam.losses": "ssim,l1"}
    )
    assert cfg.flat()["gleam.devices"] == "cpu,cpu" and cfg.gleam.lr_list == [1e-3, 5e-4]
    assert parse_run_config({"personalize.lrs": 1e-4}).personalize.lr_values == (1e-4,)
    cfg = parse_run_config(
        {"train.method": "gleam", "model.shared": False, "gleam.modules": 2}
        | {"model.num-unrolls": 2, "gleam.devices": "cpu,cpu", "gleam.losses": "ssim,l1"}
    )
    assert cfg.method_options() == {
        "num_modules": 2,
        "devices": ["cpu", "cpu"],
        "losses": ["ssim", "l1"],
    }
    assert cfg.method_options(["cuda:0"])["devices"] == ["cuda:0"]  # the node's own setting wins


OVERRIDES = {
    "model.num-unrolls": 2,
    "model.cg-iters": 3,
    "model.shared": False,
    "model.resnet-features": 8,
    "train.local-steps": 7,
    "train.method": "gleam",
    "train.grad-clip": 1.0,
    "gleam.modules": 2,
    "gleam.lrs": "1e-3,5e-4",
    "data.accel": 8.0,
    "data.maps": "espirit",
    "data.max-train-slices": 5,
    "data.crop": "32x32",
    "personalize.max-epochs": 3,
}


def _train_args(tmp_path: Path, flat: dict[str, object]) -> argparse.Namespace:
    path = tmp_path / "set.toml"
    path.write_text(to_toml(flat))
    return argparse.Namespace(config=str(path), set=None)


def test_train_and_simulate_accept_the_same_keys(tmp_path: Path) -> None:
    """`fedunroll train` and `fedunroll simulate` parse one config: the same overrides give the
    same sections, and the same unknown key fails in both naming its near matches."""
    simulate = build_config(OVERRIDES)
    train = load_run_config(_train_args(tmp_path, OVERRIDES), TRAIN_DEFAULTS)
    for section in ("model", "train", "gleam", "personalize"):
        assert getattr(train, section) == getattr(simulate, section), section
    assert train.data.dataset_kwargs() == simulate.data.dataset_kwargs()
    assert train.model.num_unrolls == 2 and train.train.steps == 7
    # without overrides each command keeps its own documented defaults
    default_train = load_run_config(argparse.Namespace(config=None, set=None), TRAIN_DEFAULTS)
    assert (default_train.model.num_unrolls, default_train.train.steps) == (6, 300)
    assert parse_run_config({}).model.num_unrolls == 4
    for bad in ({"model.num_unrolls": 2}, {"train.steps": 5}, {"data.max_slices": 5}):
        with pytest.raises(ConfigError) as in_simulate:
            build_config(bad)
        with pytest.raises(ConfigError) as in_train:
            load_run_config(_train_args(tmp_path, bad), TRAIN_DEFAULTS)
        assert str(in_train.value) == str(in_simulate.value)
        assert "did you mean" in str(in_train.value)

"""The run configuration of a federated job, parsed once into frozen pydantic models.

Flower hands the ServerApp and every ClientApp the same flat ``context.run_config``
(``[tool.flwr.app.config]`` of ``pyproject.toml`` plus ``--run-config`` overrides). Keys are
namespaced: ``section.key`` (``train.lr``, ``fedprox.mu``, ``scaffold.eta-g``), and the few
federation-wide keys have no section (``num-server-rounds``, ``min-fit-clients``). Both sides call
:func:`parse_run_config`; an unknown key or a bad value raises :class:`ConfigError` naming it.

The defaults here are the product's default job (4 non-IID synthetic sites, Scaffold, small
enough for 2 CPU cores); ``[tool.flwr.app.config]`` repeats them (a test keeps both equal),
because ``flwr run --run-config`` only accepts keys that the pyproject section declares.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from recon.data.dataset import crop_text, dataset_kwargs
from recon.models import ModelConfig
from recon.train import TrainConfig
from recon.train.methods import check_method, method_options

STRATEGY_NAMES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "scaffold",
    "fairfedavg",
)


class ConfigError(ValueError):
    """A run-config key that is unknown or has a bad value; the message names the key."""


class _Section(BaseModel):
    """Frozen, strict about unknown keys, keys spelled with dashes (``local-steps``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _k(default: Any, alias: str, **kw: Any) -> Any:
    return Field(default, alias=alias, **kw)


class FederationConfig(_Section):
    """Keys without a section: rounds, participation and bounded waits."""

    num_server_rounds: int = _k(10, "num-server-rounds", ge=1, le=100_000)
    min_fit_clients: int = _k(2, "min-fit-clients", ge=1)
    min_available_clients: int = _k(2, "min-available-clients", ge=1)
    fraction_fit: float = _k(1.0, "fraction-fit", gt=0, le=1)
    fraction_evaluate: float = _k(1.0, "fraction-evaluate", gt=0, le=1)
    round_timeout: float = _k(900.0, "round-timeout", gt=0)
    node_wait_timeout: float = _k(120.0, "node-wait-timeout", gt=0)


class StrategySection(_Section):
    name: Literal[
        "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fairfedavg"
    ] = "scaffold"


class TrainSection(_Section):
    """Local optimisation at each site per round (Levac et al. 2023 Sec. 3.1: Adam, batch 1, SSIM
    loss)."""

    local_steps: int = _k(20, "local-steps", ge=1)
    # Communication budget (Levac et al. 2023 Sec. 3.4): a fixed total of local steps split over the
    # rounds; when > 0 it overrides local-steps with total-steps / num-server-rounds.
    total_steps: int = _k(0, "total-steps", ge=0)
    lr: float = Field(1e-3, gt=0)
    loss: Literal["ssim", "l1", "l2", "rss-l1"] = "ssim"
    batch_size: int = _k(1, "batch-size", ge=1)
    grad_clip: float = _k(0.0, "grad-clip", ge=0)  # 0 = no clipping (TOML has no null)
    seed: int = 0
    # Local trainer (recon.train.methods.local_train): end-to-end, end-to-end with one activation
    # checkpoint per unroll (same result, less memory), greedy GLEAM modules (GLEAM) or
    # layer-wise convex blocks (Ozturkler et al. 2021, model.denoiser = "convex").
    method: Literal["e2e", "gleam", "checkpoint", "layerwise"] = "e2e"

    def train_config(self, steps: int | None = None, seed: int | None = None) -> TrainConfig:
        """The :class:`recon.train.TrainConfig` of one local training call."""
        return TrainConfig(
            lr=self.lr,
            steps=steps or self.local_steps,
            batch_size=self.batch_size,
            loss=self.loss,
            seed=self.seed if seed is None else seed,
            grad_clip=self.grad_clip or None,
        )


class ModelSection(_Section):
    """MoDL size; the defaults are small (the paper's Nu=6, NCG=6 is ``--set`` away)."""

    arch: Literal["modl", "pgd"] = "modl"
    # convex: train.method = layerwise; nas: a searched / derived cell net (server/nas.py)
    denoiser: Literal["unet", "resnet", "convex", "nas"] = "unet"
    num_unrolls: int = _k(4, "num-unrolls", ge=1, le=64)
    cg_iters: int = _k(4, "cg-iters", ge=1, le=100)
    lam_init: float = _k(0.05, "lam-init", gt=0)
    shared: bool = True
    unet_chans: int = _k(16, "unet-chans", ge=1)
    unet_pools: int = _k(3, "unet-pools", ge=1, le=6)
    # denoiser = "nas": a genotype file gives the derived net ("" = the search net of
    # nas-channels / nas-cells / nas-nodes, for nas.search-rounds > 0)
    nas_genotype: str = _k("", "nas-genotype")
    nas_channels: int = _k(16, "nas-channels", ge=1)
    nas_cells: int = _k(3, "nas-cells", ge=1)
    nas_nodes: int = _k(3, "nas-nodes", ge=1)

    def to_model_config(self) -> ModelConfig:
        """The :class:`recon.models.ModelConfig` to build."""
        return ModelConfig(
            arch=self.arch,
            denoiser=self.denoiser,
            num_unrolls=self.num_unrolls,
            cg_iters=self.cg_iters,
            lam_init=self.lam_init,
            shared=self.shared,
            unet_chans=self.unet_chans,
            unet_pools=self.unet_pools,
            nas_genotype=self.nas_genotype or None,
            nas_channels=self.nas_channels,
            nas_cells=self.nas_cells,
            nas_nodes=self.nas_nodes,
        )


class FedProxSection(_Section):
    mu: float = Field(0.01, ge=0)


class ScaffoldSection(_Section):
    """Levac et al. 2023 Algorithm 1: control-variate rule (line 7) and global step size (line
    10)."""

    option: Literal["i", "ii"] = "ii"
    eta_g: float = _k(1.0, "eta-g", gt=0)
    grad_slices: int = _k(8, "grad-slices", ge=1)  # option (i): slices in the gradient at x


class GleamSection(_Section):
    """``train.method = "gleam"``: M greedy modules of N / M unrolls (GLEAM Alg. 1)."""

    modules: int = Field(0, ge=0)  # 0 = one module per unroll (M = N)


class LayerwiseSection(_Section):
    """``train.method = "layerwise"``: convex blocks trained one after the other (Ozturkler et al.,
    ISMRM 2021)."""

    steps_per_block: int = _k(0, "steps-per-block", ge=0)  # 0 = split the local steps evenly


class FedOptSection(_Section):
    """FedAdam / FedYogi / FedAdagrad server optimiser (Reddi et al. 2021, Algorithm 2)."""

    eta: float = Field(1e-2, gt=0)
    beta_1: float = _k(0.9, "beta-1", ge=0, lt=1)
    beta_2: float = _k(0.99, "beta-2", ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class FairSection(_Section):
    """``strategy.name = "fairfedavg"``: fairness-adjusted weights (GAutoMRI Eq. 9-11)."""

    gamma: float = Field(0.01, ge=0)


class EmaSection(_Section):
    """Client EMA of the global weights as the start of local training (FedAutoMRI Eq. 7)."""

    enabled: bool = False
    gamma: float = Field(0.9, ge=0, lt=1)
    form: Literal["adam", "printed", "plain"] = "adam"  # strategies.nas_maths.client_ema


class NasSection(_Section):
    """Federated architecture search before training (GAutoMRI Alg. 1, MiLeNAS FedAutoMRI Eq. 6).

    ``search-rounds > 0`` (with ``model.denoiser = "nas"`` and no ``model.nas-genotype``): that
    many search rounds, the genotype derived (top-k per node) into ``<run dir>/genotype.json``,
    then ``num-server-rounds`` training rounds of the derived network from scratch.
    """

    search_rounds: int = _k(0, "search-rounds", ge=0, le=100_000)
    search_steps: int = _k(0, "search-steps", ge=0)  # 0 = the training phase's local steps
    lr_alpha: float = _k(3e-3, "lr-alpha", gt=0)
    lam: float = Field(1.0, ge=0)
    val_fraction: float = _k(0.5, "val-fraction", gt=0, lt=1)
    top_k: int = _k(2, "top-k", ge=1)


class DataSection(_Section):
    """Where each site's slices come from and how they are undersampled (Levac et al. 2023 Sec.
    3.1)."""

    root: str = "data/synth"
    num_sites: int = _k(4, "num-sites", ge=1, le=1000)
    iid: bool = False
    mask: Literal["random1d", "equispaced1d", "poisson2d"] = "random1d"
    accel: float = Field(4.0, ge=1)
    acs_frac: float = _k(0.08, "acs-frac", gt=0, lt=1)
    seed: int = 0
    max_train_slices: int = _k(0, "max-train-slices", ge=0)  # 0 = all
    # Synthetic sites, generated by ``fedunroll simulate`` when ``root`` has none (0 = preset).
    synth_slices: int = _k(50, "synth-slices", ge=3)  # slices per site, all splits
    synth_size: int = _k(0, "synth-size", ge=0)  # square matrix for every site; 0 = presets
    synth_coils: int = _k(0, "synth-coils", ge=0)  # coils for every site; 0 = presets
    # Sites held out of training (Levac et al. 2023 Table 1 "Unseen"): in simulation the partitions
    # num-sites .. num-sites + unseen-sites - 1; they only take part in personalization.
    unseen_sites: int = _k(0, "unseen-sites", ge=0, le=1000)
    # Image-domain centre crop "HxW" of every slice (fastMRI readout oversampling: "320x320");
    # "" = none. A string: Flower run configs hold scalars only.
    crop: str = ""

    @field_validator("crop", mode="before")
    @classmethod
    def _crop(cls, value: Any) -> str:
        return crop_text(value)

    def dataset_kwargs(self, **extra: Any) -> dict[str, Any]:
        """:class:`~recon.data.dataset.SiteDataset` keyword arguments of the sites' slices
        (horizontal-readout files rotated by their attribute), ``extra`` passed through."""
        return dataset_kwargs(
            mask=self.mask,
            accel=self.accel,
            acs_frac=self.acs_frac,
            seed=self.seed,
            crop=self.crop,
            **extra,
        )


class RunSection(_Section):
    """Run directory, resume, device and the non-federated baselines in the same results."""

    out: str = "runs"
    name: str = ""  # "" = <strategy>-<timestamp>
    resume: str = ""  # a run directory to continue
    device: str = "auto"  # auto | cpu | cuda | cuda:N (node config ``device`` wins)
    local_only: bool = _k(True, "local-only")
    centralized: bool = False


class PersonalizeSection(_Section):
    """Federated personalization after the last round (Levac et al. 2023 Sec. 3.4, 4.3; issue 5).

    Every site (training and unseen) picks (r_fine, N_fine) by k-fold CV on its own training
    slices and fine-tunes the final global model; only before/after metrics come back.
    ``lrs`` is a comma-separated list (``"1e-5,1e-4"``): Flower run configs hold scalars only.
    """

    enabled: bool = False
    lrs: str = "1e-4,1e-3"
    max_epochs: int = _k(10, "max-epochs", ge=1, le=100_000)
    folds: int = Field(5, ge=2)
    patience: int = Field(3, ge=1)
    min_gain: float = _k(0.005, "min-gain", ge=0)
    timeout: float = Field(3600.0, gt=0)  # seconds the server waits for the sites' replies

    @field_validator("lrs", mode="before")
    @classmethod
    def _lrs(cls, value: Any) -> str:
        items = value if isinstance(value, list | tuple) else [value]
        if isinstance(value, str):
            items = [v for v in value.split(",") if v.strip()]
        try:
            lrs = [float(v) for v in items if not isinstance(v, bool)]
        except (TypeError, ValueError):
            raise ValueError(f"expected comma-separated learning rates, got {value!r}") from None
        if not lrs or len(lrs) != len(items) or not all(math.isfinite(x) and x > 0 for x in lrs):
            raise ValueError(f"expected one or more positive learning rates, got {value!r}")
        return value.strip() if isinstance(value, str) else ",".join(repr(x) for x in lrs)

    @property
    def lr_values(self) -> tuple[float, ...]:
        """``lrs`` as floats."""
        return tuple(float(v) for v in self.lrs.split(",") if v.strip())


class SimSection(_Section):
    """Flower simulation resources (``fedunroll simulate``; ignored in deployment)."""

    client_cpus: int = _k(1, "client-cpus", ge=1)
    client_gpus: float = _k(0.0, "client-gpus", ge=0)


SECTIONS: dict[str, type[_Section]] = {
    "strategy": StrategySection,
    "train": TrainSection,
    "model": ModelSection,
    "fedprox": FedProxSection,
    "scaffold": ScaffoldSection,
    "gleam": GleamSection,
    "layerwise": LayerwiseSection,
    "fedopt": FedOptSection,
    "data": DataSection,
    "run": RunSection,
    "personalize": PersonalizeSection,
    "sim": SimSection,
    "fair": FairSection,
    "ema": EmaSection,
    "nas": NasSection,
}


class RunConfig(BaseModel):
    """The whole run configuration; build it with :func:`parse_run_config`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation: FederationConfig = FederationConfig()
    strategy: StrategySection = StrategySection()
    train: TrainSection = TrainSection()
    model: ModelSection = ModelSection()
    fedprox: FedProxSection = FedProxSection()
    scaffold: ScaffoldSection = ScaffoldSection()
    gleam: GleamSection = GleamSection()
    layerwise: LayerwiseSection = LayerwiseSection()
    fedopt: FedOptSection = FedOptSection()
    data: DataSection = DataSection()
    run: RunSection = RunSection()
    personalize: PersonalizeSection = PersonalizeSection()
    sim: SimSection = SimSection()
    fair: FairSection = FairSection()
    ema: EmaSection = EmaSection()
    nas: NasSection = NasSection()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        fed = self.federation
        if fed.min_available_clients < fed.min_fit_clients:
            raise ValueError(
                f"min-available-clients ({fed.min_available_clients}) must be >= "
                f"min-fit-clients ({fed.min_fit_clients})"
            )
        total = self.train.total_steps
        if total and total % fed.num_server_rounds:
            raise ValueError(
                f"train.total-steps ({total}) must be a multiple of num-server-rounds "
                f"({fed.num_server_rounds}): the budget is split evenly over the rounds"
            )
        self._check_method()
        if fed.min_fit_clients > self.data.num_sites:
            raise ValueError(
                f"min-fit-clients ({fed.min_fit_clients}) exceeds data.num-sites "
                f"({self.data.num_sites})"
            )
        return self

    def _check_method(self) -> None:
        method, model = self.train.method, self.model
        check_method(method, model.num_unrolls, model.shared, model.denoiser, self.gleam.modules)
        if self.nas.search_rounds and (model.denoiser != "nas" or model.nas_genotype):
            raise ValueError(
                'nas.search-rounds > 0 searches the denoiser: set model.denoiser = "nas" and '
                'leave model.nas-genotype = ""'
            )
        if self.nas.search_rounds and not model.shared:
            raise ValueError("nas.search-rounds > 0 needs model.shared = true (one search net)")
        if model.denoiser == "nas" and not model.nas_genotype and not self.nas.search_rounds:
            raise ValueError(
                'model.denoiser = "nas" trains a derived net: set model.nas-genotype to a '
                "genotype file, or nas.search-rounds > 0 to search one first"
            )

    def method_options(self, gleam_devices: Sequence[str] = ()) -> dict[str, Any]:
        """Keyword options of :func:`recon.train.methods.local_train` for ``train.method``;
        ``gleam_devices`` is the site's own P-GLEAM setting (node config ``gleam-devices``)."""
        return method_options(
            self.train.method,
            gleam_modules=self.gleam.modules,
            gleam_devices=gleam_devices,
            steps_per_block=self.layerwise.steps_per_block,
        )

    @property
    def local_steps(self) -> int:
        """Local steps per round: ``total-steps / num-server-rounds``, else ``local-steps``."""
        total = self.train.total_steps
        return total // self.federation.num_server_rounds if total else self.train.local_steps

    def flat(self) -> dict[str, Any]:
        """The flat, namespaced dict (``results.json["config"]``, ``--run-config`` files)."""
        out: dict[str, Any] = {}
        for section, model in self._sections().items():
            prefix = "" if section == "federation" else f"{section}."
            for key, value in model.model_dump(by_alias=True).items():
                out[prefix + key] = value
        return out

    def _sections(self) -> dict[str, _Section]:
        return {name: getattr(self, name) for name in ("federation", *SECTIONS)}


def _valid_keys() -> dict[str, tuple[str, str]]:
    """Flat key -> (section attribute, field name)."""
    keys: dict[str, tuple[str, str]] = {}
    for section, cls in {"federation": FederationConfig, **SECTIONS}.items():
        prefix = "" if section == "federation" else f"{section}."
        for name, field in cls.model_fields.items():
            keys[prefix + (field.alias or name)] = (section, name)
    return keys


VALID_KEYS = _valid_keys()


def default_flat() -> dict[str, Any]:
    """Every key with its default value (what ``[tool.flwr.app.config]`` must declare)."""
    return RunConfig().flat()


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, VALID_KEYS, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    section = key.partition(".")[0] if "." in key else ""
    same = sorted(k for k in VALID_KEYS if section and k.startswith(section + "."))
    listed = f" Valid keys in [{section}]: {', '.join(same)}." if same else ""
    return ConfigError(f"unknown run-config key {key!r}{hint}{listed}")


def parse_run_config(flat: Mapping[str, Any]) -> RunConfig:
    """Parse Flower's flat run config (or any flat override dict) into a :class:`RunConfig`.

    Parameters
    ----------
    flat : Mapping[str, Any]
        ``{"strategy.name": "fedavg", "train.lr": 1e-3, "num-server-rounds": 3, ...}``;
        missing keys take their defaults.

    Raises
    ------
    ConfigError
        For an unknown key (with close matches) or a bad value (naming the key and why).
    """
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key not in VALID_KEYS:
            raise _unknown(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"run-config key {key!r}: must be finite, got {value!r}")
        section, name = VALID_KEYS[key]
        grouped.setdefault(section, {})[name] = value
    sections: dict[str, Any] = {}
    for section, values in grouped.items():
        cls = FederationConfig if section == "federation" else SECTIONS[section]
        try:
            sections[section] = cls.model_validate(values)
        except ValidationError as err:
            raise _named(err, section) from None
    try:
        return RunConfig(**sections)
    except ValidationError as err:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise ConfigError(f"run config: {msgs}") from None


def _named(err: ValidationError, section: str) -> ConfigError:
    """One line per bad key: ``run-config key 'train.lr': Input should be greater than 0 ...``."""
    cls = FederationConfig if section == "federation" else SECTIONS[section]
    prefix = "" if section == "federation" else f"{section}."
    lines = []
    for e in err.errors():
        name = str(e["loc"][0]) if e["loc"] else "?"
        field = cls.model_fields.get(name)
        key = prefix + ((field.alias if field else None) or name)
        lines.append(f"run-config key {key!r}: {e['msg']} (got {e.get('input')!r})")
    return ConfigError("; ".join(lines))

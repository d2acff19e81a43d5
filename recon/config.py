"""The one run configuration of every job, parsed once into frozen pydantic models.

Flower hands the ServerApp and every ClientApp the same flat ``context.run_config``
(``[tool.flwr.app.config]`` of ``pyproject.toml`` plus ``--run-config`` overrides); the command
line (``fedunroll train / recon / personalize / simulate``) builds the same flat mapping from
``--config FILE.toml`` and ``--set key=value``. Keys are namespaced and dashed, one spelling
everywhere: ``section.key`` (``model.num-unrolls``, ``train.local-steps``, ``scaffold.eta-g``);
the few federation-wide keys have no section (``num-server-rounds``). Every caller goes through
:func:`parse_run_config`; an unknown key or a bad value raises :class:`ConfigError` naming it
(an unknown key with its near matches). ``fedunroll config`` lists every key with its default and
its one-line description (the ``description`` of its field).

The sections are the core's own configurations where it has one (``model`` is
:class:`recon.models.ModelConfig`, ``train`` is :class:`recon.train.TrainConfig`), so there is
nothing to copy or rename. The defaults here are the product's default job (4 non-IID synthetic
sites, Scaffold, small enough for 2 CPU cores); ``[tool.flwr.app.config]`` repeats them (a test
keeps both equal), because ``flwr run --run-config`` only accepts keys that the pyproject section
declares. A command may start from a few other defaults (``fedunroll train``: the paper's MoDL,
see ``fedunroll.jobs.TRAIN_DEFAULTS``).
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

from recon.data.dataset import crop_text, parse_crop
from recon.models import ModelConfig
from recon.runtime import resolve_device
from recon.train import TrainConfig
from recon.train.accel import dp_refusal as accel_dp_refusal
from recon.train.methods import check_method, method_options
from recon.train.privacy import refusal as privacy_refusal

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
    """Frozen, strict about unknown keys, keys spelled with dashes (``local-only``)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        alias_generator=lambda name: name.replace("_", "-"),
    )


def _k(default: Any, description: str, **kw: Any) -> Any:
    return Field(default, description=description, **kw)


def _comma_list(value: Any, item: type, what: str) -> str:
    """A list setting as the run config stores it: comma-separated text (Flower run configs hold
    scalars only); a TOML list is accepted and joined. Items must parse as ``item``."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    if any(isinstance(v, bool | dict | list) for v in items):
        raise ValueError(f"expected comma-separated {what}, got {value!r}")
    try:
        parsed = [item(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"expected comma-separated {what}, got {value!r}") from None
    if item is float and not all(math.isfinite(x) and x > 0 for x in parsed):
        raise ValueError(f"expected positive {what}, got {value!r}")
    return ",".join(str(v) for v in items)


def _split(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


class FederationConfig(_Section):
    """Keys without a section: rounds, participation and bounded waits."""

    num_server_rounds: int = _k(10, "federated rounds", ge=1, le=100_000)
    min_fit_clients: int = _k(2, "sites that must reply for a round to count", ge=1)
    min_available_clients: int = _k(2, "sites connected before the first round", ge=1)
    fraction_fit: float = _k(1.0, "fraction of the sites sampled to train each round", gt=0, le=1)
    fraction_evaluate: float = _k(1.0, "fraction of the sites sampled to evaluate", gt=0, le=1)
    sites_per_round: int = _k(
        0,
        "sites sampled (seeded by train.seed) per round, instead of the fractions (0 = off)",
        ge=0,
    )
    final_eval_sites: int = _k(
        0, "sites in the final evaluation (0 = all up to 32, else 32 sampled; N = N sampled)", ge=0
    )
    eval_mode: Literal["piggyback", "separate"] = _k(
        "piggyback",
        "piggyback (evaluate the received model in the next train exchange) | separate",
    )
    round_timeout: float = _k(900.0, "seconds the server waits for a round's replies", gt=0)
    round_grace: float = _k(
        2.0,
        "once min-fit-clients replied, wait max(3 s, round-grace x median reply time) more "
        "for the rest (0 = wait for all, up to round-timeout)",
        ge=0,
    )
    node_wait_timeout: float = _k(120.0, "seconds the server waits for the sites", gt=0)


class StrategySection(_Section):
    """The aggregation rule (``strategies/``)."""

    name: Literal[
        "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fairfedavg"
    ] = _k("scaffold", "fedavg | fedprox | fedadam | fedyogi | fedadagrad | scaffold | fairfedavg")


class FedProxSection(_Section):
    """``strategy.name = "fedprox"`` (Li et al. 2020)."""

    mu: float = _k(0.01, "FedProx proximal weight mu", ge=0)


class ScaffoldSection(_Section):
    """Levac et al. 2023 Algorithm 1: control-variate rule (line 7) and global step size (line
    10)."""

    option: Literal["i", "ii"] = _k("ii", "control-variate update: i (gradient at x) | ii (cheap)")
    eta_g: float = _k(1.0, "global step size eta_g", gt=0)
    grad_slices: int = _k(8, "option i: slices in the gradient at the global weights", ge=1)


class GleamSection(_Section):
    """``train.method = "gleam"``: M greedy modules of N / M unrolls (GLEAM Alg. 1), each with its
    own Adam and loss; ``devices`` spreads them over devices (P-GLEAM, Alg. 2). Lists are
    comma-separated text (``"cuda:0,cuda:1"``): Flower run configs hold scalars only."""

    modules: int = _k(0, "GLEAM modules M (0 = one per unroll, M = N)", ge=0)
    devices: str = _k("", 'P-GLEAM: module m on devices[m % D], e.g. "cuda:0,cuda:1" ("" = one)')
    lrs: str = _k("", 'per-module learning rates, e.g. "1e-3,5e-4" ("" = train.lr)')
    losses: str = _k("", 'per-module losses, e.g. "ssim,l1" ("" = train.loss)')

    @field_validator("devices", "losses", mode="before")
    @classmethod
    def _names(cls, value: Any) -> str:
        return _comma_list(value, str, "names")

    @field_validator("lrs", mode="before")
    @classmethod
    def _lrs(cls, value: Any) -> str:
        return _comma_list(value, float, "learning rates")

    @property
    def device_list(self) -> list[str]:
        return _split(self.devices)

    @property
    def lr_list(self) -> list[float]:
        return [float(v) for v in _split(self.lrs)]

    @property
    def loss_list(self) -> list[str]:
        return _split(self.losses)


class LayerwiseSection(_Section):
    """``train.method = "layerwise"``: convex blocks trained one after the other (Ozturkler et al.,
    ISMRM 2021)."""

    steps_per_block: int = _k(0, "steps per convex block (0 = split the steps evenly)", ge=0)


class FedOptSection(_Section):
    """FedAdam / FedYogi / FedAdagrad server optimiser (Reddi et al. 2021, Algorithm 2)."""

    eta: float = _k(1e-2, "server learning rate eta", gt=0)
    beta_1: float = _k(0.9, "first-moment decay beta_1", ge=0, lt=1)
    beta_2: float = _k(0.99, "second-moment decay beta_2", ge=0, lt=1)
    tau: float = _k(1e-3, "adaptivity tau", gt=0)


class FairSection(_Section):
    """``strategy.name = "fairfedavg"``: fairness-adjusted weights (GAutoMRI Eq. 9-11)."""

    gamma: float = _k(0.01, "fairness step gamma (GAutoMRI Eq. 11)", ge=0)


class EmaSection(_Section):
    """Client EMA of the global weights as the start of local training (FedAutoMRI Eq. 7)."""

    enabled: bool = _k(False, "start local training from the client EMA of the global weights")
    gamma: float = _k(0.9, "EMA decay gamma (FedAutoMRI Eq. 7)", ge=0, lt=1)
    form: Literal["adam", "printed", "plain"] = _k(
        "adam", "EMA form: adam | printed | plain (strategies.nas_maths.client_ema)"
    )


class NasSection(_Section):
    """Federated architecture search before training (GAutoMRI Alg. 1, MiLeNAS FedAutoMRI Eq. 6).

    ``search-rounds > 0`` (with ``model.denoiser = "nas"`` and no ``model.nas-genotype``): that
    many search rounds, the genotype derived (top-k per node) into ``<run dir>/genotype.json``,
    then ``num-server-rounds`` training rounds of the derived network from scratch.
    """

    search_rounds: int = _k(0, "architecture-search rounds before training", ge=0, le=100_000)
    search_steps: int = _k(0, "local search steps per round (0 = train.local-steps)", ge=0)
    lr_alpha: float = _k(3e-3, "learning rate of the architecture weights alpha", gt=0)
    lam: float = _k(1.0, "MiLeNAS mixed-level weight lambda (FedAutoMRI Eq. 6)", ge=0)
    val_fraction: float = _k(0.5, "share of a site's slices for the alpha update", gt=0, lt=1)
    top_k: int = _k(2, "operations kept per node when deriving the genotype", ge=1)


class DataConfig(_Section):
    """Where each site's slices come from and how they are undersampled (Levac et al. 2023 Sec.
    3.1: 1D random mask, R=4, 8% ACS); :meth:`dataset_kwargs` is the one mapping to
    :class:`~recon.data.dataset.SiteDataset`."""

    root: str = _k("data/synth", "folder of the sites site0 .. site{N-1}")
    num_sites: int = _k(4, "training sites (simulated SuperNodes)", ge=1, le=10_000)
    iid: bool = _k(False, "synthetic sites drawn from one distribution (else one each)")
    mask: Literal["random1d", "equispaced1d", "poisson2d"] = _k(
        "random1d", "undersampling mask: random1d | equispaced1d | poisson2d"
    )
    accel: float = _k(4.0, "acceleration R", ge=1)
    acs_frac: float = _k(0.08, "fully sampled central fraction (ACS)", gt=0, lt=1)
    seed: int = _k(0, "mask seed (a slice keeps its mask across epochs and rounds)")
    maps: Literal["espirit", "jsense"] = _k("espirit", "coil maps: espirit | jsense (SigPy)")
    max_train_slices: int = _k(0, "training slices used per site (0 = all)", ge=0)
    # Synthetic sites, generated by ``fedunroll simulate`` when ``root`` has none (0 = preset).
    synth_slices: int = _k(50, "synthetic sites: slices per site, all splits", ge=3)
    synth_size: int = _k(0, "synthetic sites: square matrix size (0 = the presets)", ge=0)
    synth_coils: int = _k(0, "synthetic sites: coils (0 = the presets)", ge=0)
    # Sites held out of training (Levac et al. 2023 Table 1 "Unseen"): in simulation the partitions
    # num-sites .. num-sites + unseen-sites - 1; they only take part in personalization.
    unseen_sites: int = _k(0, "held-out sites that only personalize", ge=0, le=1000)
    crop: str = _k("", 'image centre crop "HxW" before all else, e.g. "320x320" ("" = none)')

    @field_validator("crop", mode="before")
    @classmethod
    def _crop(cls, value: Any) -> str:
        return crop_text(value)

    def dataset_kwargs(self, **extra: Any) -> dict[str, Any]:
        """:class:`~recon.data.dataset.SiteDataset` keyword arguments of the sites' slices, for
        training, baselines, reports, ``recon`` and personalization alike (horizontal-readout
        files rotated by their attribute, ``rotate=None``); ``extra`` (``max_slices``, ...) wins.
        """
        return {
            "mask_kind": self.mask,
            "accel": self.accel,
            "acs_frac": self.acs_frac,
            "seed": self.seed,
            "maps_method": self.maps,
            "crop": parse_crop(self.crop),
            "rotate": None,
            **extra,
        }

    def split_kwargs(self, split: str) -> dict[str, Any]:
        """:meth:`dataset_kwargs` of one split as the federation loads it: the training split
        capped at ``max-train-slices``, the others whole."""
        cap = (self.max_train_slices or None) if split == "train" else None
        return self.dataset_kwargs(max_slices=cap)


class RunSection(_Section):
    """Run directory, resume, device and the non-federated baselines in the same results."""

    out: str = _k("runs", "parent folder of the run directories")
    name: str = _k("", 'run directory name ("" = <strategy>-<time>)')
    resume: str = _k("", "a run directory to continue from its checkpoint")
    device: str = _k("auto", "auto | cpu | cuda | cuda:N (a node's config device wins)")
    local_only: bool = _k(True, "also train every site alone (the local-only baseline)")
    centralized: bool = _k(False, "also train on all sites' slices pooled (centralized baseline)")


class PersonalizeSection(_Section):
    """Personalization (Levac et al. 2023 Sec. 3.4, 4.3): every site picks (r_fine, N_fine) by
    k-fold CV on its own training slices and fine-tunes the global model; only before/after
    metrics come back. ``lrs`` is comma-separated (``"1e-5,1e-4"``): Flower run configs hold
    scalars only."""

    enabled: bool = _k(False, "federation: personalize at every site after the last round")
    lrs: str = _k("1e-4,1e-3", "fine-tuning learning rates r_fine to cross-validate")
    max_epochs: int = _k(10, "most fine-tuning epochs N_fine", ge=1, le=100_000)
    folds: int = _k(5, "cross-validation folds k", ge=2)
    patience: int = _k(3, "epochs without validation gain before a fold stops", ge=1)
    min_gain: float = _k(0.005, "CV SSIM gain needed to fine-tune (else keep the model)", ge=0)
    timeout: float = _k(3600.0, "federation: seconds the server waits for the sites", gt=0)

    @field_validator("lrs", mode="before")
    @classmethod
    def _lrs(cls, value: Any) -> str:
        text = _comma_list(value, float, "learning rates")
        if not text:
            raise ValueError(f"expected one or more positive learning rates, got {value!r}")
        return text

    @property
    def lr_values(self) -> tuple[float, ...]:
        """``lrs`` as floats."""
        return tuple(float(v) for v in _split(self.lrs))


class RobustSection(_Section):
    """Bounds on what one site can do to the global model (README "Security and robustness"):
    example counts capped, oversized updates rejected, optional server-side clipping and a
    robust aggregate (``strategies.robust``)."""

    max_examples_factor: float = _k(
        10.0, "cap each site's num-examples at this x the round's lower median (0 = off)", ge=0
    )
    norm_factor: float = _k(
        50.0, "reject an update whose norm exceeds this x the round's lower median (0 = off)", ge=0
    )
    aggregator: Literal["fedavg", "median", "trimmed-mean", "multi-krum"] = _k(
        "fedavg", "model aggregate: fedavg (weighted mean) | median | trimmed-mean | multi-krum"
    )
    trim_beta: float = _k(0.1, "trimmed-mean: fraction of sites trimmed at each end", ge=0, lt=0.5)
    byzantine: int = _k(1, "multi-krum: hostile sites f tolerated (min-fit-clients > 2f + 2)", ge=0)
    clip_norm: float = _k(0.0, "clip each update y_k - x to this L2 norm (0 = off)", ge=0)

    @field_validator("max_examples_factor", "norm_factor")
    @classmethod
    def _factor(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError(f"must be 0 (off) or >= 1, got {value!r}")
        return value


class DpSection(_Section):
    """Differential privacy (README "Privacy"): slice-level DP-SGD at each site
    (:mod:`recon.train.privacy`, Opacus's accountant) and optional site-level clipping and
    noise of the aggregate at the server (:mod:`strategies.privacy`)."""

    enabled: bool = _k(False, "slice-level DP-SGD at every site (e2e / checkpoint only)")
    clip: float = _k(1.0, "DP-SGD: L2 bound C of each slice's gradient", gt=0)
    noise_multiplier: float = _k(
        1.0, "DP-SGD: Gaussian noise std / dp.clip on each step's summed gradient", ge=0
    )
    delta: float = _k(1e-5, "delta of the (epsilon, delta) reported, per site", gt=0, lt=1)
    epsilon_budget: float = _k(
        0.0, "stop before the round that would take a site past this epsilon (0 = none)", ge=0
    )
    accountant: Literal["rdp", "prv"] = _k("rdp", "Opacus accountant: rdp | prv")
    site_clip: float = _k(
        0.0, "server: clip each site's update y_k - x to this L2 norm (0 = off)", ge=0
    )
    site_noise_multiplier: float = _k(
        0.0, "server: Gaussian noise std / dp.site-clip on the sum of clipped updates", ge=0
    )


class SecAggSection(_Section):
    """Secure aggregation (README "Privacy"): evaluated, not available (see README)."""

    enabled: bool = _k(False, "Flower SecAgg+ (refused: does not fit this round loop)")

    @field_validator("enabled")
    @classmethod
    def _unavailable(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "secure aggregation is not available: Flower 1.41's SecAgg+ workflow needs the "
                "legacy Strategy/LegacyContext and FitRes records and hides the per-site replies "
                "the server validates (README 'Privacy', 'Secure aggregation')"
            )
        return value


class SimSection(_Section):
    """Flower simulation resources (``fedunroll simulate``; ignored in deployment)."""

    client_cpus: int = _k(1, "CPU cores per simulated site", ge=1)
    client_gpus: float = _k(0.0, "GPU share per simulated site", ge=0)
    ray_address: str = _k(
        "",
        'an existing Ray cluster (HOST:PORT of "ray start --head", or "auto"); "" = a private '
        "Ray instance started and stopped with the run",
    )

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, value: str) -> str:
        value = value.strip()
        if value in ("", "auto"):
            return value
        if "://" in value:
            raise ValueError(
                f"{value!r}: Ray Client addresses (ray://) are not supported; give the GCS "
                "address HOST:PORT that `ray start --head` prints"
            )
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f'{value!r} is not HOST:PORT (the address `ray start --head` prints), "auto" or ""'
            )
        return value

    @property
    def ray_endpoint(self) -> tuple[str, int] | None:
        """``(host, port)`` of a HOST:PORT ``ray_address`` (brackets of an IPv6 host removed);
        None for "" and "auto"."""
        if self.ray_address in ("", "auto"):
            return None
        host, _, port = self.ray_address.rpartition(":")
        return host.strip("[]"), int(port)


SECTIONS: dict[str, type[BaseModel]] = {
    "strategy": StrategySection,
    "train": TrainConfig,
    "model": ModelConfig,
    "fedprox": FedProxSection,
    "scaffold": ScaffoldSection,
    "gleam": GleamSection,
    "layerwise": LayerwiseSection,
    "fedopt": FedOptSection,
    "data": DataConfig,
    "run": RunSection,
    "personalize": PersonalizeSection,
    "sim": SimSection,
    "fair": FairSection,
    "ema": EmaSection,
    "nas": NasSection,
    "robust": RobustSection,
    "dp": DpSection,
    "secagg": SecAggSection,
}


class RunConfig(BaseModel):
    """The whole run configuration; build it with :func:`parse_run_config`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation: FederationConfig = FederationConfig()
    strategy: StrategySection = StrategySection()
    # The product's default federated job fits 4 sites on 2 CPU cores: the paper's MoDL with 4
    # unrolls and 4 CG steps instead of 6 and 6, 20 local steps per round; every other default
    # is the core's own.
    train: TrainConfig = TrainConfig(steps=20)
    model: ModelConfig = ModelConfig(num_unrolls=4, cg_iters=4)
    fedprox: FedProxSection = FedProxSection()
    scaffold: ScaffoldSection = ScaffoldSection()
    gleam: GleamSection = GleamSection()
    layerwise: LayerwiseSection = LayerwiseSection()
    fedopt: FedOptSection = FedOptSection()
    data: DataConfig = DataConfig()
    run: RunSection = RunSection()
    personalize: PersonalizeSection = PersonalizeSection()
    sim: SimSection = SimSection()
    fair: FairSection = FairSection()
    ema: EmaSection = EmaSection()
    nas: NasSection = NasSection()
    robust: RobustSection = RobustSection()
    dp: DpSection = DpSection()
    secagg: SecAggSection = SecAggSection()

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
        self._check_robust()
        self._check_privacy()
        if fed.sites_per_round and not (
            fed.min_fit_clients <= fed.sites_per_round <= self.data.num_sites
        ):
            raise ValueError(
                f"sites-per-round ({fed.sites_per_round}) must lie between min-fit-clients "
                f"({fed.min_fit_clients}) and data.num-sites ({self.data.num_sites})"
            )
        if fed.min_fit_clients > self.data.num_sites:
            raise ValueError(
                f"min-fit-clients ({fed.min_fit_clients}) exceeds data.num-sites "
                f"({self.data.num_sites})"
            )
        return self

    def _check_method(self) -> None:
        method, model, gleam = self.train.method, self.model, self.gleam
        check_method(method, model.num_unrolls, model.shared, model.denoiser, gleam.modules)
        modules = gleam.modules or model.num_unrolls
        for key, values in (("gleam.lrs", gleam.lr_list), ("gleam.losses", gleam.loss_list)):
            if method == "gleam" and values and len(values) != modules:
                raise ValueError(f"{key} needs one value per GLEAM module ({modules})")
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

    def _check_robust(self) -> None:
        robust, name = self.robust, self.strategy.name
        if robust.aggregator != "fedavg" and name in ("scaffold", "fairfedavg"):
            why = (
                "Scaffold's control variate c moves with the mean of the same sites' updates"
                if name == "scaffold"
                else "fairfedavg's fairness weights are its aggregation rule"
            )
            raise ValueError(
                f"robust.aggregator = {robust.aggregator!r} does not combine with strategy.name "
                f"= {name!r} ({why}); use robust.norm-factor and robust.clip-norm with it"
            )
        f, fit = robust.byzantine, self.federation.min_fit_clients
        if robust.aggregator == "multi-krum" and fit <= 2 * f + 2:
            raise ValueError(
                f"robust.aggregator = 'multi-krum' needs min-fit-clients > 2 * robust.byzantine "
                f"+ 2 = {2 * f + 2} (Krum's n > 2f + 2), got min-fit-clients = {fit}"
            )

    def _check_privacy(self) -> None:
        """Refuse DP settings whose accounting would not hold (README "Privacy")."""
        dp, name = self.dp, self.strategy.name
        if dp.enabled:
            why = privacy_refusal(self.train.method)
            if why is not None:
                raise ValueError(why)
            if self.train.grad_clip is not None:
                raise ValueError("train.grad-clip does not combine with dp.enabled (dp.clip clips)")
            why = accel_dp_refusal(self.train.compile, self.train.precision)
            if why is not None:
                raise ValueError(why)
            if dp.noise_multiplier <= 0:
                raise ValueError(
                    "dp.enabled with dp.noise-multiplier = 0 clips but adds no noise: epsilon is "
                    "infinite; set dp.noise-multiplier > 0 (or dp.enabled = false)"
                )
            if name == "scaffold" and self.scaffold.option == "i":
                raise ValueError(
                    'dp.enabled with scaffold.option = "i": c_k^+ is a gradient of the site\'s '
                    'slices without clipping or noise; use scaffold.option = "ii"'
                )
            if name == "fairfedavg":
                raise ValueError(
                    "dp.enabled with strategy.name = 'fairfedavg': its risk gaps are losses on "
                    "the training slices outside DP-SGD's accounting"
                )
            if self.nas.search_rounds:
                raise ValueError("dp.enabled with nas.search-rounds > 0: the search is not DP")
        site = dp.site_clip > 0 or dp.site_noise_multiplier > 0
        if dp.epsilon_budget and not (dp.enabled or dp.site_noise_multiplier > 0):
            raise ValueError(
                "dp.epsilon-budget needs dp.enabled = true or dp.site-noise-multiplier > 0"
            )
        if dp.site_noise_multiplier > 0 and dp.site_clip <= 0:
            raise ValueError("dp.site-noise-multiplier needs dp.site-clip > 0 (the noise scale)")
        if site and self.robust.aggregator != "fedavg":
            raise ValueError(
                f"dp.site-clip with robust.aggregator = {self.robust.aggregator!r}: the noise is "
                "calibrated to the mean of clipped updates (sensitivity dp.site-clip / n); a "
                "median, trimmed mean or Krum selection has another sensitivity"
            )
        if site and self.robust.clip_norm:
            raise ValueError("dp.site-clip replaces robust.clip-norm: set robust.clip-norm = 0")
        if site and name in ("scaffold", "fairfedavg"):
            raise ValueError(
                f"dp.site-clip with strategy.name = {name!r}: "
                + (
                    "its c-deltas reach the server unclipped and un-noised"
                    if name == "scaffold"
                    else "its fairness weights re-weight the clipped updates"
                )
            )

    def method_options(self, gleam_devices: Sequence[str] = ()) -> dict[str, Any]:
        """Keyword options of :func:`recon.train.methods.local_train` for ``train.method``;
        ``gleam_devices`` is the site's own P-GLEAM setting (node config ``gleam-devices``), which
        wins over ``gleam.devices``."""
        gleam = self.gleam
        devices = list(gleam_devices) or [resolve_device(d) for d in gleam.device_list]
        return method_options(
            self.train.method,
            gleam_modules=gleam.modules,
            gleam_devices=devices,
            gleam_lrs=gleam.lr_list,
            gleam_losses=gleam.loss_list,
            steps_per_block=self.layerwise.steps_per_block,
        )

    @property
    def local_steps(self) -> int:
        """Local steps per round: ``total-steps / num-server-rounds``, else ``local-steps``
        (0: ``train.epochs`` passes over a site's slices)."""
        total = self.train.total_steps
        return total // self.federation.num_server_rounds if total else self.train.steps or 0

    def flat(self) -> dict[str, Any]:
        """The flat, namespaced dict (``results.json["config"]``, ``--run-config`` files)."""
        out: dict[str, Any] = {}
        for section, model in self._sections().items():
            prefix = "" if section == "federation" else f"{section}."
            for key, value in model.model_dump(by_alias=True).items():
                out[prefix + key] = value
        return out

    def _sections(self) -> dict[str, BaseModel]:
        return {name: getattr(self, name) for name in ("federation", *SECTIONS)}


def _section_classes() -> dict[str, type[BaseModel]]:
    return {"federation": FederationConfig, **SECTIONS}


def _valid_keys() -> dict[str, tuple[str, str]]:
    """Flat key -> (section attribute, dashed key within the section)."""
    keys: dict[str, tuple[str, str]] = {}
    for section, cls in _section_classes().items():
        prefix = "" if section == "federation" else f"{section}."
        for name, field in cls.model_fields.items():
            alias = field.alias or name
            keys[prefix + alias] = (section, alias)
    return keys


VALID_KEYS = _valid_keys()


def default_flat() -> dict[str, Any]:
    """Every key with its default value (what ``[tool.flwr.app.config]`` must declare)."""
    return RunConfig().flat()


def describe_keys() -> dict[str, tuple[Any, str]]:
    """Every key -> (its default, its one-line description), in section order: what
    ``fedunroll config`` prints."""
    defaults = default_flat()
    out: dict[str, tuple[Any, str]] = {}
    for key, (section, alias) in VALID_KEYS.items():
        cls = _section_classes()[section]
        field = next(f for n, f in cls.model_fields.items() if (f.alias or n) == alias)
        out[key] = (defaults[key], field.description or "")
    return out


# Keys of the retired ``fedunroll train`` config whose new name is not a near match.
_RENAMED = {"train.steps": "train.local-steps", "data.max-slices": "data.max-train-slices"}


def _unknown(key: str) -> ConfigError:
    dashed = key.replace("_", "-")  # the old underscore spelling of a dashed key
    exact = [k for k in (dashed, _RENAMED.get(dashed)) if k in VALID_KEYS]
    close = exact[:1] or difflib.get_close_matches(dashed, VALID_KEYS, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    section = key.partition(".")[0] if "." in key else ""
    same = sorted(k for k in VALID_KEYS if section and k.startswith(section + "."))
    listed = f" Valid keys in [{section}]: {', '.join(same)}." if same else ""
    return ConfigError(
        f"unknown run-config key {key!r}{hint}{listed} (`fedunroll config` lists every key)"
    )


def parse_run_config(flat: Mapping[str, Any]) -> RunConfig:
    """Parse Flower's flat run config (or any flat override dict) into a :class:`RunConfig`.

    Parameters
    ----------
    flat : Mapping[str, Any]
        ``{"strategy.name": "fedavg", "train.lr": 1e-3, "num-server-rounds": 3, ...}``;
        missing keys take the defaults of :class:`RunConfig`.

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
        section, alias = VALID_KEYS[key]
        grouped.setdefault(section, {})[alias] = value
    defaults = RunConfig()
    sections: dict[str, Any] = {}
    for section, values in grouped.items():
        default: BaseModel = getattr(defaults, section)
        try:
            sections[section] = type(default).model_validate(
                {**default.model_dump(by_alias=True), **values}
            )
        except ValidationError as err:
            raise _named(err, section) from None
    try:
        return RunConfig(**sections)
    except ValidationError as err:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise ConfigError(f"run config: {msgs}") from None


def _named(err: ValidationError, section: str) -> ConfigError:
    """One line per bad key: ``run-config key 'train.lr': Input should be greater than 0 ...``."""
    fields = _section_classes()[section].model_fields
    prefix = "" if section == "federation" else f"{section}."
    lines = []
    for e in err.errors():
        name = str(e["loc"][0]) if e["loc"] else "?"
        field = fields.get(name)
        key = prefix + ((field.alias if field else None) or name)
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"run-config key {key!r}: {msg} (got {e.get('input')!r})")
    return ConfigError("; ".join(lines))

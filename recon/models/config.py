"""Typed model configuration and the one factory that builds every architecture."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from recon.models.denoisers import build_denoiser
from recon.models.unrolled import MoDL, Unrolled, UnrolledPGD
from recon.nas.genotype import Genotype
from recon.nas.search import build_nas_denoiser


class ModelConfig(BaseModel):
    """Architecture hyper-parameters: the run config's ``[model]`` section (``model.num-unrolls``).

    The defaults are Levac et al. 2023 Sec. 3.1 (MoDL, Nu=6, NCG=6, a U-Net of 481k weights);
    the federated default job and ``fedunroll train`` override a few (``fedunroll config``).
    Keys are dashed (``num-unrolls``); Python code may use the field names (``num_unrolls``).
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        alias_generator=lambda name: name.replace("_", "-"),
    )

    arch: Literal["modl", "pgd"] = Field(
        "modl", description="unrolled network: MoDL (CG data consistency) or unrolled PGD"
    )
    denoiser: Literal["unet", "resnet", "nas", "convex"] = Field(
        "unet",
        description="learned prior: U-Net, ResNet, NAS cells (GAutoMRI) or convex blocks "
        "(train.method = layerwise)",
    )
    num_unrolls: int = Field(6, ge=1, le=64, description="unrolled iterations Nu")
    cg_iters: int = Field(6, ge=1, le=100, description="CG steps per data consistency (MoDL)")
    lam_init: float = Field(0.05, gt=0, description="initial data-consistency weight lambda")
    shared: bool = Field(True, description="one denoiser shared by all unrolls (else one each)")
    unet_chans: int = Field(16, ge=1, description="U-Net channels of the first level")
    unet_pools: int = Field(3, ge=1, le=6, description="U-Net pooling levels")
    resnet_features: int = Field(64, ge=1, description="ResNet denoiser channels")
    resnet_layers: int = Field(5, ge=2, description="ResNet denoiser conv layers")
    pgd_step_init: float = Field(0.5, gt=0, description="initial gradient step of unrolled PGD")
    # denoiser="nas": a genotype file gives the derived network (its channels/cells win);
    # without one, the DARTS search network (GAutoMRI Fig. 2) with softmax-weighted MixedOps.
    nas_genotype: str | None = Field(
        None,
        description='derived NAS genotype file ("" = the search net, for nas.search-rounds > 0)',
    )
    nas_channels: int = Field(16, ge=1, description="NAS search net channels")
    nas_cells: int = Field(3, ge=1, description="NAS search net cells")
    nas_nodes: int = Field(3, ge=1, description="intermediate nodes per NAS cell")
    # denoiser="convex": two-layer conv-ReLU-1x1 blocks with skips (Ozturkler et al., ISMRM 2021),
    # trainable layer-wise.
    convex_blocks: int = Field(4, ge=1, description="convex denoiser blocks (layer-wise stages)")
    convex_hidden: int = Field(64, ge=1, description="hidden channels per convex block")
    convex_kernel: int = Field(7, ge=1, description="kernel size of the convex blocks")

    @field_validator("nas_genotype", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # TOML has no null: "" means no genotype file
        return None if isinstance(value, str) and not value.strip() else value

    @field_serializer("nas_genotype")
    def _none_is_empty(self, value: str | None) -> str:
        return value or ""


def build_model(
    cfg: ModelConfig | None = None, *, genotype: Genotype | None = None, **overrides: object
) -> Unrolled:
    """Build MoDL or unrolled PGD from a :class:`ModelConfig` (keyword overrides allowed).

    ``genotype`` (a searched cell structure, GAutoMRI Algorithm 2) gives every denoiser the
    derived network of that genotype, whatever ``cfg.denoiser`` says: how the server and every
    site build the network of a training phase that follows a federated search.
    """
    cfg = (
        (cfg or ModelConfig()).model_copy(update=overrides) if overrides else (cfg or ModelConfig())
    )
    cfg = ModelConfig.model_validate(cfg.model_dump())  # re-validate the overrides

    searched = genotype is None and cfg.denoiser == "nas" and cfg.nas_genotype is None
    if searched and not cfg.shared:
        raise ValueError("model.denoiser='nas' without a genotype (search) needs model.shared=true")

    def make():
        if genotype is not None:
            return build_nas_denoiser(genotype)
        if cfg.denoiser == "nas":
            return build_nas_denoiser(
                cfg.nas_genotype, cfg.nas_channels, cfg.nas_cells, cfg.nas_nodes
            )
        if cfg.denoiser == "convex":
            from recon.models.convex import build_convex_denoiser

            return build_convex_denoiser(cfg.convex_blocks, cfg.convex_hidden, cfg.convex_kernel)
        if cfg.denoiser == "unet":
            return build_denoiser("unet", chans=cfg.unet_chans, num_pools=cfg.unet_pools)
        return build_denoiser("resnet", features=cfg.resnet_features, num_layers=cfg.resnet_layers)

    if cfg.arch == "modl":
        den = make() if cfg.shared else [make() for _ in range(cfg.num_unrolls)]
        return MoDL(den, num_unrolls=cfg.num_unrolls, cg_iters=cfg.cg_iters, lam_init=cfg.lam_init)
    return UnrolledPGD([make() for _ in range(cfg.num_unrolls)], step_init=cfg.pgd_step_init)

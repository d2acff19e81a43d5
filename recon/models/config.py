"""Typed model configuration and the one factory that builds every architecture."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from recon.models.denoisers import build_denoiser
from recon.models.unrolled import MoDL, Unrolled, UnrolledPGD
from recon.nas.genotype import Genotype
from recon.nas.search import build_nas_denoiser


class ModelConfig(BaseModel):
    """Architecture hyper-parameters (defaults: Levac et al. 2023 Sec. 3.1, MoDL Nu=6, NCG=6, U-Net
    481k)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: Literal["modl", "pgd"] = "modl"
    denoiser: Literal["unet", "resnet", "nas", "convex"] = "unet"
    num_unrolls: int = Field(6, ge=1, le=64)
    cg_iters: int = Field(6, ge=1, le=100)
    lam_init: float = Field(0.05, gt=0)
    shared: bool = True
    unet_chans: int = Field(16, ge=1)
    unet_pools: int = Field(3, ge=1, le=6)
    resnet_features: int = Field(64, ge=1)
    resnet_layers: int = Field(5, ge=2)
    pgd_step_init: float = Field(0.5, gt=0)
    # denoiser="nas": a genotype file gives the derived network (its channels/cells win);
    # without one, the DARTS search network (GAutoMRI Fig. 2) with softmax-weighted MixedOps.
    nas_genotype: str | None = None
    nas_channels: int = Field(16, ge=1)
    nas_cells: int = Field(3, ge=1)
    nas_nodes: int = Field(3, ge=1)
    # denoiser="convex": two-layer conv-ReLU-1x1 blocks with skips (Ozturkler et al., ISMRM 2021),
    # trainable layer-wise.
    convex_blocks: int = Field(4, ge=1)
    convex_hidden: int = Field(64, ge=1)
    convex_kernel: int = Field(7, ge=1)


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

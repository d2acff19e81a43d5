"""The MiLeNAS search network of the MoDL denoiser and its α helpers (GAutoMRI Fig. 2).

The model side of architecture search: building the search denoiser (or the derived one from a
genotype), finding the one :class:`~recon.nas.cell.SearchDenoiser` inside an unrolled model, and
reading and writing its architecture weights α. The search *training* (the mixed-level step of
FedAutoMRI Eq. 6) is in :mod:`recon.train.milenas`.

θ is every registered parameter of the model (the denoiser weights and MoDL's ``lam``), α is the
search net's architecture weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from recon.models.denoisers import ComplexDenoiser
from recon.nas.cell import SearchDenoiser
from recon.nas.genotype import Genotype, build_from_genotype, derive_genotype


def build_search_denoiser(
    channels: int = 16,
    num_cells: int = 3,
    num_nodes: int = 3,
    alpha_seed: int | None = 0,
) -> ComplexDenoiser:
    """Search-phase denoiser ``x + D(x; θ, α)`` for complex images (α seeded by ``alpha_seed``)."""
    gen = None if alpha_seed is None else torch.Generator().manual_seed(alpha_seed)
    net = SearchDenoiser(channels, num_cells, num_nodes, generator=gen)
    return ComplexDenoiser(net, residual=True)


def build_nas_denoiser(
    genotype: Genotype | str | os.PathLike[str] | None,
    channels: int = 16,
    num_cells: int = 3,
    num_nodes: int = 3,
) -> ComplexDenoiser:
    """``denoiser="nas"``: the derived net of ``genotype`` (file or Genotype), else a search net.

    With a genotype, the genotype's own ``channels`` / ``num_cells`` are used.
    """
    if genotype is None:
        return build_search_denoiser(channels, num_cells, num_nodes)
    return build_from_genotype(genotype)


def search_net(model: nn.Module) -> SearchDenoiser:
    """The one :class:`SearchDenoiser` inside ``model`` (MoDL must share its denoiser)."""
    nets = {id(m): m for m in model.modules() if isinstance(m, SearchDenoiser)}
    if len(nets) != 1:
        raise ValueError(
            f"expected exactly one SearchDenoiser in the model, found {len(nets)} "
            "(architecture search needs one shared denoiser: model.shared=True)"
        )
    return next(iter(nets.values()))


def arch_parameters(model: nn.Module) -> list[torch.Tensor]:
    """α of the model's search net."""
    return search_net(model).arch_parameters()


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """θ: the model's trainable registered parameters (never α)."""
    return [p for p in model.parameters() if p.requires_grad]


def alpha_state(model: nn.Module) -> dict[str, np.ndarray]:
    """α as numpy arrays, the payload of the ``nas.alpha`` record."""
    return search_net(model).alpha_state()


def load_alpha_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load α (e.g. the server's aggregate) into the model's search net, in place."""
    search_net(model).load_alpha_state(state)


def model_genotype(model: nn.Module, k: int = 2) -> Genotype:
    """Derive the genotype of the model's search net (top-``k`` edges per node)."""
    net = search_net(model)
    return derive_genotype(net.alpha_state(), k=k, channels=net.channels, num_cells=net.num_cells)

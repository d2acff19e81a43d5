"""Federated architecture search of the MoDL denoiser (GAutoMRI, FedAutoMRI).

- :mod:`recon.nas.ops`: the 8 candidate operations and ``MixedOp`` (Eq. 6).
- :mod:`recon.nas.cell`: DARTS-style cells, ``SearchDenoiser`` (θ and α kept apart) and the
  derived ``DerivedNet``.
- :mod:`recon.nas.search`: the search network of an unrolled model and its α helpers (the
  MiLeNAS search step that trains it is :mod:`recon.train.milenas`).
- :mod:`recon.nas.genotype`: α -> readable genotype file -> discrete denoiser.
- :mod:`recon.nas.cost`: parameter counts and convolution MACs.

The server-side maths (α aggregation, fairness weights, client EMA) is in
:mod:`strategies.nas_maths`.
"""

from recon.nas.cell import DerivedNet, SearchDenoiser
from recon.nas.cost import count_conv_macs, denoiser_cost, unrolled_cost
from recon.nas.genotype import PUBLISHED, Genotype, build_from_genotype, derive_genotype
from recon.nas.ops import PRIMITIVES, MixedOp, make_op
from recon.nas.search import (
    alpha_state,
    arch_parameters,
    build_nas_denoiser,
    build_search_denoiser,
    load_alpha_state,
    model_genotype,
    search_net,
    weight_parameters,
)

__all__ = [
    "PRIMITIVES",
    "PUBLISHED",
    "DerivedNet",
    "Genotype",
    "MixedOp",
    "SearchDenoiser",
    "alpha_state",
    "arch_parameters",
    "build_from_genotype",
    "build_nas_denoiser",
    "build_search_denoiser",
    "count_conv_macs",
    "denoiser_cost",
    "derive_genotype",
    "load_alpha_state",
    "make_op",
    "model_genotype",
    "search_net",
    "unrolled_cost",
    "weight_parameters",
]

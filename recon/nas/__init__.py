"""Federated architecture search of the MoDL denoiser (GAutoMRI, FedAutoMRI).

- :mod:`recon.nas.ops`: the 8 candidate operations and ``MixedOp`` (Eq. 6).
- :mod:`recon.nas.cell`: DARTS-style cells, ``SearchDenoiser`` (θ and α kept apart) and the
  derived ``DerivedNet``.
- :mod:`recon.nas.search`: the MiLeNAS local search step and α helpers.
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
    SearchResult,
    SliceSubset,
    alpha_state,
    arch_parameters,
    build_nas_denoiser,
    build_search_denoiser,
    empirical_risk,
    load_alpha_state,
    milenas_grads,
    milenas_train,
    model_genotype,
    split_train_val,
    weight_parameters,
)

__all__ = [
    "PRIMITIVES",
    "PUBLISHED",
    "DerivedNet",
    "Genotype",
    "MixedOp",
    "SearchDenoiser",
    "SearchResult",
    "SliceSubset",
    "alpha_state",
    "arch_parameters",
    "build_from_genotype",
    "build_nas_denoiser",
    "build_search_denoiser",
    "count_conv_macs",
    "denoiser_cost",
    "derive_genotype",
    "empirical_risk",
    "load_alpha_state",
    "make_op",
    "milenas_grads",
    "milenas_train",
    "model_genotype",
    "split_train_val",
    "unrolled_cost",
    "weight_parameters",
]

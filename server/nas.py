"""The search phase of a federated architecture search (GAutoMRI Algorithm 1) before training.

With ``model.denoiser = "nas"``:

- ``nas.search-rounds > 0``: :func:`search_phase` runs that many rounds of the
  :class:`strategies.nas.NasSearch` strategy on the search network (θ and α, each aggregated with
  weights N_c / N over every reply, Eq. 8), derives the genotype (top ``nas.top-k`` edges per
  node) and writes ``<run dir>/genotype.json`` (readable, :class:`recon.nas.Genotype`) and
  ``<run dir>/search/search.json`` (per-round records, final α, parameter counts). Its rounds
  are checkpointed in ``<run dir>/search/checkpoint.pt``: a resumed run continues the search, or
  skips it when ``genotype.json`` exists.
- ``model.nas-genotype = <file>``: the training phase alone, from that genotype.

Either way the training phase trains the derived network from scratch, and every message of
it carries the genotype as JSON (``nas.genotype``) so that every site builds the same network
(``recon.models.build_model(..., genotype=...)``), whatever its file system.
"""

from __future__ import annotations

import json
import uuid
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import log
from flwr.serverapp import Grid

from recon.config import RunConfig
from recon.fileio import atomic_open, atomic_write_json
from recon.models import build_model, count_parameters
from recon.nas import Genotype, alpha_state, derive_genotype
from recon.nas.search import search_net
from server import checkpoint
from server.federation import Federation, Progress, robust_options
from strategies.nas import NasSearch
from strategies.protocol import NAS_GENOTYPE, to_numpy, to_record

GENOTYPE_FILE = "genotype.json"
SEARCH_DIR = "search"


def search_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``num-server-rounds`` = ``nas.search-rounds`` (the search's round count)."""
    fed = cfg.federation.model_copy(update={"num_server_rounds": cfg.nas.search_rounds})
    return cfg.model_copy(update={"federation": fed})


def search_phase(grid: Grid, cfg: RunConfig, run_dir: Path) -> Genotype:
    """Run (or resume) the federated search; returns the derived genotype (also saved)."""
    out = Path(run_dir)
    if (out / GENOTYPE_FILE).exists():
        log(INFO, "search: %s exists, skipping the search phase", out / GENOTYPE_FILE)
        return Genotype.load(out / GENOTYPE_FILE)
    scfg = search_config(cfg)
    fed_cfg = cfg.federation
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)  # the search net (θ, α seeded)
    theta = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    strategy = NasSearch(
        alpha=alpha_state(model),
        fraction_train=fed_cfg.fraction_fit,
        fraction_evaluate=fed_cfg.fraction_evaluate,
        min_train_nodes=fed_cfg.min_fit_clients,
        min_evaluate_nodes=fed_cfg.min_fit_clients,
        min_available_nodes=fed_cfg.min_available_clients,
        min_valid_replies=fed_cfg.min_fit_clients,
        **robust_options(cfg),  # identity, schema and influence bounds as in training
    )
    sdir = out / SEARCH_DIR
    sdir.mkdir(parents=True, exist_ok=True)
    if checkpoint.exists(sdir):
        state = checkpoint.load(sdir)
        strategy.load_state_dict(state.strategy)
        progress = Progress(
            state.round,
            to_record({k: np.asarray(v) for k, v in state.arrays.items()}),
            state.rounds,
            state.elapsed_seconds,
        )
        run_uid = state.run_uid
        log(INFO, "search: resuming after round %d", state.round)
    else:
        progress = Progress(0, to_record(theta))
        run_uid = f"{out.name}-search-{uuid.uuid4().hex[:8]}"
    fed = Federation(grid, strategy, scfg, sdir, run_uid)
    fed.run(progress)
    assert strategy.alpha is not None
    net = search_net(model)
    genotype = derive_genotype(
        strategy.alpha, k=cfg.nas.top_k, channels=net.channels, num_cells=net.num_cells
    )
    model.load_state_dict(progress.arrays.to_torch_state_dict())
    derived = build_model(cfg.model, genotype=genotype)
    summary = {
        "rounds": progress.rounds,
        "alpha": {k: np.asarray(v).tolist() for k, v in strategy.alpha.items()},
        "genotype": genotype.to_dict(),
        "num_parameters": {
            "search": count_parameters(model),
            "derived": count_parameters(derived),
        },
        "rejected": [r._asdict() for r in strategy.rejected],
    }
    atomic_write_json(sdir / "search.json", summary)
    with atomic_open(sdir / "alpha.npz") as f:
        np.savez(f, allow_pickle=False, **to_numpy(to_record(strategy.alpha)))
    genotype.save(out / GENOTYPE_FILE)
    log(INFO, "search: genotype written to %s", out / GENOTYPE_FILE)
    return genotype


def training_genotype(grid: Grid, cfg: RunConfig, run_dir: Path) -> Genotype | None:
    """The genotype the training phase uses (searching first if asked); None: not a NAS run."""
    if cfg.model.denoiser != "nas":
        return None
    if cfg.model.nas_genotype:
        return Genotype.load(Path(cfg.model.nas_genotype).expanduser())
    return search_phase(grid, cfg, run_dir)


def genotype_config(genotype: Genotype | None) -> dict[str, Any]:
    """Config entries of every training-phase message (``nas.genotype`` as JSON)."""
    return {} if genotype is None else {NAS_GENOTYPE: json.dumps(genotype.to_dict())}


__all__ = ["GENOTYPE_FILE", "genotype_config", "search_phase", "training_genotype"]

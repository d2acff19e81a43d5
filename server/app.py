"""The ServerApp: parse the run config, build the strategy, run the rounds, write the results.

Run directory (``run.out/run.name``, or ``run.resume``)::

    checkpoint.pt      after every round (arrays, strategy state, round, RNG, records so far)
    results.json       at the end (completed or failed), schema in :mod:`server.results`
    final_model.pt     the global model (``recon.models.checkpoint`` format)

With ``personalize.enabled`` every site (and every held-out site, ``data.unseen-sites``)
then personalizes the final model locally; ``results.json`` gets their before/after metrics.
"""

from __future__ import annotations

import time
import uuid
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from recon.config import RunConfig, parse_run_config
from recon.models import build_model, count_parameters
from recon.models.checkpoint import save_checkpoint
from recon.nas import Genotype
from recon.runtime import tune_malloc
from recon.train.baselines import initial_model as baseline_start
from server import checkpoint, results
from server import nas as nas_phase
from server.events import RunEvents
from server.federation import Federation, Progress, robust_options
from server.grid import TrainingGrid
from server.personalize import personalization_phase
from server.privacy import privacy_summary
from strategies.flower import build_strategy
from strategies.protocol import to_record

app = ServerApp()
tune_malloc()  # the ServerApp process evaluates and aggregates

# Keys a resumed run may change (where to write, how long to wait, how many rounds in total).
RESUMABLE_CHANGES = ("num-server-rounds", "round-timeout", "round-grace", "node-wait-timeout")


def strategy_from_config(cfg: RunConfig) -> Any:
    """The fedunroll strategy named by ``strategy.name`` with its namespaced options."""
    fed = cfg.federation
    common: dict[str, Any] = {
        "fraction_train": fed.fraction_fit,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": fed.min_fit_clients,
        "min_evaluate_nodes": fed.min_fit_clients,
        "min_available_nodes": fed.min_available_clients,
        "min_valid_replies": fed.min_fit_clients,
        "sites_per_round": fed.sites_per_round,
        "sample_seed": cfg.train.seed,
    }
    name = cfg.strategy.name
    if name == "fedprox":
        common["proximal_mu"] = cfg.fedprox.mu
    elif name in ("fedadam", "fedyogi", "fedadagrad"):
        o = cfg.fedopt
        common.update(eta=o.eta, beta_1=o.beta_1, beta_2=o.beta_2, tau=o.tau)
    elif name == "scaffold":
        # N of c <- c + |S|/N mean(Delta c_k): the federation's sites, sampled or not
        common.update(
            eta_g=cfg.scaffold.eta_g, option=cfg.scaffold.option, num_clients=cfg.data.num_sites
        )
    elif name == "fairfedavg":
        common["gamma"] = cfg.fair.gamma
    if cfg.dp.site_clip:  # site-level DP (README "Privacy")
        common.update(
            site_clip=cfg.dp.site_clip, site_noise_multiplier=cfg.dp.site_noise_multiplier
        )
    return build_strategy(name, **common, **robust_options(cfg))


def initial_model(cfg: RunConfig, genotype: Genotype | None = None) -> torch.nn.Module:
    """x_0: the model drawn under ``train.seed`` (the same one the baselines start from).

    ``genotype`` (a searched denoiser, :mod:`server.nas`) replaces the configured denoiser.
    """
    if genotype is not None:
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model, genotype=genotype)
    return baseline_start(cfg.model, cfg.train.seed)


def run_dir_of(cfg: RunConfig) -> Path:
    """``run.resume`` if set, else ``run.out/run.name`` (name defaults to strategy-time)."""
    if cfg.run.resume:
        return Path(cfg.run.resume).expanduser()
    name = cfg.run.name or f"{cfg.strategy.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run.out).expanduser() / name


def _check_resume(saved: dict[str, Any], cfg: RunConfig, run_dir: Path) -> None:
    now = cfg.flat()
    changed = [
        k
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
        and k not in RESUMABLE_CHANGES
        and not k.startswith(("run.", "sim."))
    ]
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {run_dir}: the run config changed ({diff})")


def run_federation(grid: Grid, cfg: RunConfig, after_round: Any = None) -> dict[str, Any]:
    """Run (or resume) a federation on ``grid``; returns the results dict it wrote.

    Raises whatever stopped the run (too few replies, no nodes) after writing
    ``results.json`` with ``status = "failed: <reason>"``; the checkpoint of the last completed
    round stays, so ``run.resume`` can continue. The run directory is locked for the whole run
    (:class:`server.runlock.RunLock`): a second run or resume of it while this one lives raises
    :class:`server.runlock.RunInUseError` before touching anything; a killed run's lock dies
    with it.
    """
    run_dir = run_dir_of(cfg)
    with checkpoint.RunLock(run_dir):
        return _federate(grid, cfg, run_dir, after_round)


def _federate(grid: Grid, cfg: RunConfig, run_dir: Path, after_round: Any) -> dict[str, Any]:
    """:func:`run_federation` with ``run_dir`` locked."""
    t_start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    strategy = strategy_from_config(cfg)
    genotype = _training_genotype(grid, cfg, run_dir, t_start)
    model = initial_model(cfg, genotype)
    ref = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    progress, run_uid = _start(cfg, run_dir, strategy, ref)
    prior_seconds = progress.elapsed_seconds
    events = RunEvents(run_dir)  # <run dir>/events.jsonl, read by `fedunroll dashboard`
    events.run_started(run_dir.name, cfg.flat(), progress.round, cfg.federation.num_server_rounds)
    # Held-out (unseen) sites never see a train or evaluate message: the rounds get a view of
    # the grid without them; they only personalize at the end (server/personalize.py). The same
    # view names every node (query.site, answered from the node config) before round 1: the
    # strategy samples by site name, so a resumed run with new node ids draws the same sites,
    # and the sites' processes are up before round 1's clock starts (a Ray simulation starts
    # its workers and imports the ClientApp on the first message; README "Performance").
    training_grid = TrainingGrid(grid, cfg, strategy.sites)
    extra_config = nas_phase.genotype_config(genotype)
    fed = Federation(
        training_grid, strategy, cfg, run_dir, run_uid, after_round, extra_config, events
    )
    personalization: dict[str, Any] = {}
    final: dict[str, Any] = {"federated": {}, "zero_filled": {}}
    status, error = "completed", None
    try:
        fed.run(progress)
        if fed.stopped is not None:
            log(INFO, "run %s stopped early: %s", run_dir.name, fed.stopped)
        # The model first: nothing a site sends in the final evaluation can lose it.
        _save_final_model(model, progress, cfg, run_dir, genotype)
        final["federated"], final["zero_filled"] = fed.final_evaluation(progress.arrays)
        if cfg.personalize.enabled:
            personalization = personalization_phase(
                grid,
                progress.arrays,
                cfg,
                run_uid,
                unseen=training_grid.unseen,
                sites={**training_grid.sites, **fed.sites},
                extra_config=extra_config,
            )
    except Exception as exc:
        error = exc
        status = f"failed: {type(exc).__name__}: {exc}"
        log(ERROR, "run %s stopped: %s", run_dir.name, status)
    out = results.build(
        name=run_dir.name,
        config=cfg.flat(),
        sites=_sites(progress, final),
        num_parameters=count_parameters(model),
        model_bytes=sum(a.nbytes for a in ref.values()),
        rounds=progress.rounds,
        final=final,
        total_seconds=prior_seconds + (time.perf_counter() - t_start),
        status=status,
        personalization=personalization or None,
    )
    if final["federated"]:  # the distribution over the evaluated sites (final-eval-sites)
        out["final_summary"] = results.final_summary(final["federated"], cfg.data.num_sites)
    if cfg.dp.enabled or cfg.dp.site_clip:
        out["privacy"] = privacy_summary(cfg, progress.rounds, fed.stopped)
    path = results.write(run_dir, out)
    log(INFO, "wrote %s (%s)", path, status)
    events.run_finished(
        progress.round, status, out["timings"]["total_seconds"], final, strategy.rejected
    )
    if error is not None:
        raise error
    return out


def _training_genotype(
    grid: Grid, cfg: RunConfig, run_dir: Path, t_start: float
) -> Genotype | None:
    """``model.denoiser = "nas"``: search first (``nas.search-rounds``) or read
    ``model.nas-genotype``. A failed search still leaves a ``results.json`` that says why."""
    search_grid = TrainingGrid(grid, cfg) if cfg.data.unseen_sites else grid
    try:
        return nas_phase.training_genotype(search_grid, cfg, run_dir)
    except Exception as exc:
        status = f"failed: architecture search: {type(exc).__name__}: {exc}"
        log(ERROR, "run %s stopped: %s", run_dir.name, status)
        failed = results.build(
            name=run_dir.name,
            config=cfg.flat(),
            sites=[],
            num_parameters=None,
            model_bytes=0,
            rounds=[],
            final={"federated": {}, "zero_filled": {}},
            total_seconds=time.perf_counter() - t_start,
            status=status,
        )
        results.write(run_dir, failed)
        raise


def _start(
    cfg: RunConfig, run_dir: Path, strategy: Any, ref: dict[str, np.ndarray]
) -> tuple[Progress, str]:
    """Where the rounds start, and the run's uid: the checkpoint of a resumed run (with the
    strategy state and RNG state restored), else round 0 at x_0 (``ref``)."""
    if cfg.run.resume:
        state = checkpoint.load(run_dir)
        _check_resume(state.config, cfg, run_dir)
        strategy.load_state_dict(state.strategy)
        checkpoint.set_rng_state(state.rng)
        arrays = {k: np.asarray(v) for k, v in state.arrays.items()}
        if list(arrays) != list(ref):
            raise ValueError(f"{run_dir / checkpoint.CHECKPOINT}: arrays do not match the model")
        log(INFO, "resuming %s after round %d", run_dir, state.round)
        progress = Progress(state.round, to_record(arrays), state.rounds, state.elapsed_seconds)
        return progress, state.run_uid
    if (run_dir / checkpoint.CHECKPOINT).exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; resume it (run.resume) or choose another run.name"
        )
    return Progress(0, to_record(ref)), f"{run_dir.name}-{uuid.uuid4().hex[:8]}"


def _save_final_model(
    model: torch.nn.Module,
    progress: Progress,
    cfg: RunConfig,
    run_dir: Path,
    genotype: Genotype | None,
) -> None:
    """``final_model.pt``: the global model, with the genotype file it needs if searched here."""
    model.load_state_dict(progress.arrays.to_torch_state_dict())
    model_cfg = cfg.model
    if genotype is not None and not cfg.model.nas_genotype:  # searched in this run
        genotype_path = str(run_dir / nas_phase.GENOTYPE_FILE)
        model_cfg = model_cfg.model_copy(update={"nas_genotype": genotype_path})
    save_checkpoint(
        model, model_cfg, run_dir / "final_model.pt", run_config=cfg.flat(), rounds=progress.round
    )


def _sites(progress: Progress, final: dict[str, Any]) -> list[str]:
    """Every site that trained, evaluated or took part in the final evaluation."""
    return sorted(
        {s for r in progress.rounds for s in r["train"]}
        | {s for r in progress.rounds for s in r["eval"]}
        | set(final["federated"])
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point (``serverapp = "server.app:app"``)."""
    cfg = parse_run_config(dict(context.run_config))
    run_federation(grid, cfg)


__all__ = ["app", "initial_model", "run_federation", "strategy_from_config"]

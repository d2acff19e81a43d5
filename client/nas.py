"""Site side of the architecture-search issue: risk gap, client EMA, local MiLeNAS search.

Risk gap (``fairfedavg``, GAutoMRI Eq. 9)
    ``G_c = l(global) - l(previous local)``: the received global model's mean loss on the
    site's training slices (before local training) minus the loss its own model had on the
    same slices at the end of its previous local training. The latter is kept in
    ``context.state`` (``fair.prev-loss``, tagged with the run uid); the first round a site
    takes part in (or the first after a restart) reports 0.

Client EMA (``ema.enabled``, FedAutoMRI Eq. 7)
    Our reading: the EMA is of the *received global weights*, kept per site, and the EMA
    :math:`\\omega_c^t` replaces the received model as the *starting point of local training*
    (FedAutoMRI's remedy for heterogeneity: a site starts from a smoothed global model). The
    reply is the model trained from :math:`\\omega_c^t`; evaluation messages evaluate the
    received global model unchanged. ``ema.form`` picks the variant of
    :func:`strategies.nas_maths.client_ema` (default ``adam``: bias-corrected average, a constant
    sequence stays constant). ``t`` counts this site's EMA updates. State: ``context.state``
    and ``<state path>/.fedunroll/<run uid>/ema.r<round>.npz`` (atomic), so a resumed run
    continues the average; the file of round r is read for rounds > r only.

Search (``nas.alpha`` in the train message, GAutoMRI Algorithm 1 lines 4-6)
    θ and α loaded into the search network, the training slices split into a train and a val
    part (:func:`recon.nas.split_train_val`, seeded by ``train.seed``), ``nas.search-steps``
    MiLeNAS steps, reply θ, α and ``num-examples`` = all the site's training slices (N_c).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client.state import RoundFiles
from recon.config import RunConfig
from recon.models import Unrolled, build_model
from recon.nas import Genotype, alpha_state, load_alpha_state
from recon.train import empirical_risk, milenas_train, split_train_val
from strategies import nas_maths
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    NAS_ALPHA,
    NAS_GENOTYPE,
    NUM_EXAMPLES,
    get_float,
    get_int,
    to_numpy,
    to_record,
)

FAIR_STATE = "fair.prev-loss"
EMA_ARRAYS = "ema.state"
EMA_META = "ema.meta"


# --- models -----------------------------------------------------------------------------------
def genotype_of(config: ConfigRecord) -> Genotype | None:
    """The genotype a training-phase message carries (``nas.genotype``), if any."""
    text = config.get(NAS_GENOTYPE)
    if not text:
        return None
    return Genotype.from_dict(json.loads(str(text)), where=NAS_GENOTYPE)


def build_site_model(cfg: RunConfig, config: ConfigRecord) -> Unrolled:
    """``build_model(cfg.model)``, with the derived denoiser of the message's genotype if sent."""
    return build_model(cfg.model, genotype=genotype_of(config))


def received_model(cfg: RunConfig, msg: Message, device: str) -> Unrolled:
    """The message's ``arrays`` in the network of ``cfg.model`` (with the message's genotype,
    if any), on ``device``."""
    model = build_site_model(cfg, msg.content.config_records.get(CONFIG, ConfigRecord()))
    model.load_state_dict(msg.content.array_records[ARRAYS].to_torch_state_dict(), strict=True)
    return model.to(device)


# --- risk gap ---------------------------------------------------------------------------------
def global_risk_gap(
    context_state: RecordDict, run_uid: str, model: torch.nn.Module, data: Any, cfg: RunConfig
) -> float:
    """``G_c`` of the model just received (call before local training)."""
    device = next(model.parameters()).device
    loss = empirical_risk(model, data, cfg.train.loss, device)
    meta = context_state.config_records.get(FAIR_STATE)
    prev = None
    if meta is not None and meta.get("run-uid") == run_uid:
        prev = get_float(meta, "loss")
    return nas_maths.risk_gap(loss, prev)


def keep_local_risk(
    context_state: RecordDict, run_uid: str, model: torch.nn.Module, data: Any, cfg: RunConfig
) -> float:
    """Store the locally trained model's loss on the same slices (next round's reference)."""
    device = next(model.parameters()).device
    loss = empirical_risk(model, data, cfg.train.loss, device)
    context_state.config_records[FAIR_STATE] = ConfigRecord({"run-uid": run_uid, "loss": loss})
    return loss


# --- client EMA -------------------------------------------------------------------------------
def _ema_files(state_path: Path, run_uid: str) -> RoundFiles:
    return RoundFiles(state_path, run_uid, "ema")


def _load_ema(
    state: RecordDict, state_path: Path, run_uid: str, server_round: int
) -> tuple[dict[str, np.ndarray] | None, int, int]:
    """(EMA state, t, round that wrote it) as before ``server_round``; (None, 0, 0) if none."""
    meta = state.config_records.get(EMA_META)
    if (
        meta is not None
        and meta.get("run-uid") == run_uid
        and get_int(meta, "round") < server_round
        and EMA_ARRAYS in state.array_records
    ):
        arrays = to_numpy(state.array_records[EMA_ARRAYS])
        return arrays, get_int(meta, "t"), get_int(meta, "round")
    files = _ema_files(state_path, run_uid)
    latest = files.latest_before(server_round)
    if latest is not None:
        with np.load(files.path(latest)) as z:
            arrays = {k: z[k] for k in z.files}
        t = int(arrays.pop("__t__"))
        return arrays, t, latest
    return None, 0, 0


def _save_ema(
    state: RecordDict,
    state_path: Path,
    run_uid: str,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    t: int,
    loaded_round: int,
) -> None:
    state.array_records[EMA_ARRAYS] = to_record(arrays)
    state.config_records[EMA_META] = ConfigRecord(
        {"run-uid": run_uid, "round": server_round, "t": t}
    )
    try:
        _ema_files(state_path, run_uid).save(
            server_round, {"__t__": np.asarray(t, dtype=np.int64), **arrays}, keep_from=loaded_round
        )
    except OSError:
        pass  # read-only state path: the context.state copy serves an uninterrupted run


def apply_ema(
    state: RecordDict,
    state_path: Path,
    run_uid: str,
    server_round: int,
    global_arrays: Mapping[str, np.ndarray],
    cfg: RunConfig,
) -> dict[str, np.ndarray]:
    """Update the site's EMA with the received weights; returns ω_c^t to train from."""
    prev, t, loaded = _load_ema(state, state_path, run_uid, server_round)
    if prev is not None and (
        list(prev) != list(global_arrays)
        or any(prev[k].shape != v.shape for k, v in global_arrays.items())
    ):
        prev, t = None, 0  # another model (e.g. the search phase's): start over
    new_state, omega = nas_maths.client_ema(
        prev, global_arrays, gamma=cfg.ema.gamma, t=t + 1, form=cfg.ema.form
    )
    _save_ema(state, state_path, run_uid, server_round, new_state, t + 1, loaded)
    return omega


def forget_nas_state(state: RecordDict, state_path: Path, run_uid: str) -> None:
    """Drop a finished run's EMA and risk state (context and disk)."""
    state.array_records.pop(EMA_ARRAYS, None)
    state.config_records.pop(EMA_META, None)
    state.config_records.pop(FAIR_STATE, None)
    _ema_files(state_path, run_uid).forget()


# --- search -----------------------------------------------------------------------------------
def search_train(
    msg: Message, cfg: RunConfig, data: Any, device: str, seed: int
) -> tuple[dict[str, ArrayRecord], dict[str, Any]]:
    """One site's local MiLeNAS search; returns the reply records and metrics."""
    t0 = time.perf_counter()
    model = build_model(cfg.model)
    model.load_state_dict(msg.content.array_records[ARRAYS].to_torch_state_dict(), strict=True)
    load_alpha_state(model, to_numpy(msg.content.array_records[NAS_ALPHA]))
    model.to(device)
    train_set, val_set = split_train_val(data, cfg.nas.val_fraction, cfg.train.seed)
    result = milenas_train(
        model,
        train_set,
        val_set,
        cfg.nas.search_steps or cfg.local_steps,
        lr_w=cfg.train.lr,
        lr_alpha=cfg.nas.lr_alpha,
        lam=cfg.nas.lam,
        batch_size=cfg.train.batch_size,
        loss=cfg.train.loss,
        seed=seed,
        grad_clip=cfg.train.grad_clip or None,
        device=device,
        progress=False,
    )
    records = {
        ARRAYS: ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()}),
        NAS_ALPHA: to_record(alpha_state(model)),
    }
    metrics = {
        NUM_EXAMPLES: len(data),
        "train-loss": float(np.mean(result.train_losses)),
        "train-final-loss": result.final_loss,
        "val-loss": float(np.mean(result.val_losses)),
        "steps": result.steps,
        "train-seconds": result.seconds,
        "seconds": time.perf_counter() - t0,
    }
    return records, metrics

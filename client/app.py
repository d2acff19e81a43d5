"""The hospital side: a Flower ClientApp that trains and evaluates the global model locally.

Only model arrays, Scaffold's Delta c_k and scalar metrics leave the site (records named in
:mod:`strategies.protocol`); k-space, images and coil maps never enter a reply. A site whose data
are bad replies with the kind of failure only (``data``, ``config``, ``device``, ``internal``:
:mod:`strategies.protocol`); the file and field go to the site's own log, and the federation
goes on without it.

Train message -> reply (Levac et al. 2023 Sec. 3.3, Algorithm 1):

1. load x (``arrays``) into the model, the site's training slices (cached per process); with
   ``eval.global`` in the config (``eval-mode = "piggyback"``) first evaluate x on the
   validation slices (``global-*`` metrics: the previous round's evaluation, so the model
   travels once per round);
2. ``train.local-steps`` Adam steps of :func:`recon.train.methods.local_train` with
   ``train.method`` (e2e, checkpoint, gleam, layerwise), with FedProx's proximal term
   (``fedprox.mu`` in the config) or Scaffold's gradient correction ``g - c_k + c``
   (``scaffold.c-global`` record) as hooks;
3. Scaffold: c_k is the one the server's ``scaffold.accepted`` tokens name (the site's pending
   c_k^+ if its last reply was accepted, else the c_k it had); the new c_k^+ (option (i) or
   (ii)) stays pending (``context.state`` and the site's disk) until the server accepts this
   reply (:mod:`client.control`);
4. reply ``arrays`` (y_k), ``metrics`` (``num-examples``, losses, SSIM/NRMSE/PSNR of y_k on
   the site's validation slices, seconds), ``config`` (``site-id``, ``scaffold.token``),
   ``scaffold.c-delta``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import nas, privacy
from client.control import (
    ScaffoldRound,
    accepted_tokens,
    forget_run,
    gradient_at,
    keep_pending,
    load_control,
    save_control,
)
from client.personalize import register as register_personalization
from client.site import Site, load_split, site_handler, split_key
from recon.config import RunConfig
from recon.data.sample import Slices
from recon.models import Unrolled
from recon.runtime import tune_malloc
from recon.train import TrainHooks, TrainResult, evaluate
from recon.train.methods import local_train
from recon.train.privacy import DPSGD
from strategies import maths
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    EVAL_GLOBAL,
    EVAL_SPLIT,
    FAIR_LOCAL_LOSS,
    FAIR_REPORT,
    FAIR_RISK_GAP,
    FEDPROX_MU,
    GLOBAL_PREFIX,
    METRICS,
    NAS_ALPHA,
    NUM_EXAMPLES,
    RUN_DONE,
    RUN_UID,
    SCAFFOLD_C_DELTA,
    SCAFFOLD_C_GLOBAL,
    SCAFFOLD_OPTION,
    SCAFFOLD_TOKEN,
    SERVER_ROUND,
    SITE_ID,
    get_float,
    get_int,
    get_str,
    to_numpy,
    to_record,
)

app = ClientApp()
tune_malloc()  # the ClientApp process trains: keep large tensors on the heap

_ZERO_FILLED: dict[tuple[Any, ...], dict[str, float]] = {}


def round_seed(base: int, server_round: int, site_id: str) -> int:
    """Seed of one site's local training in one round: reproducible, so resume is exact."""
    return zlib.crc32(f"{base}/{server_round}/{site_id}".encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class _Round:
    """One round of one run at one site: what the site's own state (``context.state`` and its
    round-tagged files) is keyed by."""

    state: RecordDict
    site: Site
    run_uid: str
    server_round: int


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(CONFIG, ConfigRecord())


def _state_record(model: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def _reply(msg: Message, site: Site, metrics: dict[str, Any], **arrays: ArrayRecord) -> Message:
    content = RecordDict(
        {
            **arrays,
            METRICS: MetricRecord(metrics),
            CONFIG: ConfigRecord({SITE_ID: site.site_id}),
        }
    )
    return Message(content, reply_to=msg)


# --- training -------------------------------------------------------------------------------
@app.train()
@site_handler
def train_handler(msg: Message, context: Context, cfg: RunConfig, site: Site) -> Message:
    """Local training of the received global model; see the module docstring."""
    t0 = time.perf_counter()
    config = _config(msg)
    server_round = get_int(config, SERVER_ROUND, 1)
    data = load_split(site, cfg, "train")
    seed = round_seed(cfg.train.seed, server_round, site.site_id)
    if NAS_ALPHA in msg.content.array_records:  # search phase (client/nas.py)
        records, search_metrics = nas.search_train(msg, cfg, data, site.device, seed)
        return _reply(msg, site, search_metrics, **records)
    rnd = _Round(context.state, site, get_str(config, RUN_UID, "run"), server_round)
    fair = bool(config.get(FAIR_REPORT))  # fairfedavg (GAutoMRI Eq. 9-11)
    metrics: dict[str, Any] = {}

    model = nas.received_model(cfg, msg, site.device)
    if config.get(EVAL_GLOBAL):  # eval-mode piggyback: the received global model, on val
        metrics.update(_evaluate_global(model, site, cfg))
    if fair:  # G_c of the received model (GAutoMRI Eq. 9)
        metrics[FAIR_RISK_GAP] = nas.global_risk_gap(rnd.state, rnd.run_uid, model, data, cfg)
    if cfg.ema.enabled:
        _start_from_ema(model, rnd, cfg)
    x = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the start point
    scaffold = _scaffold_round(msg, cfg, rnd, model, data)
    hooks = TrainHooks(
        regularizer=_proximal(x, get_float(config, FEDPROX_MU, 0.0)),
        after_backward=scaffold.after_backward if scaffold is not None else None,
    )
    dp, dp_metrics = privacy.dp_round(cfg, len(data), server_round)  # README "Privacy"
    result = _local_train(cfg, site, model, data, seed, hooks, dp)
    extra: dict[str, ArrayRecord] = {}
    token = None
    if scaffold is not None:
        extra[SCAFFOLD_C_DELTA], token = _end_scaffold(scaffold, rnd, x, cfg)
    if fair:  # this round's local loss: next round's reference
        metrics[FAIR_LOCAL_LOSS] = nas.keep_local_risk(rnd.state, rnd.run_uid, model, data, cfg)

    metrics.update(privacy.releasable(_train_metrics(result, len(data)), dp), **dp_metrics)
    metrics.update(evaluate(model, load_split(site, cfg, "val"), site.device).as_dict())
    metrics.update({"train-seconds": result.seconds, "seconds": time.perf_counter() - t0})
    reply = _reply(msg, site, metrics, **{ARRAYS: _state_record(model)}, **extra)
    if token is not None:  # the server's acknowledgement names c_k^+ by it
        reply.content.config_records[CONFIG][SCAFFOLD_TOKEN] = token
    return reply


def _evaluate_global(model: Unrolled, site: Site, cfg: RunConfig) -> dict[str, Any]:
    """The received global model's metrics on the site's validation slices, under the train
    reply's ``global-*`` keys: what a separate evaluate message of the previous round would
    have reported, without shipping the model a second time."""
    val = load_split(site, cfg, "val")
    result = evaluate(model, val, site.device).as_dict(GLOBAL_PREFIX)
    return {**result, GLOBAL_PREFIX + NUM_EXAMPLES: len(val)}


def _start_from_ema(model: Unrolled, rnd: _Round, cfg: RunConfig) -> None:
    """Start from the site's EMA of the received global weights (FedAutoMRI Eq. 7)."""
    received = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    omega = nas.apply_ema(
        rnd.state, rnd.site.state_path, rnd.run_uid, rnd.server_round, received, cfg
    )
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in omega.items()})


def _proximal(
    x: dict[str, torch.Tensor], mu: float
) -> Callable[[torch.nn.Module], torch.Tensor] | None:
    """FedProx's (mu/2) ||w - x||^2 (Li et al. 2020, eq. 2) as a loss term; None for mu = 0."""
    if mu <= 0:
        return None

    def regularizer(m: torch.nn.Module) -> torch.Tensor:
        return maths.proximal_term(dict(m.named_parameters()), x, mu)

    return regularizer


def _scaffold_round(
    msg: Message, cfg: RunConfig, rnd: _Round, model: Unrolled, data: Slices
) -> ScaffoldRound | None:
    """Scaffold's correction for this round when the message carries c (``scaffold.c-global``):
    this site's committed c_k (resolved with the server's ``scaffold.accepted``) and, for
    option (i), g_k(x)."""
    if SCAFFOLD_C_GLOBAL not in msg.content.array_records:
        return None
    config = _config(msg)
    option = get_str(config, SCAFFOLD_OPTION, cfg.scaffold.option)
    accepted = accepted_tokens(config)
    c_global = to_numpy(msg.content.array_records[SCAFFOLD_C_GLOBAL])
    c_local, loaded_round = load_control(
        rnd.state, rnd.site.state_path, rnd.run_uid, rnd.server_round, c_global, accepted
    )
    grad_x = None
    if option == "i":
        slices, device = cfg.scaffold.grad_slices, rnd.site.device
        grad_x = gradient_at(model, data, cfg.train.loss, slices, c_global, device)
    acknowledged = accepted is not None
    return ScaffoldRound(model, option, c_global, c_local, grad_x, loaded_round, acknowledged)


def _end_scaffold(
    scaffold: ScaffoldRound, rnd: _Round, x: dict[str, torch.Tensor], cfg: RunConfig
) -> tuple[ArrayRecord, str | None]:
    """Delta c_k for the reply and the token of c_k^+, kept pending at the site (state and
    disk) until the server accepts the reply; a server that does not acknowledge
    (``scaffold.accepted`` absent) gets no token and c_k^+ is committed at once."""
    x_np = {k: v.cpu().numpy() for k, v in x.items()}
    c_new, c_delta = scaffold.control_update(x_np, cfg.local_steps, cfg.train.lr)
    where = (rnd.state, rnd.site.state_path, rnd.run_uid, rnd.server_round, c_new)
    token = None
    if scaffold.acknowledged:
        token = keep_pending(*where, scaffold.loaded_round)
    else:
        save_control(*where, scaffold.loaded_round)
    return to_record(c_delta), token


def _local_train(
    cfg: RunConfig,
    site: Site,
    model: Unrolled,
    data: Slices,
    seed: int,
    hooks: TrainHooks,
    dp: DPSGD | None = None,
) -> TrainResult:
    """``train.local-steps`` steps of ``train.method`` with this round's seed (DP-SGD with
    ``dp``)."""
    train_cfg = cfg.train.model_copy(update={"steps": cfg.local_steps, "seed": seed})
    options = cfg.method_options(site.gleam_devices)  # P-GLEAM over the site's GPUs, if set
    return local_train(
        cfg.train.method, model, data, train_cfg, site.device, hooks, False, dp, **options
    )


def _train_metrics(result: TrainResult, num_examples: int) -> dict[str, Any]:
    return {
        NUM_EXAMPLES: num_examples,
        "train-loss": result.mean_loss,
        "train-final-loss": result.final_loss,
        "steps": result.steps,
    }


# --- evaluation -----------------------------------------------------------------------------
@app.evaluate()
@site_handler
def evaluate_handler(msg: Message, context: Context, cfg: RunConfig, site: Site) -> Message:
    """SSIM / NRMSE / PSNR of the received model (and of zero-filled) on the site's slices."""
    t0 = time.perf_counter()
    config = _config(msg)
    split = get_str(config, EVAL_SPLIT, "val")
    if split not in ("val", "test"):
        raise ValueError(f"config {EVAL_SPLIT!r}: expected 'val' or 'test', got {split!r}")
    data = load_split(site, cfg, split)
    model = nas.received_model(cfg, msg, site.device)
    if NAS_ALPHA in msg.content.array_records:  # search phase: the supernet with global α
        nas.load_alpha_state(model, to_numpy(msg.content.array_records[NAS_ALPHA]))
    result = evaluate(model, data, site.device)
    zf_key = split_key(site, cfg, split)
    if zf_key not in _ZERO_FILLED:
        _ZERO_FILLED[zf_key] = evaluate(None, data, site.device).as_dict("zf-")
    metrics = {
        NUM_EXAMPLES: len(data),
        **result.as_dict(),
        **_ZERO_FILLED[zf_key],
        "seconds": time.perf_counter() - t0,
    }
    if config.get(RUN_DONE):
        run_uid = get_str(config, RUN_UID, "run")
        forget_run(context.state, site.state_path, run_uid)
        nas.forget_nas_state(context.state, site.state_path, run_uid)
    return _reply(msg, site, metrics)


# Personalization phase: ``query.site``, ``train.personalize`` (client/personalize.py).
register_personalization(app)

"""The hospital side: a Flower ClientApp that trains and evaluates the global model locally.

Only model arrays, Scaffold's Delta c_k and scalar metrics leave the site (records named in
:mod:`strategies.protocol`); k-space, images and coil maps never enter a reply. A site whose data
are bad replies with an error naming the file and field; the federation goes on without it.

Train message -> reply (Levac et al. 2023 Sec. 3.3, Algorithm 1):

1. load x (``arrays``) into the model, the site's training slices (cached per process);
2. ``train.local-steps`` Adam steps of :func:`recon.train.methods.local_train` with
   ``train.method`` (e2e, checkpoint, gleam, layerwise), with FedProx's proximal term
   (``fedprox.mu`` in the config) or Scaffold's gradient correction ``g - c_k + c``
   (``scaffold.c-global`` record) as hooks;
3. Scaffold: new c_k (option (i) or (ii)), kept in ``context.state`` and on the site's disk;
4. reply ``arrays`` (y_k), ``metrics`` (``num-examples``, losses, SSIM/NRMSE/PSNR of y_k on
   the site's validation slices, seconds), ``config`` (``site-id``), ``scaffold.c-delta``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import nas
from client.control import forget_run, load_control, save_control
from client.site import Site, error_reply, load_split, resolve_site, site_label, split_key
from recon.config import RunConfig, parse_run_config
from recon.data.sample import collate
from recon.models import Unrolled
from recon.runtime import tune_malloc
from recon.train import TrainHooks, evaluate, get_loss
from recon.train.methods import local_train
from strategies import maths
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    EVAL_SPLIT,
    FAIR_LOCAL_LOSS,
    FAIR_REPORT,
    FAIR_RISK_GAP,
    FEDPROX_MU,
    METRICS,
    NAS_ALPHA,
    NUM_EXAMPLES,
    RUN_DONE,
    RUN_UID,
    SCAFFOLD_C_DELTA,
    SCAFFOLD_C_GLOBAL,
    SCAFFOLD_OPTION,
    SERVER_ROUND,
    SITE_ID,
    to_numpy,
    to_record,
)

app = ClientApp()
tune_malloc()  # the ClientApp process trains: keep large tensors on the heap

_ZERO_FILLED: dict[tuple[Any, ...], dict[str, float]] = {}


def round_seed(base: int, server_round: int, site_id: str) -> int:
    """Seed of one site's local training in one round: reproducible, so resume is exact."""
    return zlib.crc32(f"{base}/{server_round}/{site_id}".encode()) & 0x7FFFFFFF


def _setup(context: Context) -> tuple[RunConfig, Site]:
    torch.set_num_threads(1)  # clients share the cores; 1 thread each is fastest (notes)
    cfg = parse_run_config(dict(context.run_config))
    return cfg, resolve_site(dict(context.node_config), cfg)


def _load_model(
    cfg: RunConfig, record: ArrayRecord, device: str, config: ConfigRecord | None = None
) -> Unrolled:
    # a searched denoiser's genotype travels in the message (client/nas.py)
    model = nas.build_site_model(cfg, config or ConfigRecord())
    model.load_state_dict(record.to_torch_state_dict(), strict=True)
    return model.to(device)


def _state_record(model: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def _summary(result: Mapping[str, object], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(result[k]) for k in ("ssim", "nrmse", "psnr")}  # type: ignore[arg-type]


def _reply(msg: Message, site: Site, metrics: dict[str, Any], **arrays: ArrayRecord) -> Message:
    content = RecordDict(
        {
            **arrays,
            METRICS: MetricRecord(metrics),
            CONFIG: ConfigRecord({SITE_ID: site.site_id}),
        }
    )
    return Message(content, reply_to=msg)


def _gradient_at(
    model: Unrolled, data: Any, cfg: RunConfig, reference: Mapping[str, np.ndarray], device: str
) -> dict[str, np.ndarray]:
    """g_k(x): the mean loss gradient over the first ``scaffold.grad-slices`` slices at x.

    Keyed like ``reference`` (c); arrays without a gradient (buffers) get zeros.
    """
    loss_fn = get_loss(cfg.train.loss)
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    n = min(cfg.scaffold.grad_slices, len(data))
    for i in range(n):
        sample = collate([data[i]]).to(device)
        physics = sample.physics()
        (loss_fn(model(sample.kspace, physics), sample, physics) / n).backward()  # type: ignore[arg-type]
    out = {}
    for k, ref in reference.items():
        grad = params[k].grad if k in params else None
        out[k] = np.zeros_like(ref) if grad is None else grad.detach().cpu().numpy()
    model.zero_grad(set_to_none=True)
    return out


def _scaffold_hook(
    model: Unrolled, c_global: Mapping[str, np.ndarray], c_local: Mapping[str, np.ndarray]
) -> tuple[Callable[[torch.nn.Module], None], dict[str, torch.Tensor], dict[str, int]]:
    """``after_backward`` adding ``c - c_k`` to the gradients (Levac et al. 2023 Alg. 1 line 6).

    Only parameters that have a gradient in this backward pass are corrected: GLEAM and
    layer-wise training call the hook once per module / block with the other ``.grad`` left
    ``None``, and frozen parameters (GLEAM's data-consistency weights) never have one. Also sums
    the corrected gradients and counts, per parameter, the backward passes it took part in;
    option (ii) is computed from both.
    """
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    corr = {
        k: torch.as_tensor(np.asarray(c_global[k] - c_local[k])).to(device)
        for k in c_global
        if k in params
    }
    grad_sum = {k: torch.zeros_like(params[k]) for k in corr}
    counts = dict.fromkeys(corr, 0)

    def after_backward(_: torch.nn.Module) -> None:
        for k, d in corr.items():
            p = params[k]
            if p.grad is None:  # not trained by this backward pass (other module, frozen)
                continue
            p.grad.add_(d.to(p.grad.device))
            grad_sum[k].add_(p.grad.to(grad_sum[k].device))
            counts[k] += 1

    return after_backward, grad_sum, counts


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Local training of the received global model; see the module docstring."""
    site_name = site_label(context)
    try:
        cfg, site = _setup(context)
        site_name = site.site_id
        return _train(msg, context, cfg, site)
    except Exception as exc:  # a site's failure is its reply, never a crash of the federation
        return error_reply(msg, site_name, exc)


def _train(msg: Message, context: Context, cfg: RunConfig, site: Site) -> Message:
    t0 = time.perf_counter()
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    server_round = int(config.get(SERVER_ROUND, 1))  # type: ignore[arg-type]
    run_uid = str(config.get(RUN_UID, "run"))
    data = load_split(site, cfg, "train")
    seed = round_seed(cfg.train.seed, server_round, site.site_id)
    if NAS_ALPHA in msg.content.array_records:  # search phase (client/nas.py)
        records, search_metrics = nas.search_train(msg, cfg, data, site.device, seed)
        return _reply(msg, site, search_metrics, **records)
    model = _load_model(cfg, msg.content[ARRAYS], site.device, config)  # type: ignore[arg-type]
    fair_metrics: dict[str, float] = {}
    if config.get(FAIR_REPORT):  # fairfedavg: G_c of the received model (GAutoMRI Eq. 9)
        fair_metrics[FAIR_RISK_GAP] = nas.global_risk_gap(context.state, run_uid, model, data, cfg)
    if cfg.ema.enabled:  # start from the site's EMA of the global weights (FedAutoMRI Eq. 7)
        received = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        omega = nas.apply_ema(context.state, site.state_path, run_uid, server_round, received, cfg)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in omega.items()})
    x = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the start point
    hooks = TrainHooks()

    mu = float(config.get(FEDPROX_MU, 0.0))  # type: ignore[arg-type]
    if mu > 0:  # FedProx (Li et al. 2020, eq. 2)

        def regularizer(m: torch.nn.Module) -> torch.Tensor:
            return maths.proximal_term(dict(m.named_parameters()), x, mu)

        hooks.regularizer = regularizer

    scaffold = SCAFFOLD_C_GLOBAL in msg.content.array_records
    extra: dict[str, ArrayRecord] = {}
    if scaffold:
        option = str(config.get(SCAFFOLD_OPTION, cfg.scaffold.option))
        c_global = to_numpy(msg.content.array_records[SCAFFOLD_C_GLOBAL])
        c_local, loaded_round = load_control(
            context.state, site.state_path, run_uid, server_round, c_global
        )
        grad_x = _gradient_at(model, data, cfg, c_global, site.device) if option == "i" else None
        hooks.after_backward, grad_sum, counts = _scaffold_hook(model, c_global, c_local)

    steps = cfg.local_steps
    train_cfg = cfg.train.model_copy(update={"steps": steps, "seed": seed})
    options = cfg.method_options(site.gleam_devices)  # P-GLEAM over the site's GPUs, if set
    result = local_train(
        cfg.train.method, model, data, train_cfg, site.device, hooks, False, **options
    )

    if scaffold:
        lr = cfg.train.lr
        x_np = {k: v.cpu().numpy() for k, v in x.items()}
        # Alg. 1 line 7 (ii) is c_k - c + (x - y_k) / (K eta_l). With plain SGD,
        # (x - y_k) / (K eta_l) is exactly the mean corrected gradient; with Adam (the paper's
        # local optimiser) the displacement is rescaled per coordinate, so we pass the
        # displacement SGD would have made: y_sgd = x - eta_l * sum of corrected gradients.
        # GLEAM / layer-wise train each parameter in only n_k of the K steps (a layer-wise
        # block for K / blocks steps): the sum is scaled by K / n_k, so the mean is over the
        # steps the parameter was trained in and c_k^+ is the mean of its own gradients.
        y_sgd = {
            k: np.asarray(x_np[k] - lr * (steps / counts[k]) * g.cpu().numpy())
            for k, g in grad_sum.items()
            if counts[k]
        }
        c_new, c_delta = maths.scaffold_client_control_update(
            option,
            c_local=c_local,
            c_global=c_global,
            x_global=x_np,
            y_local={**x_np, **y_sgd},
            local_steps=steps,
            lr=lr,
            grad_at_global=grad_x,
        )
        # A parameter that got no gradient in any step (frozen by the method, e.g. GLEAM's
        # data-consistency weights) was not corrected and says nothing about this site's
        # drift: its c_k stays as it was and Delta c_k = 0, for both options (option (ii) would
        # otherwise give c_k - c, and option (i) a gradient of a parameter that never moves).
        for k in c_new:
            if counts.get(k, 0) == 0:
                c_new[k] = np.array(c_local[k], copy=True)
                c_delta[k] = np.zeros_like(c_delta[k])
        save_control(context.state, site.state_path, run_uid, server_round, c_new, loaded_round)
        extra[SCAFFOLD_C_DELTA] = to_record(c_delta)

    if config.get(FAIR_REPORT):  # this round's local loss: next round's reference
        fair_metrics[FAIR_LOCAL_LOSS] = nas.keep_local_risk(
            context.state, run_uid, model, data, cfg
        )
    val = evaluate(model, load_split(site, cfg, "val"), site.device)
    metrics = {
        **fair_metrics,
        NUM_EXAMPLES: len(data),
        "train-loss": result.mean_loss,
        "train-final-loss": result.final_loss,
        "steps": result.steps,
        **_summary(val),
        "train-seconds": result.seconds,
        "seconds": time.perf_counter() - t0,
    }
    return _reply(msg, site, metrics, **{ARRAYS: _state_record(model)}, **extra)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """SSIM / NRMSE / PSNR of the received model (and of zero-filled) on the site's slices."""
    site_name = site_label(context)
    try:
        cfg, site = _setup(context)
        site_name = site.site_id
        t0 = time.perf_counter()
        config = msg.content.config_records.get(CONFIG, ConfigRecord())
        split = str(config.get(EVAL_SPLIT, "val"))
        if split not in ("val", "test"):
            raise ValueError(f"config {EVAL_SPLIT!r}: expected 'val' or 'test', got {split!r}")
        data = load_split(site, cfg, split)
        model = _load_model(cfg, msg.content[ARRAYS], site.device, config)  # type: ignore[arg-type]
        if NAS_ALPHA in msg.content.array_records:  # search phase: the supernet with global α
            nas.load_alpha_state(model, to_numpy(msg.content.array_records[NAS_ALPHA]))
        result = evaluate(model, data, site.device)
        zf_key = split_key(site, cfg, split)
        if zf_key not in _ZERO_FILLED:
            _ZERO_FILLED[zf_key] = _summary(evaluate(None, data, site.device), "zf-")
        metrics = {
            NUM_EXAMPLES: len(data),
            **_summary(result),
            **_ZERO_FILLED[zf_key],
            "seconds": time.perf_counter() - t0,
        }
        if config.get(RUN_DONE):
            run_uid = str(config.get(RUN_UID, "run"))
            forget_run(context.state, site.state_path, run_uid)
            nas.forget_nas_state(context.state, site.state_path, run_uid)
        return _reply(msg, site, metrics)
    except Exception as exc:
        return error_reply(msg, site_name, exc)


# Personalization phase (issue 5): ``query.site``, ``train.personalize`` (client/personalize.py).
from client.personalize import register as _register_personalization  # noqa: E402

_register_personalization(app)

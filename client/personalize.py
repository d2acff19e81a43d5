"""The hospital side of the personalization phase (issue 5; Levac et al. 2023 Sec. 3.4 and 4.3).

Two extra ClientApp actions, registered on :data:`client.app.app`:

``query.site`` -> which site this node serves and whether it is held out of training
    (``unseen``: in simulation a partition id >= ``data.num-sites``; in deployment the node
    config ``unseen=true``). The server asks once per node when ``data.unseen-sites`` > 0 and
    never sends a train or evaluate message to an unseen node.

``train.personalize`` -> :func:`recon.train.personalize.personalize` of the received final
    global model on the site's training slices (k-fold CV for r_fine / N_fine, early stopping,
    the low-data guard), with the site's test slices for the before/after metrics. The
    personalized weights and the full report stay at the site::

        <state path>/.fedunroll/personalized_model.pt   (recon.models.checkpoint format)
        <state path>/.fedunroll/personalization.json    (grid, CV curves, decision, metrics)

    The reply carries scalar metrics only (no ArrayRecord): ``before-ssim`` / ``-nrmse`` /
    ``-psnr``, ``after-*``, ``r-fine`` (0 when the global model is kept), ``n-fine``,
    ``fine-tune`` (0/1), ``cv-ssim-global``, ``cv-ssim-best``, ``num-examples``, ``seconds``.
"""

from __future__ import annotations

import math
import time
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log

from client.nas import genotype_of, received_model
from client.site import Site, load_split, site_handler
from recon.config import RunConfig
from recon.fileio import atomic_write_json
from recon.models import Unrolled
from recon.models.checkpoint import save_checkpoint
from recon.train.personalize import PersonalizeConfig, personalize
from strategies.protocol import (
    CONFIG,
    METRIC_KEYS,
    METRICS,
    NUM_EXAMPLES,
    P_FOLDS,
    P_LRS,
    P_MAX_EPOCHS,
    P_MIN_GAIN,
    P_PATIENCE,
    PERSONALIZE,
    SITE_ID,
    SITE_QUERY,
    UNSEEN,
    get_float,
    get_int,
    get_str,
)

MODEL_FILE = "personalized_model.pt"
REPORT_FILE = "personalization.json"
GENOTYPE_FILE = "personalized_genotype.json"  # NAS runs: the derived denoiser of the model


def is_unseen(node_config: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether this node serves a site held out of training.

    Deployment: node config ``unseen=true`` (or ``"true"``/``1``). Simulation: partition id
    ``>= data.num-sites`` (``fedunroll simulate`` starts ``num-sites + unseen-sites`` nodes).
    """
    if UNSEEN in node_config:
        value = node_config[UNSEEN]
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes")
        return bool(value)
    if "data-path" not in node_config and "partition-id" in node_config:
        return get_int(node_config, "partition-id") >= cfg.data.num_sites
    return False


def personalize_config(cfg: RunConfig, config: ConfigRecord) -> PersonalizeConfig:
    """The CV grid the server sent (falling back to the run config), with the training loss."""
    p = cfg.personalize
    lrs = get_str(config, P_LRS, p.lrs)
    return PersonalizeConfig(
        lrs=tuple(float(v) for v in lrs.split(",") if v.strip()),
        max_epochs=get_int(config, P_MAX_EPOCHS, p.max_epochs),
        folds=get_int(config, P_FOLDS, p.folds),
        patience=get_int(config, P_PATIENCE, p.patience),
        min_gain=get_float(config, P_MIN_GAIN, p.min_gain),
        loss=cfg.train.loss,
        seed=cfg.train.seed,
    )


def _site_query(msg: Message, context: Context, cfg: RunConfig, site: Site) -> Message:
    """``query.site``: ``config = {site-id, unseen}``; nothing else (a lazy synthetic site is
    not written for it)."""
    unseen = is_unseen(dict(context.node_config), cfg)
    content = RecordDict({CONFIG: ConfigRecord({SITE_ID: site.site_id, UNSEEN: unseen})})
    return Message(content, reply_to=msg)


site_query_handler = site_handler(_site_query, materialize=False)


@site_handler
def personalize_handler(msg: Message, context: Context, cfg: RunConfig, site: Site) -> Message:
    """``train.personalize``: fine-tune locally, keep the weights, reply the metrics only."""
    t0 = time.perf_counter()
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    p_cfg = personalize_config(cfg, config)
    model = received_model(cfg, msg, site.device)  # a searched genotype travels in the config
    train_set = load_split(site, cfg, "train")
    test_set = load_split(site, cfg, "test")
    tuned, report = personalize(
        model, train_set, p_cfg, site.device, test_set=test_set, progress=False
    )
    path = _keep_at_site(site, cfg, config, tuned, report)
    log(INFO, "site %s: %s; kept at %s", site.site_id, report["decision"], path)
    metrics = _reply_metrics(report, len(train_set), time.perf_counter() - t0)
    content = RecordDict(
        {METRICS: MetricRecord(metrics), CONFIG: ConfigRecord({SITE_ID: site.site_id})}
    )
    return Message(content, reply_to=msg)


def _keep_at_site(
    site: Site, cfg: RunConfig, config: ConfigRecord, tuned: Unrolled, report: dict[str, Any]
) -> Path:
    """Write the personalized weights and the full report under the site's state path."""
    folder = Path(site.state_path) / ".fedunroll"
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = cfg.model
    genotype = genotype_of(config)
    if genotype is not None:  # a searched denoiser: the checkpoint must name its genotype
        path = genotype.save(folder / GENOTYPE_FILE)
        model_cfg = model_cfg.model_copy(update={"nas_genotype": str(path)})
    save_checkpoint(
        tuned,
        model_cfg,
        folder / MODEL_FILE,
        site=site.site_id,
        personalization={k: report[k] for k in ("r_fine", "n_fine", "fine_tune", "decision")},
    )
    atomic_write_json(folder / REPORT_FILE, {"site": site.site_id, **report})
    return folder / MODEL_FILE


def _reply_metrics(report: dict[str, Any], num_examples: int, seconds: float) -> dict[str, Any]:
    """The scalar metrics of the reply (non-finite values left out)."""
    metrics: dict[str, Any] = {
        NUM_EXAMPLES: num_examples,
        **{f"before-{k}": float(report["before"][k]) for k in METRIC_KEYS},
        **{f"after-{k}": float(report["after"][k]) for k in METRIC_KEYS},
        "r-fine": float(report["r_fine"] or 0.0),
        "n-fine": int(report["n_fine"]),
        "fine-tune": int(bool(report["fine_tune"])),
        "cv-ssim-global": float(report["cv_ssim_global"]),
        "cv-ssim-best": float(report["cv_ssim_best"]),
        "seconds": seconds,
    }
    return {k: v for k, v in metrics.items() if not isinstance(v, float) or math.isfinite(v)}


def register(app: Any) -> None:
    """Add both actions to a :class:`flwr.clientapp.ClientApp`."""
    app.query("site")(site_query_handler)
    app.train("personalize")(personalize_handler)


__all__ = [
    "PERSONALIZE",
    "SITE_QUERY",
    "UNSEEN",
    "is_unseen",
    "personalize_config",
    "personalize_handler",
    "register",
    "site_query_handler",
]

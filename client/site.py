"""Which site a ClientApp serves, and its slices (loaded once per process).

Deployment: ``flower-supernode --node-config 'data-path="/data/site0" site-id="a" device="cuda"'``.
Simulation: ``partition-id`` ``k`` maps to ``<data.root>/site{k}`` of the run config (a lazy
synthetic site, :mod:`recon.data.lazy`, is written there the first time it is needed).
Either way ``state-path="/var/lib/fedunroll/a"`` puts the site's own state (Scaffold's c_k
files) in a writable folder, so the data may be mounted read-only; it defaults to the data path.
"""

from __future__ import annotations

import functools
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from logging import ERROR
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message
from flwr.common import log
from flwr.common.constant import ErrorCode

from recon import runtime
from recon.config import ConfigError, RunConfig, parse_run_config
from recon.data.dataset import SiteDataset
from recon.data.h5io import DataError
from recon.data.lazy import PLAN, ensure_site
from strategies.protocol import (
    ERROR_CONFIG,
    ERROR_DATA,
    ERROR_DEVICE,
    ERROR_INTERNAL,
    ReplyError,
    check_site_name,
    error_reason,
    get_int,
)

# (site path, split, SiteDataset kwargs) -> dataset. Sites are small and a ClientApp process
# serves one or a few sites for a whole run: never re-read h5 every round. In a simulation of
# many sites one worker process serves any sampled site: the least recently used splits beyond
# MAX_CACHED_SPLITS are dropped, so a worker's memory does not grow with the sites it has seen.
_DATASETS: OrderedDict[tuple[Any, ...], SiteDataset] = OrderedDict()
MAX_CACHED_SPLITS = 64
_LOCK = threading.Lock()


class SiteError(ValueError):
    """The node configuration does not describe a usable site."""


class DeviceError(SiteError):
    """The node's torch device is not there (or not usable)."""


@dataclass(frozen=True)
class Site:
    """One hospital: a readable id, its data folder, the torch device it trains on, the
    writable folder of its per-site state (``state_dir``; ``None``: the data folder) and, for
    ``train.method = "gleam"``, the devices its modules are spread over (P-GLEAM; empty: all on
    ``device``)."""

    site_id: str
    path: Path
    device: str
    state_dir: Path | None = None
    gleam_devices: tuple[str, ...] = ()

    @property
    def state_path(self) -> Path:
        """Where the site's own state goes: ``state_dir``, else the data folder."""
        return self.path if self.state_dir is None else self.state_dir


def resolve_device(name: str) -> str:
    """:func:`recon.runtime.resolve_device`, failing with a :class:`SiteError` (this node)."""
    try:
        return runtime.resolve_device(name)
    except ValueError as err:
        raise DeviceError(f"{err} on this node") from None


def site_label(context: Context) -> str:
    """How a node is named in logs and error replies before its site is resolved."""
    nc = context.node_config
    return str(nc.get("site-id", nc.get("partition-id", "?")))


def error_kind(exc: BaseException) -> str:
    """What kind of failure ``exc`` is, in the protocol's vocabulary
    (:data:`strategies.protocol.ERROR_KINDS`)."""
    if isinstance(exc, DataError):
        return ERROR_DATA
    if isinstance(exc, DeviceError | torch.cuda.OutOfMemoryError):
        return ERROR_DEVICE
    if isinstance(exc, SiteError | ConfigError | ValueError | KeyError):
        return ERROR_CONFIG  # node config, run config, or an entry of the message
    return ERROR_INTERNAL


def error_reply(msg: Message, site: str, exc: BaseException) -> Message:
    """A site's failure as its reply, never a crash of the federation.

    The full message and traceback (file names, fields) go to the site's own log; the reply
    says only what kind of failure it was (:func:`error_kind`): file names can carry patient
    identifiers and never leave the hospital.
    """
    kind = error_kind(exc)
    log(
        ERROR,
        "site %s: %s failed (%s error; the server is told only the kind):\n%s",
        site,
        msg.metadata.message_type,
        kind,
        traceback.format_exc(),
    )
    try:  # the site's name, if it is one (a site failing from its first message is still named)
        name: str | None = check_site_name(site)
    except ReplyError:
        name = None
    reason = error_reason(kind, name)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def setup(context: Context, materialize: bool = True) -> tuple[RunConfig, Site]:
    """The run config and this node's site: where every ClientApp handler starts."""
    torch.set_num_threads(1)  # clients share the cores; 1 thread each is fastest (notes)
    cfg = parse_run_config(dict(context.run_config))
    return cfg, resolve_site(dict(context.node_config), cfg, materialize)


Handler = Callable[[Message, Context], Message]


def site_handler(
    body: Callable[[Message, Context, RunConfig, Site], Message], *, materialize: bool = True
) -> Handler:
    """A ClientApp handler from ``body(msg, context, cfg, site)``: :func:`setup` first, and any
    exception becomes this site's error reply (:func:`error_reply`: its kind only), never a
    crash of the federation. ``materialize=False``: a lazy synthetic site is not written for
    this message (it only needs the site's name)."""

    @functools.wraps(body)
    def handler(msg: Message, context: Context) -> Message:
        name = site_label(context)
        try:
            cfg, site = setup(context, materialize=materialize)
            name = site.site_id
            return body(msg, context, cfg, site)
        except Exception as exc:  # a site's failure is its reply
            return error_reply(msg, name, exc)

    return handler


def resolve_site(node_config: dict[str, Any], cfg: RunConfig, materialize: bool = True) -> Site:
    """The site of this node from its node config (deployment) or partition id (simulation).

    ``materialize=False``: a lazy synthetic site that is not written yet stays unwritten (the
    returned site's folder does not exist then)."""
    device = resolve_device(str(node_config.get("device", cfg.run.device)))
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"])).expanduser()
        site_id = str(node_config.get("site-id") or path.name)
    elif "partition-id" in node_config:
        pid = get_int(node_config, "partition-id")
        path = Path(cfg.data.root).expanduser() / f"site{pid}"
        site_id = str(node_config.get("site-id") or f"site{pid}")
        if not path.is_dir():  # a lazy synthetic site: written the first time it is needed
            if not materialize and (path.parent / PLAN).is_file():
                return Site(site_id, path, device, path, ())
            ensure_site(path.parent, pid)
    else:
        raise SiteError(
            "node config has neither 'data-path' (deployment: flower-supernode --node-config "
            "'data-path=\"/data/site0\"') nor 'partition-id' (simulation)"
        )
    if not path.is_dir():
        raise DataError(path, "data-path", "is not a directory (is the site's data mounted?)")
    state = node_config.get("state-path")
    state_path = Path(str(state)).expanduser() if state else path
    if state_path.exists() and not state_path.is_dir():
        raise SiteError(f"state-path {str(state_path)!r} exists and is not a directory")
    gleam_devices = parse_devices(node_config.get("gleam-devices"))
    return Site(site_id, path, device, state_path, gleam_devices)


def parse_devices(value: object) -> tuple[str, ...]:
    """Node config ``gleam-devices="cuda:0,cuda:1"``: where a site's GLEAM modules run.

    A hospital whose GPUs are each too small for the model spreads the modules over them
    (GLEAM Alg. 2, module ``m`` on ``devices[m % D]``); every entry is checked like
    ``device``.
    """
    if value is None or not str(value).strip():
        return ()
    names = [d.strip() for d in str(value).replace(" ", ",").split(",") if d.strip()]
    return tuple(resolve_device(d) for d in names)


def split_key(site: Site, cfg: RunConfig, split: str) -> tuple[Any, ...]:
    """What identifies the slices of :func:`load_split` (site, split, dataset kwargs): the key
    of per-process caches of anything computed from them."""
    return (str(site.path.resolve()), split, tuple(sorted(cfg.data.split_kwargs(split).items())))


def load_split(site: Site, cfg: RunConfig, split: str) -> SiteDataset:
    """The site's ``split`` as a :class:`SiteDataset`, cached for the life of the process."""
    key = split_key(site, cfg, split)
    with _LOCK:
        if key not in _DATASETS:
            _DATASETS[key] = SiteDataset(site.path, split=split, **cfg.data.split_kwargs(split))
            while len(_DATASETS) > MAX_CACHED_SPLITS:
                _DATASETS.popitem(last=False)
        _DATASETS.move_to_end(key)
        return _DATASETS[key]


def clear_cache() -> None:
    """Forget cached datasets (tests)."""
    with _LOCK:
        _DATASETS.clear()

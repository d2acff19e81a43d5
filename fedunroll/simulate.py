"""``fedunroll simulate``: a Flower simulation (Ray backend) with a SuperLink we own.

1. Merge the run config (pyproject defaults < ``--config`` file < ``--set`` < flags) and
   validate it before anything starts; generate the embedded synthetic sites if missing.
2. Start ``flower-superlink --simulation`` on a free local port with a run-local ``FLWR_HOME``
   (``<run dir>/.flwr``, holding the ``config.toml`` connection), then
   ``flwr run <app> fedunroll --stream`` with the run config as a TOML file.
3. Always stop the SuperLink, its SuperExec, the simulation and every Ray process, also on
   Ctrl-C, SIGTERM and errors (:mod:`fedunroll.procs`).
4. Add the local-only (and, if asked, centralized) baselines to ``results.json`` and print
   the per-site table: federated vs zero-filled vs each site alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fedunroll.overrides import toml_value
from fedunroll.procs import ProcessGroup
from recon.config import RunConfig, default_flat, parse_run_config
from server import checkpoint
from server.runlock import LOCK_FILE, RunLock

FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}
CONNECTION = "fedunroll"
# More synthetic sites than this are generated lazily, each when first sampled (README "Many
# sites"); up to this many are generated up front as before.
LAZY_SITES_ABOVE = 32
PACKAGES = ("recon", "strategies", "server", "client")
# Third-party output that says nothing to a fedunroll user, kept out of the terminal (the run's
# simulation.log keeps every line): Flower's note on its default federation size and its resize
# hint (here the size is --num-sites), and its end-of-simulation actor shutdown notice.
QUIET_LINES = (
    "default simulated SuperNodes changed from 10 to 2",
    "To change federation size, use the following command",
    "flwr federation simulation-config ",
    "Manually terminating ClientAppActor",
)
# Python warnings filters for the SuperLink, the simulation and Ray (PYTHONWARNINGS): Ray's
# FutureWarning "Tip: ... will no longer override accelerator visible devices" on every start.
QUIET_WARNINGS = ("ignore::FutureWarning:ray._private.worker",)


def child_warnings(environ: Mapping[str, str] = os.environ) -> str:
    """``PYTHONWARNINGS`` for the children: ours first, so the user's own (later) ones win."""
    own = environ.get("PYTHONWARNINGS", "")
    return ",".join([*QUIET_WARNINGS, *([own] if own else [])])


class SimulationError(RuntimeError):
    """The simulation did not complete; the message says why and where the logs are."""


# --- configuration ----------------------------------------------------------------------------
def to_toml(flat: Mapping[str, Any]) -> str:
    """Flat dotted keys -> TOML with quoted keys (what ``flwr run --run-config FILE`` reads)."""
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in flat.items())


def build_config(
    overrides: Mapping[str, Any], out: str | None = None, num_sites: int | None = None
) -> RunConfig:
    """Defaults < ``overrides`` < flags; relative paths made absolute (the apps run elsewhere)."""
    flat = {**default_flat(), **dict(overrides)}
    if out is not None:
        flat["run.out"] = out
    if num_sites is not None:
        flat["data.num-sites"] = num_sites
        if "min-fit-clients" not in overrides:
            flat["min-fit-clients"] = min(flat["min-fit-clients"], num_sites)
        if "min-available-clients" not in overrides:
            flat["min-available-clients"] = min(flat["min-available-clients"], num_sites)
    cfg = parse_run_config(flat)
    return absolute_paths(cfg)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """``data.root``, ``run.out``, ``run.resume`` and ``model.nas-genotype`` made absolute."""
    flat = cfg.flat()
    for key in ("data.root", "run.out", "run.resume", "model.nas-genotype"):
        if flat[key]:
            flat[key] = str(Path(flat[key]).expanduser().resolve())
    return parse_run_config(flat)


def resume_config(run_dir: Path, overrides: Mapping[str, Any]) -> RunConfig:
    """The saved config of ``run_dir`` (its checkpoint) with ``run.resume`` set."""
    state = checkpoint.load(run_dir)
    flat = {**state.config, **dict(overrides), "run.resume": str(run_dir.resolve())}
    return absolute_paths(parse_run_config(flat))


# --- data ----------------------------------------------------------------------------------------
def site_dirs(cfg: RunConfig) -> list[Path]:
    root = Path(cfg.data.root)
    # training sites site0..site{n-1}, then the held-out (unseen) ones: one SuperNode each
    return [root / f"site{k}" for k in range(cfg.data.num_sites + cfg.data.unseen_sites)]


def ensure_sites(cfg: RunConfig, log: IO[str] = sys.stderr) -> list[Path]:
    """The simulation's site folders; synthetic ones are generated when ``data.root`` has none."""
    root = Path(cfg.data.root)
    dirs = site_dirs(cfg)
    if all(d.is_dir() for d in dirs):
        _check_synthetic(dirs, cfg)
        return dirs
    if root.is_dir() and any(root.glob("site*")) and not _synthetic(root):
        missing = [str(d) for d in dirs if not d.is_dir()]
        raise FileNotFoundError(
            f"data.root {root} has no folder(s) {missing} for data.num-sites="
            f"{cfg.data.num_sites} (+ data.unseen-sites={cfg.data.unseen_sites}); "
            "simulation maps partition k to <data.root>/site<k>"
        )
    from recon.data import generate_sites
    from recon.data.lazy import PLAN, write_plan

    d = cfg.data
    overrides = {"num_coils": d.synth_coils} if d.synth_coils else None
    plan = {
        "n_sites": len(dirs),
        "n_slices": d.synth_slices,
        "seed": d.seed,
        "matrix": d.synth_size or None,
        "iid": d.iid,
        "overrides": overrides,
    }
    if len(dirs) > LAZY_SITES_ABOVE:  # README "Many sites": each site when first sampled
        _check_plan(root, plan)
        write_plan(root, **plan)
        print(
            f"{len(dirs)} synthetic sites in {root} are generated when first sampled "
            f"(more than {LAZY_SITES_ABOVE}; {root / PLAN})",
            file=log,
            flush=True,
        )
        return dirs
    print(
        f"generating {len(dirs)} synthetic {'IID' if d.iid else 'non-IID'} sites "
        f"({d.synth_slices} slices each) in {root} ...",
        file=log,
        flush=True,
    )
    generate_sites(
        root,
        n_sites=len(dirs),
        n_slices=d.synth_slices,
        seed=d.seed,
        matrix=d.synth_size or None,
        iid=d.iid,
        overrides=overrides,
    )
    cache_maps(cfg, dirs, log)
    return dirs


SPLITS = ("train", "val", "test")


def cache_maps(cfg: RunConfig, dirs: list[Path], log: IO[str] = sys.stderr) -> None:
    """Compute the coil maps of ``dirs`` (cached on disk beside the data, as ``fedunroll data
    prepare`` does) for the slices the sites will load, so that round 1 does not pay them.

    The sites load the same splits with the same settings (``DataConfig.split_kwargs``), so
    their first load finds the maps cached (a site reads them, it never recomputes them).
    """
    from recon.data.dataset import SiteDataset

    t0 = time.perf_counter()
    print(f"computing the coil maps of {len(dirs)} sites ...", file=log, flush=True)
    for site in dirs:
        for split in SPLITS:
            SiteDataset(site, split=split, **cfg.data.split_kwargs(split))
    print(f"coil maps ready in {time.perf_counter() - t0:.1f} s", file=log, flush=True)


def _check_plan(root: Path, plan: Mapping[str, Any]) -> None:
    """Lazy sites already planned in ``root`` for another layout must not be mixed with these."""
    from recon.data.lazy import read_plan
    from recon.data.synth import GENERATOR

    old = read_plan(root)
    if old is None:
        return
    diff = [k for k, v in plan.items() if k != "n_sites" and old.get(k) != v]
    if diff or old.get("generator") != GENERATOR:
        raise FileExistsError(
            f"{root} holds lazy synthetic sites planned with "
            + ", ".join(f"{k}={old.get(k)}" for k in diff or ["generator"])
            + "; this run asks for "
            + ", ".join(f"{k}={plan.get(k, GENERATOR)}" for k in diff or ["generator"])
            + "; choose another data.root or delete it"
        )


def _check_synthetic(dirs: list[Path], cfg: RunConfig) -> None:
    """Synthetic sites made for another layout (IID vs non-IID, slices) must not be reused."""
    for d in dirs:
        try:
            info = json.loads((d / "site.json").read_text())
        except (OSError, ValueError):
            return  # real (prepared) data: nothing to compare
        if not str(info.get("generator", "")).startswith("fedunroll.synth"):
            return
        preset = info.get("preset", {})
        made = {
            "data.iid": bool(info.get("iid")),
            "data.synth-slices": info.get("requested_slices", sum(info.get("slices", {}).values())),
            "data.synth-size": list(preset.get("matrix", [])),
            "data.synth-coils": preset.get("num_coils"),
        }
        want = {
            "data.iid": cfg.data.iid,
            "data.synth-slices": cfg.data.synth_slices,
            "data.synth-size": [cfg.data.synth_size] * 2 if cfg.data.synth_size else None,
            "data.synth-coils": cfg.data.synth_coils or None,
        }
        diff = [k for k, v in want.items() if v is not None and made[k] != v]
        if diff:
            raise FileExistsError(
                f"{d} holds synthetic data made with "
                + ", ".join(f"{k}={made[k]}" for k in diff)
                + ", this run asks for "
                + ", ".join(f"{k}={want[k]}" for k in diff)
                + "; choose another data.root (each preset in configs/ has its own) or delete it"
            )


def _synthetic(root: Path) -> bool:
    metas = list(root.glob("site*/site.json"))
    try:
        return bool(metas) and all(
            json.loads(m.read_text()).get("generator", "").startswith("fedunroll.synth")
            for m in metas
        )
    except (OSError, ValueError):
        return False


# --- baselines ------------------------------------------------------------------------------
def _local_only_site(cfg_flat: dict[str, Any], site: str, path: str, steps: int) -> dict[str, Any]:
    """One site alone (a worker process, one thread: sites train side by side)."""
    import torch

    from client.site import resolve_device
    from recon.train import baselines

    torch.set_num_threads(1)
    cfg = parse_run_config(cfg_flat)
    return baselines.local_only(
        {site: path},
        cfg.model,
        cfg.train,
        steps,
        resolve_device(cfg.run.device),
        cfg.data.dataset_kwargs(),  # as the sites load their slices
        max_train_slices=cfg.data.max_train_slices or None,  # the federation's data budget
        progress=False,
    )


def run_baselines(cfg: RunConfig, data: Mapping[str, Any]) -> dict[str, Any]:
    """``{"local_only": {site: metrics}, "centralized": ...}`` for the run's sites.

    Each site trains alone for the steps it took in the federation (rounds x local steps), from
    the same initial weights (``train.seed``), evaluated on its test slices like ``final``.
    Local-only sites train in parallel worker processes on CPU.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    from recon.train import baselines  # ImportError: no baselines available

    rounds = data["rounds"][-1]["round"] if data["rounds"] else 0
    steps = rounds * cfg.local_steps
    sites = {d.name: str(d) for d in site_dirs(cfg) if d.name in data["sites"]}
    if steps <= 0 or not sites:
        return {}
    out: dict[str, Any] = {}
    if cfg.run.local_only:
        print(
            f"local-only baseline: {len(sites)} sites x {steps} steps ...",
            file=sys.stderr,
            flush=True,
        )
        workers = max(1, min(len(sites), os.cpu_count() or 1))
        if cfg.run.device.startswith("cuda"):
            workers = 1
        flat = cfg.flat()
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            jobs = [pool.submit(_local_only_site, flat, s, p, steps) for s, p in sites.items()]
            out["local_only"] = {}
            for job in jobs:
                out["local_only"].update(job.result())
        out["local_only"] = dict(sorted(out["local_only"].items()))
    if cfg.run.centralized:
        from client.site import resolve_device

        print(f"centralized baseline: {steps * len(sites)} steps ...", file=sys.stderr, flush=True)
        out["centralized"] = baselines.centralized(
            sites,
            cfg.model,
            cfg.train,
            steps,
            resolve_device(cfg.run.device),
            cfg.data.dataset_kwargs(),  # as the sites load their slices
            max_train_slices=cfg.data.max_train_slices or None,
            progress=None,
        )
    return out


# --- the Flower app ------------------------------------------------------------------------------
def app_dir(staging: Path) -> Path:
    """The Flower app to run: this source checkout, or a staged copy of the packages.

    A checkout (``pip install -e .``) has ``pyproject.toml`` with ``[tool.flwr.app]`` next to
    the packages; an installed wheel does not, so the packages are copied with a generated
    pyproject that declares every run-config key.
    """
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        try:
            tool = tomllib.loads(pyproject.read_text()).get("tool", {})
            if "app" in tool.get("flwr", {}):
                return root
        except tomllib.TOMLDecodeError:
            pass
    staging.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        shutil.copytree(
            root / pkg,
            staging / pkg,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    config = "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in default_flat().items())
    (staging / "pyproject.toml").write_text(
        '[project]\nname = "fedunroll"\nversion = "0.1.0"\n\n'
        '[tool.flwr.app]\npublisher = "fedunroll"\n\n'
        '[tool.flwr.app.components]\nserverapp = "server.app:app"\nclientapp = "client.app:app"\n\n'
        f"[tool.flwr.app.config]\n{config}"
    )
    return staging


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_address(cfg: RunConfig, out: IO[str] = sys.stderr) -> str:
    """``RAY_ADDRESS`` for the simulation's ``ray.init()``: ``sim.ray-address`` if set, else
    ``"local"``, a private instance that starts and stops with the run.

    Without it Ray joins whatever cluster this machine last ran ``ray start`` for (or the
    caller's ``RAY_ADDRESS``), so a run would land on somebody else's cluster unasked.

    Raises
    ------
    SimulationError
        If nothing answers at ``sim.ray-address`` (checked before anything starts).
    """
    address = cfg.sim.ray_address
    if not address:
        if os.environ.get("RAY_ADDRESS", "") not in ("", "local"):
            print(
                "note: RAY_ADDRESS is set but ignored; to run on that Ray cluster set "
                'sim.ray-address (README "Many sites")',
                file=out,
                flush=True,
            )
        return "local"
    endpoint = cfg.sim.ray_endpoint  # None for "auto"
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout=5).close()
        except OSError as err:
            raise SimulationError(
                f"sim.ray-address {address}: no Ray cluster answers there ({err.strerror or err}); "
                "is `ray start --head` running on that host and port?"
            ) from None
    print(f"Ray: running the simulated sites on the cluster at {address}", file=out, flush=True)
    return address


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SimulationError(f"cannot find the {name!r} executable (is flwr installed?)")
    return found


def _wait_health(port: int, proc: Any, timeout: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(
                f"flower-superlink exited with code {proc.returncode}; see {log_path}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SimulationError(
        f"flower-superlink did not become ready in {timeout:.0f} s; see {log_path}"
    )


def _pump(src: IO[str], sinks: list[IO[str]], terminal: tuple[IO[str], ...] = ()) -> None:
    """Copy ``src`` line by line to ``sinks``; the ``terminal`` ones skip :data:`QUIET_LINES`."""
    for line in src:
        noise = any(q in line for q in QUIET_LINES)
        for s in sinks:
            if noise and s in terminal:
                continue
            try:
                s.write(line)
                s.flush()
            except (OSError, ValueError):
                pass


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Ctrl-C and SIGTERM (e.g. a CI timeout) unwind as ``KeyboardInterrupt``, so cleanup runs.

    SIGINT is set explicitly: a shell starts background jobs with SIGINT ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def pin_run_dir(cfg: RunConfig) -> RunConfig:
    """Fix ``run.name`` (default ``<strategy>-<time>``) so every later step names the same folder.

    Raises ``FileExistsError`` if a fresh run would reuse a folder that holds a checkpoint.
    """
    from server.app import run_dir_of

    if cfg.run.resume:
        return cfg
    run_dir = run_dir_of(cfg).resolve()
    if (run_dir / checkpoint.CHECKPOINT).exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; use --resume {run_dir} or another run.name"
        )
    return parse_run_config(
        {**cfg.flat(), "run.name": run_dir.name, "run.out": str(run_dir.parent)}
    )


def check_run_free(run_dir: Path) -> None:
    """Raise :class:`server.runlock.RunInUseError` if a live run owns ``run_dir``.

    Probes the lock its ServerApp holds (``<run dir>/.lock``) and releases it at once; creates
    nothing where there is no lock file yet.
    """
    if (Path(run_dir) / LOCK_FILE).is_file():
        with RunLock(run_dir):
            pass


def run_simulation(
    cfg: RunConfig,
    *,
    quiet: bool = False,
    startup_timeout: float = 60.0,
    out: IO[str] = sys.stdout,
) -> Path:
    """Run the federation of ``cfg`` in a Flower simulation; returns the run directory.

    Raises
    ------
    SimulationError
        If the SuperLink does not start or the run does not complete (the run directory's
        ``results.json`` / ``simulation.log`` say why).
    KeyboardInterrupt
        On Ctrl-C / SIGTERM, after every started process is stopped.
    server.runlock.RunInUseError
        If a live run owns the run directory (nothing is started).
    """
    cfg = pin_run_dir(cfg)
    run_dir = Path(cfg.run.resume) if cfg.run.resume else Path(cfg.run.out) / cfg.run.name
    check_run_free(run_dir)  # before writing anything into it or starting any process
    ray = ray_address(cfg)  # also before anything starts: a wrong address fails here
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    run_config = run_dir / "run_config.toml"
    run_config.write_text(to_toml(cfg.flat()))
    log_path = run_dir / "simulation.log"
    superlink_log = flwr_home / "superlink.log"
    federation = (
        f"num-supernodes={cfg.data.num_sites + cfg.data.unseen_sites} "
        f"client-resources-num-cpus={cfg.sim.client_cpus} "
        f"client-resources-num-gpus={cfg.sim.client_gpus}"
    )
    # The SuperLink spawns `flower-superexec` by name: put this interpreter's scripts first on
    # PATH, so a venv that is not activated (`.venv/bin/fedunroll`, `make test`) still works.
    bindir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    env = {
        **FLWR_ENV,
        "FLWR_HOME": str(flwr_home),
        "PATH": path,
        "PYTHONWARNINGS": child_warnings(),
        "RAY_ADDRESS": ray,
    }
    with tempfile.TemporaryDirectory(prefix="fedunroll-app-") as staging, _sigterm_as_interrupt():
        app = app_dir(Path(staging))
        with ProcessGroup(env) as group, open(log_path, "a") as log, open(superlink_log, "a") as sl:
            link = group.start(
                [
                    _bin("flower-superlink"),
                    "--insecure",
                    "--simulation",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                ],
                stdout=sl,
                stderr=subprocess.STDOUT,
                cwd=run_dir,
            )
            _wait_health(port, link, startup_timeout, superlink_log)
            runner = group.start(
                [
                    _bin("flwr"),
                    "run",
                    str(app),
                    CONNECTION,
                    "--stream",
                    "--run-config",
                    str(run_config),
                    "--federation-config",
                    federation,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=run_dir,
                text=True,
            )
            sinks: list[IO[str]] = [log] if quiet else [log, out]
            pump = threading.Thread(target=_pump, args=(runner.stdout, sinks, (out,)), daemon=True)
            pump.start()
            while runner.poll() is None:
                group.watch()
                if link.poll() is not None:
                    raise SimulationError(f"flower-superlink died; see {superlink_log}")
                time.sleep(0.5)
            pump.join(timeout=5)
    return run_dir

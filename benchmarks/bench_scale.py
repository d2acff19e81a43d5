"""Many simulated sites on one machine: set-up time, seconds per round and memory vs sites.

For each number of sites (default 10, 100, 1000) one ``fedunroll simulate`` run (SuperLink +
Ray, as a user runs it) with the same work per round: ``sites-per-round`` sites (default 10)
train the real MoDL architecture at a tiny size (32 px, 2 coils, 2 unrolls, 2 CG iterations,
the 8-channel U-Net, 2 local steps, FedAvg), and ``final-eval-sites`` of them are evaluated at
the end. More than 32 synthetic sites are generated lazily (a site when first sampled;
README "Many sites").

Measured per run:

* ``setup_seconds``: launch of ``fedunroll simulate`` to the first ``round-started`` event
  (site generation up front for <= 32 sites, SuperLink, Ray, the nodes registering);
* ``round_seconds``: each round's wall time at the server (``results.json``), and the mean of
  the rounds after the first (``seconds_per_round``; round 1 also pays Ray's worker start-up
  and, with lazy sites, their generation);
* ``server_peak_rss_mb``: the peak RSS (VmHWM) of the process running the ServerApp (Flower's
  ``flwr-simulation`` process, which also runs the simulated SuperNodes' bookkeeping);
* ``total_peak_rss_mb``: the peak over time of the summed RSS of every process the command
  started (SuperLink, simulation, Ray's GCS, raylet and workers), sampled every 0.5 s.

With ``--warm`` each lazy size runs a second time on the same ``data.root``: the same seed draws
the same sites by name, so the sites sampled before are on disk with their coil maps (as a real
hospital's data is); ``sites_written`` counts the sites on disk after the run.

    python benchmarks/bench_scale.py --warm                # 10, 100, 1000 sites, 3 rounds
    python benchmarks/bench_scale.py --quick               # 10 and 100 sites, 2 rounds
    python benchmarks/bench_scale.py --sites 10,1000 --rounds 4

Writes ``benchmarks/results/scale_cpu.json`` and ``scale_cpu.png`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

CONFIG: dict[str, Any] = {
    "strategy.name": "fedavg",
    "sites-per-round": 10,
    "min-fit-clients": 2,
    "min-available-clients": 2,
    "final-eval-sites": 10,
    "train.local-steps": 2,
    "model.num-unrolls": 2,
    "model.cg-iters": 2,
    "model.unet-chans": 8,
    "data.synth-slices": 10,
    "data.synth-size": 32,
    "data.synth-coils": 2,
    "run.local-only": False,
    "eval-mode": "piggyback",
    "node-wait-timeout": 600.0,
    "round-grace": 0.0,  # every sampled site trains every round (no grace-period cut-off)
}


# --- process memory from /proc -------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def _tree(root: int) -> list[int]:
    kids, todo, seen = _children(), [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(kids.get(pid, []))
    return seen


def _status(pid: int) -> tuple[int, int, str]:
    """(VmRSS kB, VmHWM kB, command line) of ``pid`` (zeros when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return 0, 0, ""
    kb = [int(fields.get(k, "0 kB").split()[0]) for k in ("VmRSS", "VmHWM")]
    return kb[0], kb[1], cmd


class Monitor(threading.Thread):
    """Samples the process tree of ``pid`` every ``period`` s until :meth:`stop`."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.total_peak_kb = 0
        self.peaks: dict[int, tuple[int, str]] = {}  # pid -> (VmHWM kB, command)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            total = 0
            for pid in _tree(self.pid):
                rss, hwm, cmd = _status(pid)
                total += rss
                if hwm > self.peaks.get(pid, (0, ""))[0]:
                    self.peaks[pid] = (hwm, cmd)
            self.total_peak_kb = max(self.total_peak_kb, total)
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def server_peak_kb(self) -> int:
        return max((h for h, c in self.peaks.values() if "flwr-simulation" in c), default=0)

    def top(self, n: int = 6) -> list[dict[str, Any]]:
        rows = sorted(self.peaks.values(), reverse=True)[:n]
        return [{"peak_rss_mb": round(h / 1024, 1), "command": c[:100]} for h, c in rows]


# --- one run -------------------------------------------------------------------------------------
def run(
    n_sites: int, rounds: int, work: Path, extra: dict[str, Any], warm: bool = False
) -> dict[str, Any]:
    flat = {**CONFIG, **extra, "num-server-rounds": rounds, "data.num-sites": n_sites}
    flat["data.root"] = str(work / f"sites{n_sites}")
    name = f"scale-{n_sites}" + ("-warm" if warm else "")
    flat["run.name"] = name
    cmd = [str(Path(sys.executable).with_name("fedunroll")), "simulate", "--quiet"]
    cmd += ["--out", str(work / "runs")]
    for k, v in flat.items():
        cmd += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    log = work / f"{name}.log"
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **ENV}, cwd=work
        )
        mon = Monitor(proc.pid)
        mon.start()
        rc = proc.wait()
        mon.stop()
    wall = time.time() - t0
    run_dir = work / "runs" / name
    if rc != 0 or not (run_dir / "results.json").is_file():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{n_sites} sites: fedunroll simulate exited {rc}:\n{tail}")
    results = json.loads((run_dir / "results.json").read_text())
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    first = min(e["t"] for e in events if e["type"] == "round-started")
    secs = [r["seconds"] for r in results["rounds"]]
    later = secs[1:] or secs
    written = len(list(Path(flat["data.root"]).glob("site*")))
    return {
        "sites": n_sites,
        # cold: the sites sampled are written (and their coil maps computed) in the round that
        # first samples them (lazy, > 32 sites); warm: the same run again on the same data.root
        # (the same seed draws the same sites by name: sites_written counts the sites on disk)
        "data": "warm" if warm else "cold",
        "status": results["status"],
        "wall_seconds": round(wall, 1),
        "setup_seconds": round(first - t0, 1),
        "round_seconds": [round(s, 2) for s in secs],
        "seconds_per_round": round(statistics.mean(later), 2),
        "sites_trained": [len(r["train"]) for r in results["rounds"]],
        "sites_written": written,
        "final_evaluated": results.get("final_summary", {}).get("evaluated"),
        "server_peak_rss_mb": round(mon.server_peak_kb() / 1024, 1),
        "total_peak_rss_mb": round(mon.total_peak_kb / 1024, 1),
        "largest_processes": mon.top(),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for kind, style in (("cold", "-"), ("warm", ":")):
        rows = [r for r in report["runs"] if r.get("data", "cold") == kind]
        if not rows:
            continue
        n = [r["sites"] for r in rows]
        axes[0].plot(n, [r["setup_seconds"] for r in rows], "o" + style, label=kind)
        axes[1].plot(n, [r["seconds_per_round"] for r in rows], "o" + style, label=kind)
        axes[2].plot(
            n, [r["server_peak_rss_mb"] for r in rows], "o" + style, label=f"server, {kind}"
        )
        axes[2].plot(n, [r["total_peak_rss_mb"] for r in rows], "s" + style, label=f"all, {kind}")
    axes[0].set_title("set-up (s)")
    axes[1].set_title(f"s per round, rounds 2..R ({report['sites_per_round']} sampled)")
    axes[2].set_title("peak RSS (MB)")
    for ax in axes:
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("sites in the federation")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"fedunroll simulate, {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", default="10,100,1000", help="comma-separated site counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="10 and 100 sites, 2 rounds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_cpu.json"))
    p.add_argument("--note", default="", help="recorded with the figures (e.g. machine load)")
    p.add_argument(
        "--warm", action="store_true", help="also rerun lazy sizes (> 32) with their sites on disk"
    )
    args = p.parse_args(argv)
    sites = [10, 100] if args.quick else [int(s) for s in args.sites.split(",")]
    rounds = 2 if args.quick else args.rounds
    extra: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "note": args.note,
        "rounds": rounds,
        "sites_per_round": {**CONFIG, **extra}["sites-per-round"],
        "config": {**CONFIG, **extra},
        "runs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for n in sites:
            print(f"{n} sites ...", file=sys.stderr, flush=True)
            for warm in (False, True) if args.warm and n > 32 else (False,):
                row = run(n, rounds, Path(tmp), extra, warm)
                print(json.dumps({k: v for k, v in row.items() if k != "largest_processes"}))
                report["runs"].append(row)
                out.write_text(json.dumps(report, indent=2) + "\n")  # measured so far
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

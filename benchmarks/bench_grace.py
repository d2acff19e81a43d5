"""What one dead site costs a round, per ``round-grace`` setting, written as JSON and a plot.

One exchange (:func:`server.federation.collect`, what every train / evaluate phase of a round
runs) on the in-process grid (``tests/inprocess.py``): three live sites whose replies arrive
``--delays`` seconds after the push and one dead site that never replies;
``min-fit-clients = 2``; ``round-timeout = --timeout``. For each ``round-grace`` the round's
wall time is measured next to the last live reply and the grace period applied
(``max(3 s, round-grace x median reply time)``, counted from the moment the needed replies were
in). ``round-grace = 0`` is the old behaviour: wait for every site up to ``round-timeout``.

    python benchmarks/bench_grace.py --out benchmarks/results/grace.json
    python benchmarks/bench_grace.py --quick --out /tmp/grace.json      # smoke (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from inprocess import InProcessGrid  # noqa: E402

from server.federation import GRACE_FLOOR, collect  # noqa: E402

DEAD = 13


def _echo(msg: Message, ctx: Context) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
    return Message(content, reply_to=msg)


def _dead(msg: Message, ctx: Context) -> Message | None:
    return None


def one_round(delays: list[float], grace: float, timeout: float, needed: int) -> dict[str, Any]:
    live = {10 + i: _echo for i in range(len(delays))}
    grid = InProcessGrid({**live, DEAD: _dead}, {}, delay={10 + i: d for i, d in enumerate(delays)})
    msgs = [
        Message(
            RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.TRAIN
        )
        for n in sorted(grid.clients)
    ]
    t0 = time.perf_counter()
    got = collect(grid, msgs, timeout, needed=needed, grace=grace)
    wall = time.perf_counter() - t0
    return {
        "round_grace": grace,
        "round_seconds": round(wall, 3),
        "last_live_reply_seconds": round(max(got.reply_seconds.values()), 3),
        "grace_seconds": None if got.grace is None or grace <= 0 else round(got.grace, 3),
        "replied": sorted(got.reply_seconds),
        "missing": got.missing,
        "cut_by_grace": got.late,
    }


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    labels = [f"{r['round_grace']:g}" if r["round_grace"] > 0 else "0 (off)" for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(labels, [r["round_seconds"] for r in rows], color="tab:blue", label="round wall time")
    ax.plot(
        labels,
        [r["last_live_reply_seconds"] for r in rows],
        "k--",
        marker="o",
        label="last live reply",
    )
    ax.axhline(data["setup"]["round_timeout"], color="tab:red", lw=1, label="round-timeout")
    ax.set_xlabel("round-grace (x median reply time, floor 3 s)")
    ax.set_ylabel("seconds")
    ax.set_title("one dead site of 4, min-fit-clients = 2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/grace.json")
    p.add_argument("--delays", default="0.5,1.0,1.5", help="live sites' reply delays (s)")
    p.add_argument("--graces", default="0,0.5,1,2,4,8", help="round-grace settings")
    p.add_argument("--timeout", type=float, default=20.0, help="round-timeout (s)")
    p.add_argument("--quick", action="store_true", help="smoke: tiny delays, two settings")
    args = p.parse_args(argv)
    delays = [float(x) for x in args.delays.split(",")]
    graces = [float(x) for x in args.graces.split(",")]
    timeout = args.timeout
    if args.quick:
        delays, graces, timeout = [0.05, 0.1], [0.0, 2.0], 4.0
    rows = [one_round(delays, g, timeout, needed=2) for g in graces]
    data = {
        "benchmark": "fedunroll.grace/1",
        "setup": {
            "live_reply_delays": delays,
            "dead_sites": 1,
            "min_fit_clients": 2,
            "round_timeout": timeout,
            "grace_floor_seconds": GRACE_FLOOR,
            "grid": "tests/inprocess.py InProcessGrid (no transport)",
        },
        "rule": "once min-fit-clients error-free replies are in (t_n), the others get until "
        "t_n + max(3 s, round-grace x median time from push to each error-free reply so far), "
        "at most round-timeout after the push; round-grace = 0 waits for all up to round-timeout",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    plot(data, out.with_suffix(".png"))
    for r in rows:
        print(
            f"round-grace {r['round_grace']:>4g}: round {r['round_seconds']:6.2f} s, last live "
            f"reply {r['last_live_reply_seconds']:.2f} s, grace {r['grace_seconds']}, "
            f"missing {r['missing']}"
        )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

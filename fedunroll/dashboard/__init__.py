"""``fedunroll dashboard``: a read-only live view of federated runs, in a browser.

The ServerApp appends run events to ``<run dir>/events.jsonl`` (:mod:`server.events`); this
command reads them (:mod:`fedunroll.events`) and serves, with Starlette and uvicorn, the runs
of a folder: progress and ETA, per-site status and metrics, curves, round time, rejected
replies with their reasons, the run config, two runs side by side. Safe by default: it binds
127.0.0.1; another address needs ``--host`` and ``--token``; GET only; no path outside the
runs folder. ``--site SITE_DIR --checkpoint MODEL.pt`` is a hospital's own view of its
reconstructions (images never leave that machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

TOKEN_ENV = "FEDUNROLL_DASHBOARD_TOKEN"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dashboard`` to the ``fedunroll`` parser."""
    p = sub.add_parser(
        "dashboard",
        help="a live, read-only view of federated runs in a browser",
        description="Serve a read-only dashboard of the runs in RUNS_DIR (default: runs): "
        "live progress and ETA, per-site status and metrics, curves, round time, rejected "
        "replies and the run config, from each run's events.jsonl (results.json for older "
        "runs). Binds 127.0.0.1; serving on another address needs --host and --token. With "
        "--site and --checkpoint: a hospital's own view of its test slices reconstructed by a "
        "model, on its own machine.",
    )
    p.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8050, help="port (default: 8050; 0: any free)")
    p.add_argument(
        "--token",
        help=f"required for a non-loopback --host: every request must carry it (or set {TOKEN_ENV}"
        "); 'auto' makes a random one and prints the URL with it",
    )
    p.add_argument("--site", metavar="SITE_DIR", help="a site folder: show its reconstructions")
    p.add_argument("--checkpoint", metavar="MODEL.pt", help="the model for --site")
    p.add_argument("--device", default="cpu", help="device for --site (default: cpu)")
    p.set_defaults(func=cmd_dashboard)


def resolve_token(host: str, token: str | None) -> tuple[str | None, str | None]:
    """``(token, error)``: the token to require (``auto`` made random) or why not to serve."""
    from fedunroll.dashboard.serve import is_loopback

    token = token or os.environ.get(TOKEN_ENV) or None
    if token == "auto":
        token = secrets.token_urlsafe(24)
    if not is_loopback(host) and not token:
        return None, (
            f"serving on {host} needs a token: --token TOKEN (or {TOKEN_ENV}; 'auto' makes one). "
            "Without one the dashboard binds 127.0.0.1 only"
        )
    if token is not None and len(token) < 8:
        return None, "the token is too short (8 characters at least; --token auto makes one)"
    return token, None


def cmd_dashboard(args: argparse.Namespace) -> int:
    """0 after Ctrl-C; 2 on bad arguments (no token for another address, missing folders)."""
    from fedunroll.dashboard.app import create_app
    from fedunroll.dashboard.serve import bind, serve_forever, url_of

    token, error = resolve_token(args.host, args.token)
    if error:
        print(f"fedunroll dashboard: error: {error}", file=sys.stderr)
        return 2
    site = None
    if args.site or args.checkpoint:
        if not (args.site and args.checkpoint):
            print("fedunroll dashboard: error: --site needs --checkpoint", file=sys.stderr)
            return 2
        from fedunroll.dashboard.site import SiteViewer

        try:
            site = SiteViewer(args.site, args.checkpoint, args.device)
        except (OSError, ValueError) as exc:
            print(f"fedunroll dashboard: error: {exc}", file=sys.stderr)
            return 2
        what = f"site {site.site_dir} ({len(site)} test slices) through {site.checkpoint.name}"
    else:
        runs = Path(args.runs_dir).expanduser()
        if not runs.is_dir():
            print(f"fedunroll dashboard: error: {runs} is not a folder", file=sys.stderr)
            return 2
        what = f"the runs in {runs.resolve()}"
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        print(f"fedunroll dashboard: error: cannot bind {args.host}:{args.port} ({exc})",
              file=sys.stderr)  # fmt: skip
        return 2
    app = create_app(None if site else args.runs_dir, token=token, site=site)
    url = url_of(sock)
    shown = (
        f"{url}?token={token}"
        if token and token != (args.token or os.environ.get(TOKEN_ENV))
        else url
    )
    print(f"fedunroll dashboard: {what} at {shown} (read-only; Ctrl-C stops)", flush=True)
    if token and shown == url:
        print("  open it with ?token=TOKEN once (a cookie keeps it)", flush=True)
    serve_forever(app, sock)
    return 0


@contextlib.contextmanager
def beside_run(run_dir: Path, port: int = 8050) -> Iterator[str]:
    """Serve the dashboard of ``run_dir``'s parent on 127.0.0.1 in a background thread for the
    duration of the block (``fedunroll simulate --dashboard``); yields the run's URL.

    ``port`` taken: any free one. The server stops when the block ends.
    """
    from fedunroll.dashboard.app import create_app
    from fedunroll.dashboard.serve import BackgroundDashboard

    run_dir = Path(run_dir).resolve()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    app = create_app(run_dir.parent)
    try:
        dash = BackgroundDashboard(app, "127.0.0.1", port)
    except OSError:
        dash = BackgroundDashboard(app, "127.0.0.1", 0)
    with dash:
        url = f"{dash.url}runs/{quote(run_dir.name, safe='')}"
        print(f"dashboard: {url} (read-only, stops with this run)", flush=True)
        yield url

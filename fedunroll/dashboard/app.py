"""The dashboard's web app (Starlette): read-only views of the runs under one folder.

Routes (GET and HEAD only; any other method is 405, so nothing can change a run):

    /                          the runs (live and finished) and a compare form
    /runs/{run}                one run: progress and ETA, sites, curves, round time,
                               privacy (epsilon), rejections, config; updated live
    /runs/{run}/panel          the run's panel alone (HTML; what the page swaps in)
    /compare?a=RUN&b=RUN       two runs side by side with their config differences
    /api/runs                  JSON: the runs and their summaries
    /api/runs/{run}            JSON: one run's summary (``fedunroll.events.summarize``) with
                               its ``privacy`` (``fedunroll.dashboard.privacy``; null without
                               DP) in place of the ``dp`` figures it is made of
    /api/runs/{run}/stream     server-sent events: the run's version whenever its files change
    /static/...                the package's stylesheet and script (no external asset)

``{run}`` is the name of a folder directly inside the runs folder (or the runs folder's own
name when it is itself a run); anything else (``..``, separators, symlinks leading out, hidden
names) is 404. With a token every request needs it: ``Authorization: Bearer TOKEN``, the
``fedunroll_token`` cookie, or ``?token=TOKEN`` (which sets that cookie). Without a token
only requests addressed to a loopback name are served (a web page cannot reach the dashboard
through DNS rebinding).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fedunroll.dashboard import render
from fedunroll.dashboard.privacy import run_privacy
from fedunroll.events import EVENTS, RESULTS, is_run_dir, load_run

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "fedunroll_token"
RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+@:=,-]{0,254}$")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
# Server-sent events: how often the files are looked at, and how long one stream lasts (the
# browser reconnects by itself; a short stream never holds a shutdown up).
STREAM_POLL = 0.5
STREAM_SECONDS = 25.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RunsDir:
    """The runs under ``root`` and the one safe way from a URL name to a folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def ids(self) -> list[str]:
        """Run names, the most recently changed first."""
        found: list[tuple[float, str]] = []
        if is_run_dir(self.root):
            found.append((_mtime(self.root), self.root.name))
        try:
            children = list(self.root.iterdir())
        except OSError:
            children = []
        for child in children:
            if RUN_NAME.match(child.name) and child.is_dir() and self._inside(child):
                if is_run_dir(child):
                    found.append((_mtime(child), child.name))
        return [name for _, name in sorted(found, reverse=True)]

    def _inside(self, path: Path) -> bool:
        try:
            real = path.resolve()
        except OSError:
            return False
        return real == self.root or real.parent == self.root

    def path(self, run_id: str) -> Path | None:
        """The folder of run ``run_id``, or ``None`` for anything that is not a run here."""
        if not isinstance(run_id, str) or not RUN_NAME.match(run_id) or ".." in run_id:
            return None
        if run_id == self.root.name and is_run_dir(self.root):
            return self.root
        candidate = self.root / run_id
        if not self._inside(candidate) or candidate.resolve() == self.root:
            return None
        if not candidate.is_dir() or not is_run_dir(candidate):
            return None
        return candidate

    def version(self, run_id: str) -> str:
        """Changes whenever the run's events or results change (size and mtime)."""
        path = self.path(run_id)
        if path is None:
            return ""
        parts = []
        for name in (EVENTS, RESULTS):
            try:
                st = (path / name).stat()
                parts.append(f"{st.st_size}-{st.st_mtime_ns}")
            except OSError:
                parts.append("0")
        return ".".join(parts)


def _mtime(path: Path) -> float:
    best = 0.0
    for name in (EVENTS, RESULTS):
        try:
            best = max(best, (path / name).stat().st_mtime)
        except OSError:
            pass
    return best


# ----------------------------------------------------------------------------- the guard
class Guard:
    """Read-only, token and host checks in front of every route (pure ASGI, so streams pass)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            resp: Response = PlainTextResponse(
                "read-only: GET only", status_code=405, headers={"Allow": "GET, HEAD"}
            )
            await resp(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        set_cookie = False
        if self.token is None:
            if _host_name(headers.get("host", "")) not in LOOPBACK_HOSTS:
                resp = PlainTextResponse("only served to localhost", status_code=403)
                await resp(scope, receive, send)
                return
        else:
            given = _bearer(headers.get("authorization", "")) or _cookie(
                headers.get("cookie", ""), COOKIE
            )
            query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
            if query and _same(query[0], self.token):
                given, set_cookie = query[0], True
            if not given or not _same(given, self.token):
                resp = PlainTextResponse(
                    "401: this dashboard needs its token (open the URL with ?token=TOKEN)",
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await resp(scope, receive, send)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (
                        b"content-security-policy",
                        b"default-src 'none'; script-src 'self'; style-src 'self'; "
                        b"img-src 'self'; connect-src 'self'; frame-ancestors 'none'",
                    ),
                    (b"cache-control", b"no-store"),
                ]
                if set_cookie and self.token is not None:
                    extra.append(
                        (
                            b"set-cookie",
                            f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode(),
                        )
                    )
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _host_name(host: str) -> str:
    """The name of a ``Host`` header, without its port (``[::1]:8050`` -> ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def _bearer(value: str) -> str:
    scheme, _, rest = value.partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else ""


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


# ----------------------------------------------------------------------------- the app
def create_app(
    runs_dir: str | os.PathLike[str] | None = None,
    *,
    token: str | None = None,
    site: Any = None,
) -> ASGIApp:
    """The dashboard of the runs under ``runs_dir``; with ``site`` (a
    :class:`fedunroll.dashboard.site.SiteViewer`) the site-local reconstruction viewer."""
    routes: list[Any] = [Mount("/static", app=StaticFiles(directory=STATIC), name="static")]
    if site is not None:
        routes += site.routes()
    else:
        routes += _run_routes(RunsDir(runs_dir or "."))
    app = Starlette(routes=routes)
    return Guard(app, token)


def _run_routes(runs: RunsDir) -> list[Route]:
    def summary(run_id: str) -> tuple[dict[str, Any], str] | None:
        path = runs.path(run_id)
        if path is None:
            return None
        version = runs.version(run_id)
        try:
            s = load_run(path)
        except FileNotFoundError:
            return None
        s["privacy"] = run_privacy(s)  # None without DP (README "Privacy")
        del s["dp"]  # what the privacy figures are made of: not shown as such
        return s, version

    def not_found(run_id: str) -> Response:
        return PlainTextResponse(f"no run {run_id[:80]!r} here", status_code=404)

    def index(request: Request) -> Response:
        listing = []
        for run_id in runs.ids():
            got = summary(run_id)
            listing.append((run_id, got[0] if got else None))
        return HTMLResponse(render.runs_page(listing))

    def run_page(request: Request) -> Response:
        run_id = request.path_params["run"]
        got = summary(run_id)
        if got is None:
            return not_found(run_id)
        return HTMLResponse(render.run_page(run_id, *got))

    def run_panel(request: Request) -> Response:
        run_id = request.path_params["run"]
        got = summary(run_id)
        if got is None:
            return not_found(run_id)
        s, version = got
        prefix = request.query_params.get("prefix", "")
        prefix = prefix if prefix in ("", "a-", "b-") else ""
        return HTMLResponse(
            render.panel_inner(run_id, s, prefix),
            headers={"X-Run-Version": version, "X-Run-Live": "1" if s["live"] else "0"},
        )

    def compare(request: Request) -> Response:
        a, b = request.query_params.get("a", ""), request.query_params.get("b", "")
        ga, gb = summary(a), summary(b)
        if ga is None:
            return not_found(a)
        if gb is None:
            return not_found(b)
        return HTMLResponse(render.compare_page((a, *ga), (b, *gb)))

    def api_runs(request: Request) -> Response:
        out = []
        for run_id in runs.ids():
            got = summary(run_id)
            if got is not None:
                s = got[0]
                out.append(
                    {
                        "id": run_id,
                        "status": s["status"],
                        "live": s["live"],
                        "round": s["round"],
                        "rounds": s["rounds"],
                        "sites": list(s["sites"]),
                        "updated": s["updated"],
                        "epsilon_max": (s["privacy"] or {}).get("epsilon_max"),
                    }
                )
        return JSONResponse({"runs": out})

    def api_run(request: Request) -> Response:
        run_id = request.path_params["run"]
        got = summary(run_id)
        if got is None:
            return not_found(run_id)
        return JSONResponse({**got[0], "id": run_id, "version": got[1]})

    async def stream(request: Request) -> Response:
        run_id = request.path_params["run"]
        if runs.path(run_id) is None:
            return not_found(run_id)

        async def updates() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"
            last = None
            end = time.monotonic() + STREAM_SECONDS
            while time.monotonic() < end:
                version = runs.version(run_id)
                if version != last:
                    last = version
                    yield f"data: {json.dumps({'version': version})}\n\n"
                if await request.is_disconnected():
                    return
                await asyncio.sleep(STREAM_POLL)

        return StreamingResponse(updates(), media_type="text/event-stream")

    return [
        Route("/", index),
        Route("/runs/{run}", run_page),
        Route("/runs/{run}/panel", run_panel),
        Route("/compare", compare),
        Route("/api/runs", api_runs),
        Route("/api/runs/{run}", api_run),
        Route("/api/runs/{run}/stream", stream),
    ]


__all__ = ["COOKIE", "Guard", "RunsDir", "create_app"]

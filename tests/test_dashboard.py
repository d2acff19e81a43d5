"""``fedunroll dashboard``: run events (server/events.py), their reader (fedunroll/events.py),
the read-only web app (token, host, methods, paths), the site-local viewer and, in headless
Chromium (slow), the live view of a 2-site in-process federation with a rejected site."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections import namedtuple
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from inprocess import InProcessGrid
from starlette.testclient import TestClient
from test_app_support import tiny_config, tiny_sites

from fedunroll.dashboard import resolve_token
from fedunroll.dashboard.app import COOKIE, RunsDir, create_app
from fedunroll.dashboard.privacy import dp_on, run_privacy
from fedunroll.events import load_run, read_events, rejections_table, summarize
from recon.config import RunConfig, parse_run_config
from server.app import run_federation
from server.events import EVENTS, RunEvents
from server.privacy import budget_stop, privacy_summary, round_privacy
from strategies.protocol import DP_EPSILON, DP_EPSILON_NEXT, to_numpy, to_record

Rej = namedtuple("Rej", "round site reason phase")
LOCAL = "http://127.0.0.1:8050"


# --- a fast stand-in site, and one that sends a bad reply ------------------------------------
def fake_site(bad_rounds: tuple[int, ...] = (), delay: float = 0.0):
    """Echoes the model with fixed metrics; in ``bad_rounds`` its train reply is NaN."""

    def client(msg: Message, ctx: Context) -> Message:
        time.sleep(delay)
        k = ctx.node_config["partition-id"]
        r = int(msg.content["config"].get("server-round", 0) or 0)
        metrics: dict[str, Any] = {
            "num-examples": 4,
            "ssim": 0.5 + 0.01 * r + 0.1 * k,
            "nrmse": 0.3,
            "psnr": 20.0 + r,
        }
        if msg.metadata.message_type == "train":
            metrics["train-loss"] = 0.5 / (r or 1)
        else:
            metrics.update({"zf-ssim": 0.4, "zf-nrmse": 0.4, "zf-psnr": 18.0})
        content = RecordDict(
            {"metrics": MetricRecord(metrics), "config": ConfigRecord({"site-id": f"site{k}"})}
        )
        if msg.metadata.message_type == "train":
            arrays = to_numpy(msg.content["arrays"])
            if r in bad_rounds:
                arrays = {key: np.full_like(v, np.nan) for key, v in arrays.items()}
            content["arrays"] = to_record(arrays)
        return Message(content, reply_to=msg)

    return client


def bad_reply(client, bad_rounds: tuple[int, ...]):
    """Wrap a ClientApp: its train replies of ``bad_rounds`` carry NaN arrays."""

    def wrapped(msg: Message, ctx: Context) -> Message:
        reply = client(msg, ctx)
        r = int(msg.content["config"].get("server-round", 0) or 0)
        if msg.metadata.message_type == "train" and r in bad_rounds and reply.has_content():
            arrays = to_numpy(reply.content["arrays"])
            reply.content["arrays"] = to_record(
                {key: np.full_like(v, np.nan) for key, v in arrays.items()}
            )
        return reply

    return wrapped


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sites(tmp_path_factory, n_sites=2)


def _fake_run(root: Path, out: Path, name: str = "fake", rounds: int = 3) -> dict[str, Any]:
    flat = tiny_config(
        root,
        out,
        {"strategy.name": "fedavg", "min-fit-clients": 1, "num-server-rounds": rounds,
         "run.name": name},
    )  # fmt: skip
    grid = InProcessGrid({10: fake_site(), 11: fake_site(bad_rounds=(2,))}, flat)
    return run_federation(grid, parse_run_config(flat))


# --- the writer ------------------------------------------------------------------------------
def test_writer_appends_one_v1_line_per_event(tmp_path) -> None:
    ev = RunEvents(tmp_path)
    ev.run_started("r", {"a": 1}, 0, 2)
    ev.round_started(1, [10, 11], lambda n: f"node-{n}")
    ev.replies(1, "train", {"site0": {"train-loss": math.nan, "seconds": 1.0}}, [])
    ev.replies(1, "evaluate", {}, [Rej(1, "site1", "non-finite arrays", "evaluate")])
    ev.round_started(2, [10], lambda n: "site0" if n == 10 else "site1")
    lines = (tmp_path / EVENTS).read_text().splitlines()
    events = [json.loads(x) for x in lines]
    assert all(e["v"] == 1 and isinstance(e["t"], float) and e["type"] for e in events)
    types = [e["type"] for e in events]
    assert types == [
        "run-started",
        "site-connected",
        "site-connected",
        "round-started",
        "reply-accepted",
        "phase-finished",
        "reply-rejected",
        "phase-finished",
        "site-lost",
        "round-started",
    ]
    assert events[1]["site"] is None and events[1]["node"] == 10  # not bound yet
    assert events[4]["metrics"] == {"loss": None, "seconds": 1.0}  # NaN is null
    assert events[6]["reason"] == "non-finite arrays" and events[6]["phase"] == "evaluate"
    assert events[8] == {**events[8], "site": "site1", "node": 11, "round": 2}
    # a rejection is written once, however often the list is passed again
    ev.replies(2, "train", {}, [Rej(1, "site1", "non-finite arrays", "evaluate")])
    assert len((tmp_path / EVENTS).read_text().splitlines()) == len(lines) + 1


def test_writer_never_raises(tmp_path) -> None:
    ev = RunEvents(tmp_path / "missing" / "dir")
    ev.run_started("r", {}, 0, 1)  # cannot write: logged once, then off
    assert ev.path is None
    RunEvents(None).round_started(1, [1], str)


# --- the reader --------------------------------------------------------------------------------
def test_reader_skips_partial_and_foreign_lines(tmp_path) -> None:
    path = tmp_path / EVENTS
    good = {"v": 1, "t": 1.0, "type": "round-started", "round": 1}
    path.write_text(
        json.dumps(good)
        + "\nnot json\n"
        + json.dumps({**good, "v": 2})
        + "\n[1, 2]\n"
        + json.dumps({"v": 1, "type": "x"})
        + "\n"
        + json.dumps(good)[:-3]  # being written: no newline yet
    )
    assert read_events(path) == [good]
    assert read_events(tmp_path / "none.jsonl") == []


def _events_of_a_run(t0: float = 1000.0) -> list[dict[str, Any]]:
    def e(t: float, type_: str, **kw: Any) -> dict[str, Any]:
        return {"v": 1, "t": t0 + t, "type": type_, **kw}

    out = [e(0, "run-started", name="r", config={"num-server-rounds": 4}, round=0, rounds=4)]
    for r in (1, 2):
        b = 10 * (r - 1)
        out += [
            e(b + 0, "round-started", round=r, nodes=2),
            e(
                b + 3,
                "reply-accepted",
                round=r,
                phase="train",
                site="site0",
                metrics={"loss": 1.0 / r, "seconds": 2.0},
                bytes=100,
            ),  # fmt: skip
            e(b + 3, "reply-rejected", round=r, phase="train", site="site1", reason="bad"),
            e(b + 3, "phase-finished", round=r, phase="train", accepted=1, rejected=1),
            e(
                b + 5,
                "reply-accepted",
                round=r,
                phase="evaluate",
                site="site0",
                metrics={"ssim": 0.5 + r / 10, "nrmse": 0.2, "psnr": 20.0 + r},
            ),  # fmt: skip
            e(
                b + 5,
                "reply-accepted",
                round=r,
                phase="evaluate",
                site="site1",
                metrics={"ssim": 0.4, "nrmse": 0.3, "psnr": 19.0},
            ),  # fmt: skip
            e(b + 5, "phase-finished", round=r, phase="evaluate", accepted=2, rejected=0),
            e(
                b + 5,
                "round-finished",
                round=r,
                seconds=5.0,
                bytes_sent=400,
                bytes_received=200,
                train={"site0": {"loss": 1.0 / r, "seconds": 2.0}},
                eval={},
                rejected=[],
            ),  # fmt: skip
            e(b + 6, "checkpoint-written", round=r, file="checkpoint.pt"),
        ]
    out.append(e(20, "round-started", round=3, nodes=2))
    return out


def test_summary_of_a_live_run() -> None:
    s = summarize(_events_of_a_run(), now=1023.0)
    assert s["live"] and s["status"] == "running"
    assert (s["round"], s["rounds"]) == (2, 4)
    assert s["current"] == {"round": 3, "phase": "train", "since": 1020.0}
    # 2 rounds left at 6 s each, 3 s of round 3 already done
    assert s["eta"] == pytest.approx(9.0)
    assert s["elapsed"] == pytest.approx(23.0)
    site0, site1 = s["sites"]["site0"], s["sites"]["site1"]
    assert site0["status"] == "training" and site0["loss"] == 0.5 and site0["psnr"] == 22.0
    assert site0["bytes"] == 200 and site0["last_round"] == 2
    assert site1["rejections"] == 2 and site1["loss"] is None
    assert s["curves"]["ssim"]["site0"] == [[1, 0.6], [2, 0.7]]
    assert [(x["round"], x["site"], x["reason"]) for x in s["rejections"]] == [
        (1, "site1", "bad"),
        (2, "site1", "bad"),
    ]
    row = s["timeline"][0]
    assert (row["train"], row["evaluate"], row["checkpoint"], row["site_seconds"]) == (
        3.0,
        2.0,
        1.0,
        2.0,
    )


def test_summary_of_a_finished_and_of_a_resumed_run(tmp_path) -> None:
    events = _events_of_a_run()
    done = summarize(
        [*events, {"v": 1, "t": 1030.0, "type": "run-finished", "status": "completed"}], now=2000
    )
    assert not done["live"] and done["status"] == "completed" and done["eta"] is None
    assert done["sites"]["site0"]["status"] == "done"
    assert done["sites"]["site1"]["status"] == "rejected"
    # killed in round 3, resumed from the checkpoint of round 1: rounds 2+ are redone
    resumed = summarize(
        [*events, {"v": 1, "t": 1100.0, "type": "run-started", "round": 1, "rounds": 4}],
        now=1101.0,
    )
    assert resumed["round"] == 1 and [r["round"] for r in resumed["timeline"]] == [1]
    assert resumed["curves"]["ssim"]["site0"] == [[1, 0.6]]
    assert [x["round"] for x in resumed["rejections"]] == [1]
    assert resumed["elapsed"] == pytest.approx(21.0)  # 20 s before the kill + 1 s


def test_pid_of_a_dead_local_server_means_stopped() -> None:
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    events = _events_of_a_run()
    events[0] = {**events[0], "host": socket.gethostname(), "pid": proc.pid}
    s = summarize(events)
    assert s["status"] == "stopped" and not s["live"]


def test_a_real_run_writes_its_events(root, tmp_path) -> None:
    """run_federation (in process, 2 fast sites, site1's round-2 reply NaN) writes events whose
    summary matches results.json."""
    res = _fake_run(root, tmp_path)
    run_dir = tmp_path / "fake"
    events = read_events(run_dir / EVENTS)
    types = [e["type"] for e in events]
    assert types[0] == "run-started" and types[-1] == "run-finished"
    assert types.count("round-finished") == types.count("checkpoint-written") == 3
    assert types.count("site-connected") == 2
    s = load_run(run_dir)
    assert s["status"] == "completed" and s["round"] == 3 and s["rounds"] == 3
    assert list(s["sites"]) == res["sites"] == ["site0", "site1"]
    assert s["curves"]["psnr"]["site0"] == [[1, 21.0], [2, 22.0], [3, 23.0]]
    rejected = [(x["round"], x["site"], x["phase"]) for x in s["rejections"]]
    assert rejected == [(2, "site1", "train")]
    assert "non-finite" in s["rejections"][0]["reason"]
    assert s["final"]["federated"].keys() == {"site0", "site1"}
    assert all(row["train"] is not None for row in s["timeline"])
    assert s["sites"]["site0"]["bytes"] == sum(
        e["bytes"] for e in events if e["type"] == "reply-accepted" and e["site"] == "site0"
    )
    table = rejections_table(run_dir)
    assert table is not None and "| 2 | train | site1 |" in table


def test_results_json_fallback(root, tmp_path) -> None:
    res = _fake_run(root, tmp_path)
    run_dir = tmp_path / "fake"
    (run_dir / EVENTS).unlink()
    s = load_run(run_dir)
    assert s["source"] == "results" and s["status"] == "completed" and not s["live"]
    assert s["round"] == 3 and list(s["sites"]) == res["sites"]
    assert [x["site"] for x in s["rejections"]] == ["site1"]
    assert s["curves"]["ssim"]["site1"][-1][0] == 3


# --- the web app: listing, pages, API -----------------------------------------------------------
@pytest.fixture
def runs(root, tmp_path) -> Path:
    out = tmp_path / "runs"
    _fake_run(root, out, "alpha", rounds=2)
    _fake_run(root, out, "beta", rounds=3)
    (out / "not-a-run").mkdir()
    (out / "notes.txt").write_text("x")
    return out


def _client(runs: Path, token: str | None = None, base_url: str = LOCAL) -> TestClient:
    return TestClient(create_app(runs, token=token), base_url=base_url)


def test_pages_and_api(runs) -> None:
    c = _client(runs)
    index = c.get("/")
    assert index.status_code == 200
    assert 'data-run="alpha"' in index.text and 'data-run="beta"' in index.text
    assert "not-a-run" not in index.text
    page = c.get("/runs/beta")
    assert page.status_code == 200
    for part in ('id="chart-ssim"', 'class="sites"', 'class="rejections"', "non-finite",
                 "run config", 'data-round="3"', "/static/dashboard.js"):  # fmt: skip
        assert part in page.text, part
    assert "http://" not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    api = c.get("/api/runs/beta").json()
    assert api["status"] == "completed" and api["round"] == 3 and api["version"]
    assert api["privacy"] is None and "ε (δ=" not in page.text  # no DP: no epsilon
    listing = c.get("/api/runs").json()["runs"]
    assert {r["id"] for r in listing} == {"alpha", "beta"}
    panel = c.get("/runs/alpha/panel")
    assert panel.headers["x-run-live"] == "0" and panel.headers["x-run-version"]
    both = c.get("/compare", params={"a": "alpha", "b": "beta"})
    assert both.status_code == 200 and "num-server-rounds" in both.text  # the config diff
    assert 'id="a-chart-ssim"' in both.text and 'id="b-chart-ssim"' in both.text
    assert c.get("/static/dashboard.css").status_code == 200
    headers = page.headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"


def test_a_run_folder_itself_can_be_served(runs) -> None:
    c = _client(runs / "beta")
    assert 'data-run="beta"' in c.get("/").text
    assert c.get("/runs/beta").status_code == 200
    assert c.get("/runs/alpha").status_code == 404  # a sibling is outside


def test_stream_reports_the_version(runs, monkeypatch) -> None:
    from fedunroll.dashboard import app as app_module

    monkeypatch.setattr(app_module, "STREAM_SECONDS", 0.3)
    c = _client(runs)
    with c.stream("GET", "/api/runs/alpha/stream") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = "".join(resp.iter_text())
    version = c.get("/api/runs/alpha").json()["version"]
    assert f'data: {{"version": "{version}"}}' in body


# --- safety ---------------------------------------------------------------------------------------
def test_read_only(runs) -> None:
    c = _client(runs)
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        for path in ("/", "/runs/alpha", "/api/runs/alpha", "/static/dashboard.js"):
            resp = c.request(method, path)
            assert resp.status_code == 405, (method, path)
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == before


def test_path_traversal_is_refused(runs, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "results.json").write_text((runs / "alpha" / "results.json").read_text())
    (runs / "link").symlink_to(outside, target_is_directory=True)
    (runs / ".hidden").mkdir()
    shutil.copy(runs / "alpha" / "results.json", runs / ".hidden" / "results.json")
    c = _client(runs)
    assert 'data-run="link"' not in c.get("/").text and ".hidden" not in c.get("/").text
    for path in (
        "/runs/%2e%2e",
        "/runs/..%2f..%2fetc",
        "/runs/%2e%2e%2foutside",
        "/runs/..%5coutside",
        "/runs/%2fetc%2fpasswd",
        "/runs/link",
        "/runs/.hidden",
        "/api/runs/link",
        "/api/runs/%2e%2e",
        "/runs/alpha%2f..%2f..%2foutside",
        "/compare?a=alpha&b=../outside",
        "/static/..%2f..%2fevents.py",
        "/static/%2e%2e/app.py",
    ):
        resp = c.get(path)
        assert resp.status_code == 404, (path, resp.status_code)
        assert "federated" not in resp.text
    d = RunsDir(runs)
    for bad in ("..", "../outside", "/etc", "alpha/../beta", "", ".hidden", "link", "a\\b"):
        assert d.path(bad) is None, bad
    assert d.path("alpha") == (runs / "alpha").resolve()


def test_token(runs) -> None:
    token = "s3cret-token-value"
    c = _client(runs, token=token, base_url="http://10.0.0.5:8050")
    assert c.get("/").status_code == 401
    assert c.get("/static/dashboard.js").status_code == 401
    assert c.get("/api/runs/alpha", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/?token=nope").status_code == 401
    ok = c.get("/api/runs/alpha", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200
    first = c.get(f"/?token={token}")
    assert first.status_code == 200 and f"{COOKIE}={token}" in first.headers["set-cookie"]
    assert "HttpOnly" in first.headers["set-cookie"]
    assert c.get("/runs/alpha").status_code == 200  # the cookie carries it now
    assert c.post(f"/?token={token}").status_code == 405


def test_without_a_token_only_loopback_names_are_served(runs) -> None:
    assert _client(runs, base_url="http://localhost:8050").get("/").status_code == 200
    assert _client(runs).get("/", headers={"Host": "[::1]:8050"}).status_code == 200
    assert _client(runs).get("/", headers={"Host": "evil.example:8050"}).status_code == 403
    # a page of another origin reaching 127.0.0.1 through DNS rebinding names its own host
    assert _client(runs, base_url="http://attacker.example").get("/").status_code == 403


def test_another_address_needs_a_token(tmp_path, capsys) -> None:
    from fedunroll.cli import main

    assert resolve_token("127.0.0.1", None) == (None, None)
    token, error = resolve_token("0.0.0.0", None)
    assert token is None and error and "--token" in error
    token, error = resolve_token("0.0.0.0", "auto")
    assert error is None and token and len(token) >= 24
    assert resolve_token("192.168.1.2", "short")[1]
    assert main(["dashboard", str(tmp_path), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "needs a token" in capsys.readouterr().err


# --- beside a simulation ----------------------------------------------------------------------
def test_simulate_dashboard_serves_while_the_run_lasts(runs, capsys) -> None:
    import httpx

    from fedunroll.cli import build_parser
    from fedunroll.dashboard import beside_run

    args = build_parser().parse_args(["simulate", "--dashboard", "--num-sites", "2"])
    assert args.dashboard == 8050
    assert build_parser().parse_args(["simulate"]).dashboard is None
    with beside_run(runs / "alpha", port=0) as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/runs/alpha")
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and 'data-run="alpha"' in page.text
    assert f"dashboard: {url}" in capsys.readouterr().out
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=2)  # stopped with the block


def test_compose_dashboard_is_read_only_on_loopback_with_a_token() -> None:
    import yaml

    compose = yaml.safe_load((Path(__file__).parents[1] / "docker-compose.yml").read_text())
    svc = compose["services"]["dashboard"]
    assert svc["profiles"] == ["dashboard"]  # not started by a plain `docker compose up`
    assert svc["volumes"] == ["results:/results:ro"]
    assert svc["ports"][0].startswith("${DASHBOARD_BIND:-127.0.0.1}:")
    assert svc["command"][:3] == ["fedunroll", "dashboard", "/results"]
    assert svc["environment"]["FEDUNROLL_DASHBOARD_TOKEN"] == "${DASHBOARD_TOKEN:-auto}"


# --- the site's own view ----------------------------------------------------------------------
def test_site_viewer_renders_pngs_on_the_site(root, tmp_path) -> None:
    from fedunroll.dashboard.site import SiteViewer
    from recon.models import build_model
    from recon.models.checkpoint import save_checkpoint

    flat = tiny_config(root, tmp_path)
    cfg = parse_run_config(flat)
    model = build_model(cfg.model)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(model, cfg.model, ckpt, run_config=cfg.flat())
    viewer = SiteViewer(root / "site0", ckpt)
    assert len(viewer) > 0
    c = TestClient(create_app(site=viewer), base_url=LOCAL)
    page = c.get("/")
    assert page.status_code == 200 and 'src="/site/slice/0.png"' in page.text
    assert "zero-filled SSIM" in page.text
    png = c.get("/site/slice/0.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.headers["content-type"] == "image/png"
    assert c.get(f"/site/slice/{len(viewer)}.png").status_code == 404
    assert c.get("/runs/alpha").status_code == 404  # no run views here
    assert c.post("/").status_code == 405


# --- differential privacy: epsilon on the run page, in the API and the comparison -----------
DP = {"strategy.name": "fedavg", "dp.enabled": True, "dp.site-clip": 1.0,
      "dp.site-noise-multiplier": 4.0, "dp.epsilon-budget": 3.0}  # fmt: skip
# slice-level (epsilon, epsilon after one more round) each site reported, per round; site1's
# round-2 train reply was rejected, so its latest epsilon is round 1's
DP_REPLIES = {1: {"site0": (1.5, 2.25), "site1": (1.25, 1.75)}, 2: {"site0": (2.25, 3.5)}}


def _dp_run() -> tuple[dict[str, Any], dict[int, dict[str, Any]], str, dict[str, Any]]:
    """(flat config, {round: round_privacy(...)}, the budget's stop reason, results.json's
    privacy section), made by the server's own functions (server/privacy.py)."""
    flat = {**RunConfig().flat(), **DP, "num-server-rounds": 4}
    cfg = parse_run_config(flat)
    privacy = {
        r: round_privacy(
            cfg, r, {s: {DP_EPSILON: e, DP_EPSILON_NEXT: n} for s, (e, n) in x.items()}
        )
        for r, x in DP_REPLIES.items()
    }
    records = [{"round": r, **p} for r, p in privacy.items()]
    stopped = budget_stop(cfg, records)
    assert stopped is not None and "> dp.epsilon-budget 3" in stopped  # 3.5 > 3
    return flat, privacy, stopped, privacy_summary(cfg, records, stopped)


def _dp_events(flat: dict[str, Any], privacy: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`_events_of_a_run` (live in round 3) with DP: its config, and the privacy dict in
    each round-finished event (as server/events.py writes the round record)."""
    events = _events_of_a_run()
    events[0] = {**events[0], "config": flat}
    return [{**e, **privacy[e["round"]]} if e["type"] == "round-finished" else e for e in events]


def _write_run(runs: Path, name: str, events: list[dict[str, Any]] | None = None,
               results: dict[str, Any] | None = None) -> Path:  # fmt: skip
    run = runs / name
    run.mkdir(parents=True)
    if events is not None:
        (run / EVENTS).write_text("".join(json.dumps(e) + "\n" for e in events))
    if results is not None:
        (run / "results.json").write_text(json.dumps(results))
    return run


def _dp_results(flat: dict[str, Any], privacy: dict[int, dict[str, Any]], section: Any) -> Any:
    """A results.json (schema of server/results.py) of the DP run, stopped after round 2."""
    rounds = [
        {"round": r, **privacy[r], "seconds": 5.0, "bytes_sent": 400, "bytes_received": 200,
         "train": {s: {"loss": None, "num-examples": 4, "seconds": 2.0} for s in DP_REPLIES[r]},
         "eval": {"site0": {"ssim": 0.6, "nrmse": 0.2, "psnr": 21.0, "num-examples": 4}},
         "rejected": [] if r == 1 else [{"site": "site1", "reason": "non-finite arrays"}]}
        for r in (1, 2)
    ]  # fmt: skip
    final = {"federated": {"site0": {"ssim": 0.7, "nrmse": 0.2, "psnr": 22.0}}, "zero_filled": {}}
    return {
        "schema": "fedunroll.results/1",
        "name": "x",
        "config": flat,
        "sites": ["site0", "site1"],
        "rounds": rounds,
        "final": final,
        "status": "completed",
        "timings": {"total_seconds": 12.0, "rounds_seconds": 10.0},
        "privacy": section,
    }


@pytest.fixture
def dp_runs(tmp_path) -> tuple[Path, dict[str, Any]]:
    """dp-live (events, live in round 3), dp-done (events + results.json: the budget stopped
    it after round 2), dp-results (results.json only), dp-stale (finished events, results.json
    of another attempt), plain (events, no DP)."""
    flat, privacy, stopped, section = _dp_run()
    runs = tmp_path / "runs"
    events = _dp_events(flat, privacy)
    done = [*events[:-1], {"v": 1, "t": 1021.0, "type": "run-finished", "status": "completed"}]
    _write_run(runs, "dp-live", events)
    _write_run(runs, "dp-done", done, _dp_results(flat, privacy, section))
    _write_run(runs, "dp-results", None, _dp_results(flat, privacy, section))
    _write_run(runs, "dp-stale", done, _dp_results(flat, privacy, {**section, "rounds": 5}))
    _write_run(runs, "plain", _events_of_a_run())
    site_level = [privacy[r]["privacy"]["site_level_epsilon"] for r in (1, 2)]
    return runs, {"stopped": stopped, "site_level": site_level}


def _row(html: str, site: str) -> str:
    start = html.index(f'<tr data-site="{site}"')
    return html[start : html.index("</tr>", start)]


def _fact(html: str, label: str) -> str:
    """The value of a row of the Privacy panel's table."""
    start = html.index(f'<th scope="row">{label}</th><td>') + len(
        f'<th scope="row">{label}</th><td>'
    )
    return html[start : html.index("</td>", start)]


def test_epsilon_of_a_live_dp_run(dp_runs) -> None:
    runs, want = dp_runs
    c = _client(runs)
    page = c.get("/runs/dp-live").text
    assert '"eps" title="slice-level epsilon' in page and "ε (δ=1e-05)</th>" in page
    assert _row(page, "site0").endswith('<td class="eps">2.25</td>')
    assert _row(page, "site1").endswith('<td class="eps">1.25</td>')  # its last accepted reply
    assert "<h3>Privacy</h3>" in page
    assert _fact(page, "protection") == "slice-level DP-SGD + site-level DP"
    assert _fact(page, "accountant") == "rdp" and _fact(page, "δ") == "1e-05 per site"
    assert _fact(page, "ε budget") == "3"
    assert _fact(page, "max ε so far, slice-level (after round 2)") == "2.25"
    assert _fact(page, "max ε after one more round") == "3.5"
    assert _fact(page, "site-level ε (after round 2)") == f"{want['site_level'][1]:.3g}"
    assert 'id="chart-epsilon"' in page and 'id="chart-site-epsilon"' in page
    chart = page[page.index('id="chart-epsilon"') :]
    assert 'data-series="site0" data-points="2"' in chart
    assert 'data-series="site1" data-points="1"' in chart
    assert "Stopped early" not in page  # a live run has no stop reason yet
    api = c.get("/api/runs/dp-live").json()["privacy"]
    assert api["epsilon"] == {"site0": 2.25, "site1": 1.25}
    assert (api["epsilon_max"], api["epsilon_next_max"], api["round"]) == (2.25, 3.5, 2)
    assert api["curves"]["epsilon"] == {"site0": [[1, 1.5], [2, 2.25]], "site1": [[1, 1.25]]}
    assert [p[1] for p in api["curves"]["site_level"]] == pytest.approx(want["site_level"])
    assert api["site_level_epsilon"] == pytest.approx(want["site_level"][1])
    assert (api["delta"], api["accountant"], api["epsilon_budget"]) == (1e-5, "rdp", 3.0)
    assert api["stopped"] is None and api["slice_level"] and api["site_level"]
    listing = {r["id"]: r for r in c.get("/api/runs").json()["runs"]}
    assert listing["dp-live"]["epsilon_max"] == 2.25 and listing["plain"]["epsilon_max"] is None
    # the panel the page swaps in while the run lives carries the same
    assert "ε (δ=1e-05)</th>" in c.get("/runs/dp-live/panel").text
    assert "dp" not in c.get("/api/runs/dp-live").json()  # the figures, not what they're made of


def test_epsilon_of_a_resumed_dp_run(dp_runs) -> None:
    """A resume from the checkpoint of round k drops the killed run's privacy records after k
    in the one summary (fedunroll.events.summarize) the page, the API and run_privacy read;
    the rounds it redoes bring their own."""
    runs, _ = dp_runs
    run = runs / "dp-live"

    def append(*events: dict[str, Any]) -> None:
        with open(run / EVENTS, "a") as f:
            f.writelines(json.dumps({"v": 1, **e}) + "\n" for e in events)

    append({"t": 1030.0, "type": "run-started", "round": 1})
    s = load_run(run)
    assert [x["round"] for x in s["dp"]["records"]] == [1] and s["dp"]["section"] is None
    p = run_privacy(s)
    assert p is not None and p["round"] == 1 and p["epsilon"] == {"site0": 1.5, "site1": 1.25}
    assert p["epsilon_max"] == 1.5 and p["epsilon_next_max"] == 2.25
    c = _client(runs)
    api = c.get("/api/runs/dp-live").json()["privacy"]
    assert api["curves"]["epsilon"] == {"site0": [[1, 1.5]], "site1": [[1, 1.25]]}
    assert len(api["curves"]["site_level"]) == 1 and api["round"] == 1
    assert _fact(c.get("/runs/dp-live").text, "max ε so far, slice-level (after round 1)") == "1.5"
    listing = {r["id"]: r for r in c.get("/api/runs").json()["runs"]}
    assert listing["dp-live"]["epsilon_max"] == 1.5
    # round 2 redone: its new figures, not the killed run's
    redone = {"epsilon": {"site0": 2.0}, "epsilon_next": {"site0": 2.5}, "delta": 1e-5}
    append({"t": 1040.0, "type": "round-finished", "round": 2, "privacy": redone})
    api = c.get("/api/runs/dp-live").json()["privacy"]
    assert api["curves"]["epsilon"]["site0"] == [[1, 1.5], [2, 2.0]]
    assert (api["epsilon"], api["epsilon_next_max"]) == ({"site0": 2.0, "site1": 1.25}, 2.5)


def test_dp_on_reads_the_config_with_the_project_parser() -> None:
    """dp_on parses the flat config with recon.config.parse_run_config (keys of other
    versions dropped, values coerced as the server does); a config it refuses is no DP."""
    assert dp_on({}) == (False, False) and dp_on({"num-server-rounds": 4}) == (False, False)
    assert dp_on(DP) == (True, True)
    assert dp_on({"dp.enabled": "true", "dp.site-clip": "0", "retired.key": 1}) == (True, False)
    assert dp_on({"strategy.name": "fedavg", "dp.site-clip": "0.5"}) == (False, True)
    # refused by the parser (noise 0 makes epsilon infinite; a negative clip; site-clip with
    # the default strategy, scaffold, in a partial config): no DP
    assert dp_on({"dp.enabled": True, "dp.noise-multiplier": 0.0}) == (False, False)
    assert dp_on({"strategy.name": "fedavg", "dp.site-clip": -1.0}) == (False, False)
    assert dp_on({"dp.site-clip": 0.5}) == (False, False)
    assert run_privacy({"config": {"dp.site-clip": 0.5}, "dp": {"records": []}}) is None


def test_epsilon_and_stop_reason_of_finished_dp_runs(dp_runs) -> None:
    runs, want = dp_runs
    c = _client(runs)
    for name in ("dp-done", "dp-results"):  # from events + results.json, from results.json
        page = c.get(f"/runs/{name}").text
        assert _row(page, "site0").endswith('<td class="eps">2.25</td>'), name
        assert _row(page, "site1").endswith('<td class="eps">1.25</td>'), name
        assert _fact(page, "max ε so far, slice-level (after round 2)") == "2.25"
        assert "max ε after one more round" not in page  # only while the run lives
        # the reason, escaped (it holds a ">")
        assert f"<strong>Stopped early:</strong> {escape(want['stopped'])}</p>" in page
        assert "&gt; dp.epsilon-budget 3" in page and "> dp.epsilon-budget" not in page
        api = c.get(f"/api/runs/{name}").json()["privacy"]
        assert api["stopped"] == want["stopped"] and api["epsilon_max"] == 2.25
        assert api["epsilon"] == {"site0": 2.25, "site1": 1.25}
        assert api["site_level_epsilon"] == pytest.approx(want["site_level"][1])
    assert c.get("/api/runs/dp-results").json()["source"] == "results"
    # a results.json that is not of these rounds (an earlier attempt) is not believed
    stale = c.get("/api/runs/dp-stale").json()["privacy"]
    assert stale["stopped"] is None and stale["epsilon_max"] == 2.25


def test_no_epsilon_without_dp_and_the_comparison(dp_runs) -> None:
    runs, _ = dp_runs
    c = _client(runs)
    page = c.get("/runs/plain").text
    assert "ε" not in page and "<h3>Privacy</h3>" not in page and 'class="eps"' not in page
    assert c.get("/api/runs/plain").json()["privacy"] is None
    assert "privacy-compare" not in c.get("/compare", params={"a": "plain", "b": "plain"}).text
    both = c.get("/compare", params={"a": "dp-done", "b": "plain"}).text
    table = both[both.index('<table class="privacy-compare">') :]
    table = table[: table.index("</table>")]
    assert "<th>dp-done</th><th>plain</th>" in table
    assert '<th scope="row">max ε, slice-level</th><td>2.25 (round 2)</td><td>no DP</td>' in table
    assert '<th scope="row">δ</th><td>1e-05</td><td>–</td>' in table
    assert 'id="a-chart-epsilon"' in both and 'id="b-chart-epsilon"' not in both


# --- in a browser (headless Chromium) -------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def browser(tmp_path: Path) -> Any:
    """Headless Chromium driven by Debian's chromedriver (no download, no network)."""
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("FEDUNROLL_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium / chromedriver missing (make browser-deps)")
        pytest.skip("chromium and chromedriver are not installed (make browser-deps)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1800",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def _wait(fn, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = fn()
        except Exception:  # the panel is being swapped
            got = None
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


ROUNDS = 8


@pytest.mark.slow
def test_live_federation_in_a_browser(root, tmp_path) -> None:
    """A 2-site federation (real ClientApps, site1's round-3 reply NaN) runs in a thread; the
    browser sees the rounds advance, a site's curve gain a point and the rejection's reason,
    then the run completed; a screenshot lands in the test's tmp folder."""
    from client.app import app as client_app
    from fedunroll.dashboard.serve import BackgroundDashboard

    runs = tmp_path / "runs"
    flat = tiny_config(
        root,
        runs,
        {"strategy.name": "fedavg", "min-fit-clients": 1, "num-server-rounds": ROUNDS,
         "train.local-steps": 6, "run.name": "live"},
    )  # fmt: skip
    clients = {10: client_app, 11: bad_reply(client_app, bad_rounds=(3,))}
    # replies seen 1 s after delivery: ~2.5 s a round, so the run lasts ~20-30 s
    grid = InProcessGrid(clients, flat, delay={10: 1.0, 11: 1.0})
    outcome: dict[str, Any] = {}

    def federate() -> None:
        try:
            outcome["results"] = run_federation(grid, parse_run_config(flat))
        except BaseException as exc:  # reported by the test
            outcome["error"] = exc

    runs.mkdir(parents=True)
    fed = threading.Thread(target=federate, daemon=True)
    driver = None
    with BackgroundDashboard(create_app(runs)) as dash:
        try:
            fed.start()
            _wait(lambda: (runs / "live" / EVENTS).is_file(), 60, "events.jsonl")
            driver = browser(tmp_path)
            driver.get(dash.url + "runs/live")

            def done_rounds() -> int:
                el = driver.find_element("css selector", ".panel .progress")
                return int(el.get_attribute("data-round"))

            def points(site: str) -> int:
                sel = f'#chart-ssim g.series[data-series="{site}"] circle.pt'
                return len(driver.find_elements("css selector", sel))

            first = _wait(lambda: done_rounds() >= 1 and done_rounds(), 90, "round 1")
            before = points("site0")
            _wait(lambda: done_rounds() > first, 90, "the progress to advance")
            _wait(lambda: points("site0") > before, 30, "site0's SSIM curve to gain a point")
            reason = _wait(
                lambda: (
                    driver.find_element(
                        "css selector", 'table.rejections tr[data-site="site1"] td.reason'
                    ).text
                ),
                120,
                "site1's rejection",
            )
            assert "non-finite" in reason
            row = driver.find_element("css selector", 'table.sites tr[data-site="site1"]')
            assert int(row.find_elements("css selector", "td")[-1].text) >= 1
            _wait(lambda: not fed.is_alive(), 180, "the run to finish")
            assert "error" not in outcome, outcome.get("error")
            _wait(
                lambda: "completed" in driver.find_element("css selector", ".panel h2").text,
                20,
                "the completed badge",
            )
            assert done_rounds() == ROUNDS
            driver.save_screenshot(str(tmp_path / "dashboard.png"))
            assert (tmp_path / "dashboard.png").stat().st_size > 10_000
            assert driver.get_log("browser") == [] or not any(
                e["level"] == "SEVERE" for e in driver.get_log("browser")
            )
        finally:
            if driver is not None:
                driver.quit()
            fed.join(timeout=300)
    assert outcome["results"]["status"] == "completed"


@pytest.mark.slow
def test_browser_token_compare_and_finished_run(runs, tmp_path) -> None:
    """With a token: the bare URL is refused, ?token= opens it and the cookie keeps it; the
    compare page shows both runs; a finished run is static (no stream left open)."""
    from fedunroll.dashboard.serve import BackgroundDashboard

    token = "browser-token-123"
    with BackgroundDashboard(create_app(runs, token=token)) as dash:
        driver = browser(tmp_path)
        try:
            driver.get(dash.url)
            assert "needs its token" in driver.find_element("tag name", "body").text
            driver.get(dash.url + f"?token={token}")
            links = driver.find_elements("css selector", "table.runs a")
            assert {a.text for a in links} == {"alpha", "beta"}
            driver.get(dash.url + "compare?a=alpha&b=beta")
            panels = driver.find_elements("css selector", "section.panel")
            assert [p.get_attribute("data-run") for p in panels] == ["alpha", "beta"]
            assert all(p.get_attribute("data-live") == "0" for p in panels)
            driver.save_screenshot(str(tmp_path / "compare.png"))
        finally:
            driver.quit()

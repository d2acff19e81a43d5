"""HTML of the dashboard, rendered in Python (every value escaped; no inline script or style)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from fedunroll.dashboard.svg import color, line_chart, stacked_bars

CHARTS = (
    ("loss", "train loss"),
    ("ssim", "val SSIM"),
    ("nrmse", "val NRMSE"),
    ("psnr", "val PSNR (dB)"),
)
BREAKDOWN = (
    ("site", "slowest site training"),
    ("wait", "transfer + wait + aggregate"),
    ("evaluate", "evaluate"),
    ("checkpoint", "checkpoint"),
)


def page(title: str, body: str, *, live: bool = False) -> str:
    """A full page: the stylesheet and the one script of the package, nothing external."""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title>"
        '<link rel="stylesheet" href="/static/dashboard.css">'
        "</head><body>"
        '<header><a class="home" href="/">fedunroll dashboard</a>'
        f'<span class="sub">{escape(title)}</span></header>'
        f"<main>{body}</main>"
        + ('<script src="/static/dashboard.js"></script>' if live else "")
        + "</body></html>"
    )


def run_href(run_id: str) -> str:
    return "/runs/" + quote(run_id, safe="")


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def nbytes(value: Any) -> str:
    if not isinstance(value, int | float) or value <= 0:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def eps(value: Any) -> str:
    """An epsilon (3 significant digits, as ``fedunroll report``); ``–`` when unknown."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    return f"{value:.3g}"


def delta(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "?"
    return f"{value:g}"


def ago(t: Any, now: float | None = None) -> str:
    if not isinstance(t, int | float):
        return "–"
    return duration((now or time.time()) - t) + " ago"


def status_badge(status: str) -> str:
    kind = status.split(":", 1)[0].strip() or "unknown"
    return (
        f'<span class="badge {escape(kind)}" title="{escape(status)}">'
        f"{escape(status if len(status) <= 60 else status[:57] + '...')}</span>"
    )


# ----------------------------------------------------------------------------- run list
def runs_page(runs: Sequence[tuple[str, Mapping[str, Any] | None]]) -> str:
    """The list of runs (newest first) and a form to compare two of them."""
    if not runs:
        body = "<p class=\"empty\">No runs here yet (a run directory holds events.jsonl or " \
            "results.json).</p>"  # fmt: skip
        return page("runs", body)
    rows = []
    for run_id, s in runs:
        if s is None:
            rows.append(
                f'<tr data-run="{escape(run_id)}"><td>{escape(run_id)}</td>'
                '<td colspan="5">unreadable</td></tr>'
            )
            continue
        planned = s.get("rounds") or "?"
        rows.append(
            f'<tr data-run="{escape(run_id)}"><td><a href="{run_href(run_id)}">'
            f"{escape(run_id)}</a></td><td>{status_badge(s['status'])}</td>"
            f"<td>{s['round']} / {planned}</td><td>{len(s['sites'])}</td>"
            f"<td>{escape(str(s['config'].get('strategy.name', '–')))}</td>"
            f"<td>{ago(s.get('updated'))}</td></tr>"
        )
    options = "".join(f'<option value="{escape(r)}">{escape(r)}</option>' for r, _ in runs)
    body = (
        '<table class="runs"><thead><tr><th>run</th><th>status</th><th>round</th>'
        "<th>sites</th><th>strategy</th><th>last event</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        '<form class="compare" method="get" action="/compare"><label>compare '
        f'<select name="a">{options}</select></label> <label>with '
        f'<select name="b">{options}</select></label> <button type="submit">compare</button>'
        "</form>"
    )
    return page("runs", body)


# ----------------------------------------------------------------------------- one run
def _progress(s: Mapping[str, Any]) -> str:
    planned = s.get("rounds") or 0
    done = s["round"]
    cur = s.get("current")
    doing = ""
    if s["live"] and cur is not None:
        doing = f" · round {cur['round']}: {escape(cur['phase'])}"
    eta = f" · ETA {duration(s['eta'])}" if s.get("eta") is not None else ""
    bar = f'<progress max="{planned or 1}" value="{min(done, planned or done)}"></progress>'
    return (
        f'<div class="progress" data-round="{done}" data-rounds="{planned}">{bar}'
        f'<span class="what">round {done} / {planned or "?"}{doing} · elapsed '
        f"{duration(s['elapsed'])}{eta}</span></div>"
    )


def _slice_privacy(s: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The run's privacy dict when it has slice-level DP (the site table's epsilon column)."""
    p = s.get("privacy")
    return p if isinstance(p, Mapping) and p.get("slice_level") else None


def _site_table(s: Mapping[str, Any]) -> str:
    rows = []
    privacy = _slice_privacy(s)
    eps_of = privacy.get("epsilon", {}) if privacy else {}
    for i, (name, st) in enumerate(s["sites"].items()):
        rej = st["rejections"]
        eps_cell = f'<td class="eps">{eps(eps_of.get(name))}</td>' if privacy else ""
        rows.append(
            f'<tr data-site="{escape(name)}" data-status="{escape(st["status"])}">'
            f'<td><span class="swatch" data-color="{i % 10}"></span>{escape(name)}</td>'
            f'<td><span class="st {escape(st["status"])}">{escape(st["status"])}</span></td>'
            f"<td>{st['last_round'] if st['last_round'] is not None else '–'}</td>"
            f"<td>{num(st['loss'])}</td><td>{num(st['ssim'])}</td><td>{num(st['nrmse'])}</td>"
            f"<td>{num(st['psnr'], 2)}</td><td>{num(st['seconds'], 1)}</td>"
            f"<td>{nbytes(st['bytes'])}</td>"
            f'<td class="{"bad" if rej else ""}">{rej}</td>{eps_cell}</tr>'
        )
    if not rows:
        return '<p class="empty">No site has replied yet.</p>'
    eps_head = (
        f'<th class="eps" title="slice-level epsilon from the site\'s last accepted train reply">'
        f"ε (δ={escape(delta(privacy.get('delta')))})</th>"
        if privacy
        else ""
    )
    return (
        '<table class="sites"><thead><tr><th>site</th><th>status</th><th>last round</th>'
        "<th>train loss</th><th>val SSIM</th><th>val NRMSE</th><th>val PSNR</th>"
        "<th>train s</th><th>bytes up (total)</th><th>rejections</th>"
        f"{eps_head}</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _charts(s: Mapping[str, Any], prefix: str) -> str:
    order = list(s["sites"])
    colors = {name: color(i) for i, name in enumerate(order)}
    out = []
    for key, title in CHARTS:
        series = {
            site: s["curves"][key].get(site, []) for site in order if site in s["curves"][key]
        }
        out.append(line_chart(title, series, colors=colors, chart_id=f"{prefix}chart-{key}"))
    return '<div class="charts">' + "".join(out) + "</div>"


def _breakdown(s: Mapping[str, Any]) -> str:
    rows: list[tuple[str, dict[str, float]]] = []
    detailed = any(r.get("train") is not None for r in s["timeline"])
    for r in s["timeline"]:
        if detailed:
            site = r.get("site_seconds") or 0.0
            train = r.get("train") or 0.0
            parts = {
                "site": min(site, train),
                "wait": max(0.0, train - site),
                "evaluate": r.get("evaluate") or 0.0,
                "checkpoint": r.get("checkpoint") or 0.0,
            }
        else:
            parts = {"site": r.get("seconds") or 0.0}
        rows.append((str(r["round"]), parts))
    order = BREAKDOWN if detailed else (("site", "round (no breakdown without events)"),)
    chart = stacked_bars("round time", rows, order)
    table_rows = "".join(
        f"<tr><td>{r['round']}</td><td>{num(r['seconds'], 1)}</td>"
        f"<td>{num(r.get('site_seconds'), 1)}</td><td>{nbytes(r['bytes_sent'])}</td>"
        f"<td>{nbytes(r['bytes_received'])}</td></tr>"
        for r in s["timeline"]
    )
    table = (
        '<table class="rounds"><thead><tr><th>round</th><th>seconds</th>'
        "<th>slowest site s</th><th>sent</th><th>received</th></tr></thead><tbody>"
        f"{table_rows}</tbody></table>"
        if table_rows
        else ""
    )
    return f'<div class="breakdown">{chart}{table}</div>'


def _privacy(s: Mapping[str, Any], prefix: str) -> str:
    """The Privacy panel (only for a run with DP): what the figures mean, the largest epsilon so
    far, the site-level epsilon, epsilon against the round per site, why the budget stopped
    the run."""
    p = s.get("privacy")
    if not isinstance(p, Mapping):
        return ""
    facts: list[tuple[str, str]] = []
    kinds = ["slice-level DP-SGD"] if p.get("slice_level") else []
    kinds += ["site-level DP"] if p.get("site_level") else []
    facts.append(("protection", " + ".join(kinds)))
    facts.append(("accountant", str(p.get("accountant") or "?")))
    facts.append(("δ", delta(p.get("delta")) + (" per site" if p.get("slice_level") else "")))
    budget = p.get("epsilon_budget")
    facts.append(("ε budget", eps(budget) if budget is not None else "none"))
    after = f" (after round {p['round']})" if isinstance(p.get("round"), int) else ""
    if p.get("slice_level"):
        facts.append((f"max ε so far, slice-level{after}", eps(p.get("epsilon_max"))))
        if s.get("live") and p.get("epsilon_next_max") is not None:
            facts.append(("max ε after one more round", eps(p.get("epsilon_next_max"))))
    if p.get("site_level"):
        facts.append((f"site-level ε{after}", eps(p.get("site_level_epsilon"))))
    rows = "".join(
        f'<tr><th scope="row">{escape(k)}</th><td>{escape(v)}</td></tr>' for k, v in facts
    )
    table = f'<table class="privacy">{rows}</table>'
    stopped = p.get("stopped")
    stop = (
        f'<p class="stopped"><strong>Stopped early:</strong> {escape(stopped)}</p>'
        if isinstance(stopped, str) and stopped
        else ""
    )
    charts = []
    curves = p.get("curves") or {}
    if p.get("slice_level"):
        order = list(s["sites"]) + sorted(set(curves.get("epsilon", {})) - set(s["sites"]))
        colors = {name: color(i) for i, name in enumerate(order)}
        series = {site: curves["epsilon"][site] for site in order if site in curves["epsilon"]}
        charts.append(
            line_chart(
                f"slice-level ε per site (δ={delta(p.get('delta'))})",
                series,
                colors=colors,
                chart_id=f"{prefix}chart-epsilon",
            )
        )
    if p.get("site_level"):
        charts.append(
            line_chart(
                "site-level ε",
                {"site-level": curves.get("site_level") or []},
                chart_id=f"{prefix}chart-site-epsilon",
            )
        )
    return (
        f'<h3>Privacy</h3><div class="privacy">{stop}{table}'
        f'<div class="charts">{"".join(charts)}</div></div>'
    )


def _rejections(s: Mapping[str, Any]) -> str:
    if not s["rejections"]:
        return '<p class="none">No reply was rejected.</p>'
    rows = "".join(
        f'<tr data-site="{escape(x["site"])}"><td>{x["round"]}</td><td>{escape(x["phase"])}</td>'
        f'<td>{escape(x["site"])}</td><td class="reason">{escape(x["reason"])}</td></tr>'
        for x in s["rejections"]
    )
    return (
        '<table class="rejections"><thead><tr><th>round</th><th>phase</th><th>site</th>'
        f"<th>reason</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _final(s: Mapping[str, Any]) -> str:
    final = s.get("final") or {}
    methods = [m for m in ("federated", "zero_filled", "local_only", "centralized") if final.get(m)]
    if not methods:
        return ""
    sites = sorted({site for m in methods for site in final[m]})
    head = "".join(f'<th colspan="3">{escape(m.replace("_", "-"))}</th>' for m in methods)
    sub = "<th>SSIM</th><th>NRMSE</th><th>PSNR</th>" * len(methods)
    rows = []
    for site in sites:
        cells = ""
        for m in methods:
            v = final[m].get(site) or {}
            cells += f"<td>{num(v.get('ssim'))}</td><td>{num(v.get('nrmse'))}</td>"
            cells += f"<td>{num(v.get('psnr'), 2)}</td>"
        rows.append(f"<tr><td>{escape(site)}</td>{cells}</tr>")
    return (
        "<h3>Final metrics (test slices)</h3>"
        f'<table class="final"><thead><tr><th></th>{head}</tr><tr><th>site</th>{sub}</tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def config_table(config: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><td><code>{escape(k)}</code></td><td><code>{escape(json.dumps(v))}</code></td></tr>"
        for k, v in sorted(config.items())
    )
    return (
        f'<details class="config"><summary>run config ({len(config)} keys)</summary>'
        f'<table class="config"><tbody>{rows}</tbody></table></details>'
    )


def panel_inner(run_id: str, s: Mapping[str, Any], prefix: str = "") -> str:
    """Everything shown for one run (what the live update replaces)."""
    source = (
        '<p class="note">From results.json (this run has no events.jsonl: no live view, no '
        "round-time breakdown).</p>"
        if s.get("source") == "results"
        else ""
    )
    return (
        f'<h2><a href="{run_href(run_id)}">{escape(run_id)}</a> {status_badge(s["status"])}</h2>'
        f"{source}{_progress(s)}"
        f"<h3>Sites</h3>{_site_table(s)}"
        f"<h3>Per-site metrics vs round</h3>{_charts(s, prefix)}"
        f"<h3>Round time</h3>{_breakdown(s)}"
        f"{_privacy(s, prefix)}"
        f"<h3>Rejected replies</h3>{_rejections(s)}"
        f"{_final(s)}"
        f"<h3>Run config</h3>{config_table(s['config'])}"
    )


def panel(run_id: str, s: Mapping[str, Any], version: str, prefix: str = "") -> str:
    live = "1" if s["live"] else "0"
    return (
        f'<section class="panel" data-run="{escape(run_id)}" data-live="{live}" '
        f'data-version="{escape(version)}" data-prefix="{escape(prefix)}">'
        f"{panel_inner(run_id, s, prefix)}</section>"
    )


def run_page(run_id: str, s: Mapping[str, Any], version: str) -> str:
    return page(run_id, panel(run_id, s, version), live=True)


def compare_page(
    a: tuple[str, Mapping[str, Any], str], b: tuple[str, Mapping[str, Any], str]
) -> str:
    (ida, sa, va), (idb, sb, vb) = a, b
    keys = sorted(set(sa["config"]) | set(sb["config"]))
    diff = [k for k in keys if sa["config"].get(k) != sb["config"].get(k)]
    rows = "".join(
        f"<tr><td><code>{escape(k)}</code></td>"
        f"<td><code>{escape(json.dumps(sa['config'].get(k)))}</code></td>"
        f"<td><code>{escape(json.dumps(sb['config'].get(k)))}</code></td></tr>"
        for k in diff
    )
    diff_html = (
        '<table class="config-diff"><thead><tr><th>key</th>'
        f"<th>{escape(ida)}</th><th>{escape(idb)}</th></tr></thead><tbody>{rows}</tbody></table>"
        if diff
        else "<p>Same run config.</p>"
    )
    body = (
        f"<h2>Config differences</h2>{diff_html}{_privacy_compare(a, b)}"
        '<div class="side-by-side">'
        f"{panel(ida, sa, va, 'a-')}{panel(idb, sb, vb, 'b-')}"
        "</div>"
    )
    return page(f"{ida} vs {idb}", body, live=True)


def _privacy_compare(
    a: tuple[str, Mapping[str, Any], str], b: tuple[str, Mapping[str, Any], str]
) -> str:
    """The two runs' largest epsilon so far, when either has DP ("no DP" for the other)."""
    (ida, sa, _), (idb, sb, _) = a, b
    pa, pb = sa.get("privacy"), sb.get("privacy")
    if not isinstance(pa, Mapping) and not isinstance(pb, Mapping):
        return ""

    def cell(p: Any, key: str, on: str) -> str:
        if not isinstance(p, Mapping):
            return "no DP"
        if not p.get(on):
            return "off"
        return eps(p.get(key)) + (
            f" (round {p['round']})" if isinstance(p.get("round"), int) else ""
        )

    def dlt(p: Any) -> str:
        return delta(p.get("delta")) if isinstance(p, Mapping) else "–"

    rows = [
        ("max ε, slice-level", cell(pa, "epsilon_max", "slice_level"),
         cell(pb, "epsilon_max", "slice_level")),
        ("site-level ε", cell(pa, "site_level_epsilon", "site_level"),
         cell(pb, "site_level_epsilon", "site_level")),
        ("δ", dlt(pa), dlt(pb)),
    ]  # fmt: skip
    body = "".join(
        f'<tr><th scope="row">{escape(k)}</th><td>{escape(x)}</td><td>{escape(y)}</td></tr>'
        for k, x, y in rows
    )
    return (
        '<h2>Privacy</h2><table class="privacy-compare"><thead><tr><th></th>'
        f"<th>{escape(ida)}</th><th>{escape(idb)}</th></tr></thead><tbody>{body}</tbody></table>"
    )


# ----------------------------------------------------------------------------- one site (local)
def site_page(site: str, checkpoint: str, slices: Sequence[Mapping[str, Any]], note: str) -> str:
    rows = []
    for item in slices:
        i = item["index"]
        m_zf, m_model = item.get("zero_filled") or {}, item.get("model") or {}
        rows.append(
            f'<figure class="slice" data-index="{i}"><img src="/site/slice/{i}.png" '
            f'alt="slice {i}: zero-filled, model, reference, error maps" loading="lazy">'
            f"<figcaption>{escape(str(item['label']))}"
            + (
                f" · zero-filled SSIM {num(m_zf.get('ssim'))} PSNR {num(m_zf.get('psnr'), 2)}"
                f" · model SSIM {num(m_model.get('ssim'))} PSNR {num(m_model.get('psnr'), 2)}"
                if m_model
                else ""
            )
            + "</figcaption></figure>"
        )
    body = (
        f'<h2>Site {escape(site)}</h2><p class="note">Model {escape(checkpoint)} on this '
        "site's test slices, rendered on this machine: zero-filled, model, reference and "
        f"|error| maps. Nothing here leaves the site. {escape(note)}</p>" + "".join(rows)
    )
    return page(f"site {site}", body)

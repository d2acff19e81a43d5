"""Inline SVG charts drawn in Python: no plotting library, no script, no external asset.

Each chart is a self-contained ``<svg>`` string; series carry ``data-series`` and each point a
``data-x`` attribute, so tests (and people reading the page's source) can count points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

# Colour-blind-safe (Okabe-Ito), then greys.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
    "#777777",
    "#AAAAAA",
)


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    step = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(step))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step), default=step)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-9 * step:
        out.append(round(v, 12))
        v += step
    return out


def line_chart(
    title: str,
    series: Mapping[str, Sequence[Sequence[float]]],
    *,
    x_label: str = "round",
    width: int = 340,
    height: int = 200,
    colors: Mapping[str, str] | None = None,
    chart_id: str = "",
) -> str:
    """One line (and dots) per series of ``[[x, y], ...]`` points; a legend under the plot."""
    pts = [(float(x), float(y)) for s in series.values() for x, y in s]
    left, right, top, bottom = 44, 10, 22, 34
    legend_rows = math.ceil(len(series) / 4) if series else 0
    h = height + 4 + 14 * legend_rows
    pw, ph = width - left - right, height - top - bottom
    head = (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" '
        f'viewBox="0 0 {width} {h}" role="img" aria-label="{escape(title)}"'
        + (f' id="{escape(chart_id)}"' if chart_id else "")
        + ">"
    )
    parts = [head, f'<text class="title" x="{left}" y="14">{escape(title)}</text>']
    if not pts:
        parts.append(f'<text class="empty" x="{left + 8}" y="{top + ph / 2}">no data yet</text>')
        parts.append("</svg>")
        return "".join(parts)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or (abs(y0) * 0.05 or 0.5)
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts.append(
        f'<rect class="frame" x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none"/>'
    )
    for v in _ticks(y0, y1):
        y = sy(v)
        parts.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="tick" x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{_fmt(v)}</text>'
        )
    xticks = sorted({int(x) for x in xs}) if x1 - x0 <= 12 else _ticks(x0, x1, 6)
    for v in xticks:
        x = sx(v)
        label = str(int(v)) if float(v).is_integer() else _fmt(v)
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{top + ph + 13}" text-anchor="middle">'
            f"{label}</text>"
        )
    parts.append(
        f'<text class="axis" x="{left + pw / 2}" y="{top + ph + 27}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    for i, (name, data) in enumerate(series.items()):
        c = (colors or {}).get(name, color(i))
        ordered = sorted((float(x), float(y)) for x, y in data)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ordered)
        sname = escape(name)
        parts.append(f'<g class="series" data-series="{sname}" data-points="{len(ordered)}">')
        if len(ordered) > 1:
            parts.append(
                f'<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{coords}"/>'
            )
        for x, y in ordered:
            parts.append(
                f'<circle class="pt" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{c}" '
                f'data-x="{_fmt(x)}"><title>{sname} round {_fmt(x)}: {y:.4g}</title></circle>'
            )
        parts.append("</g>")
    for i, name in enumerate(series):
        c = (colors or {}).get(name, color(i))
        lx, ly = left + (i % 4) * (pw / 4), height + 12 + 14 * (i // 4)
        parts.append(f'<rect x="{lx:.1f}" y="{ly - 8}" width="10" height="4" fill="{c}"/>')
        parts.append(f'<text class="legend" x="{lx + 13:.1f}" y="{ly - 3}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def stacked_bars(
    title: str,
    rows: Sequence[tuple[str, Mapping[str, float]]],
    parts_order: Sequence[tuple[str, str]],
    *,
    unit: str = "s",
    width: int = 340,
    height: int = 200,
) -> str:
    """One bar per row label, stacked from ``parts_order`` ``(key, label)``; a legend."""
    left, right, top, bottom = 44, 10, 22, 34
    pw, ph = width - left - right, height - top - bottom
    legend_rows = math.ceil(len(parts_order) / 2)
    h = height + 4 + 14 * legend_rows
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" '
        f'viewBox="0 0 {width} {h}" role="img" aria-label="{escape(title)}">',
        f'<text class="title" x="{left}" y="14">{escape(title)}</text>',
    ]
    totals = [sum(max(0.0, v or 0.0) for v in parts.values()) for _, parts in rows]
    if not rows or max(totals, default=0) <= 0:
        out.append(f'<text class="empty" x="{left + 8}" y="{top + ph / 2}">no data yet</text>')
        out.append("</svg>")
        return "".join(out)
    top_v = max(totals) * 1.05
    out.append(f'<rect class="frame" x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none"/>')
    for v in _ticks(0, top_v):
        y = top + (1 - v / top_v) * ph
        out.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(
            f'<text class="tick" x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">'
            f"{_fmt(v)}{escape(unit)}</text>"
        )
    slot = pw / len(rows)
    bw = max(2.0, min(28.0, slot * 0.7))
    every = max(1, math.ceil(len(rows) / 12))
    for i, (label, parts) in enumerate(rows):
        x = left + i * slot + (slot - bw) / 2
        y = top + ph
        out.append(f'<g class="bar" data-label="{escape(label)}">')
        for j, (key, name) in enumerate(parts_order):
            v = max(0.0, parts.get(key) or 0.0)
            bh = v / top_v * ph
            y -= bh
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                f'fill="{color(j)}"><title>{escape(label)} {escape(name)}: {v:.3g}{unit}'
                "</title></rect>"
            )
        out.append("</g>")
        if i % every == 0:
            out.append(
                f'<text class="tick" x="{x + bw / 2:.1f}" y="{top + ph + 13}" '
                f'text-anchor="middle">{escape(label)}</text>'
            )
    out.append(
        f'<text class="axis" x="{left + pw / 2}" y="{top + ph + 27}" text-anchor="middle">'
        "round</text>"
    )
    for j, (_, name) in enumerate(parts_order):
        lx, ly = left + (j % 2) * (pw / 2), height + 12 + 14 * (j // 2)
        out.append(f'<rect x="{lx:.1f}" y="{ly - 8}" width="10" height="6" fill="{color(j)}"/>')
        out.append(f'<text class="legend" x="{lx + 13:.1f}" y="{ly - 2}">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)

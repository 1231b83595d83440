"""HTML of the dashboard: pure functions of the data in `DashboardData`.

No scripts and no external resources (a Content-Security-Policy forbids both); charts are
inline SVG. Pages refresh themselves every 10 seconds.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
REFRESH_S = 10

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em 2em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 .4em; } h2 { font-size: 1.15em; margin: 1.6em 0 .5em; }
a { color: #1f5fa8; } .muted { color: #777; }
table { border-collapse: collapse; margin: .3em 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e3e3; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { padding: 1px 8px; border-radius: 9px; color: #fff; font-size: .85em; }
.status.running { background: #2e9d45; } .status.paused { background: #d68910; }
.status.draft { background: #7f8c8d; } .status.archived { background: #34495e; }
.bar { display: inline-block; height: 12px; vertical-align: middle; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
.alert { padding: 4px 8px; margin: 3px 0; border-left: 4px solid #d68910; background: #fdf6e9; }
.alert.critical { border-color: #c0392b; background: #fbeceb; }
iframe { width: 100%; height: 520px; border: 1px solid #ddd; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _document(title: str, body: Sequence[str]) -> str:
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "style-src 'unsafe-inline'; img-src data:; frame-src 'self'\">",
            f'<meta http-equiv="refresh" content="{REFRESH_S}">',
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
            *body,
            "</body></html>",
        ]
    )


def _status(status: str) -> str:
    return f'<span class="status {_e(status)}">{_e(status)}</span>'


def _share_bar(variants: Sequence[dict[str, Any]], width: int = 220) -> str:
    """One horizontal bar split by allocation share."""
    parts = []
    for i, v in enumerate(variants):
        share = v.get("share")
        if share:
            parts.append(
                f'<span class="bar" style="width:{share * width:.0f}px;'
                f'background:{_color(i)}" title="{_e(v["id"])} {_pct(share)}"></span>'
            )
    return "".join(parts) or '<span class="muted">no allocations</span>'


def overview_page(data: dict[str, Any]) -> str:
    rows = []
    for e in data["experiments"]:
        link = f'<a href="/experiments/{quote(e["id"], safe="")}">{_e(e["id"])}</a>'
        rows.append(
            "<tr>"
            f"<td>{link}</td><td>{_e(e['name'])}</td><td>{_status(e['status'])}</td>"
            f"<td>{_e(e['policy'])}</td><td>{_e(' > '.join(e['segment_by']) or '-')}</td>"
            f'<td class="num">{e["allocations"]:,}</td><td class="num">{e["conversions"]:,}</td>'
            f"<td>{_share_bar(e['variants'])}</td>"
            f'<td class="num">{e["alerts"]}</td>'
            "</tr>"
        )
    table = (
        "<table><tr><th>experiment</th><th>name</th><th>status</th><th>policy</th>"
        '<th>segments</th><th class="num">allocations</th><th class="num">conversions</th>'
        '<th>allocation share</th><th class="num">alerts</th></tr>' + "".join(rows) + "</table>"
        if rows
        else '<p class="muted">No experiments yet.</p>'
    )
    return _document(
        "allocsvc",
        [
            "<h1>allocsvc experiments</h1>",
            '<p class="muted">Read-only. JSON: <a href="/api/experiments">/api/experiments</a>, '
            'metrics: <a href="/metrics">/metrics</a>.</p>',
            table,
        ],
    )


def share_chart(history: dict[str, Any], width: int = 640, height: int = 220) -> str:
    """Allocation share per variant over time, as an inline SVG line chart."""
    points = history["points"]
    variants = history["variants"]
    if len(points) < 2:
        return '<p class="muted">Not enough history yet (one point per sampling interval).</p>'
    left, right, top, bottom = 44, 12, 10, 28
    w, h = width - left - right, height - top - bottom
    t0: int = points[0]["at_ms"]
    t1: int = points[-1]["at_ms"]
    span = max(t1 - t0, 1)

    def x(at: int) -> float:
        return left + w * (at - t0) / span

    def y(share: float) -> float:
        return top + h * (1 - share)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="allocation share over time">',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fafafa" stroke="#ccc"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<line x1="{left}" x2="{left + w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            'stroke="#e5e5e5"/>'
            f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end" '
            f'fill="#666">{tick:.0%}</text>'
        )
    seconds = (t1 - t0) / 1000
    parts.append(
        f'<text x="{left}" y="{height - 8}" font-size="11" fill="#666">-{seconds:.0f} s</text>'
        f'<text x="{left + w}" y="{height - 8}" font-size="11" fill="#666" '
        'text-anchor="end">now</text>'
    )
    for i, _ in enumerate(variants):
        line = " ".join(f"{x(p['at_ms']):.1f},{y(p['shares'][i]):.1f}" for p in points)
        parts.append(
            f'<polyline points="{line}" fill="none" stroke="{_color(i)}" stroke-width="2.5"/>'
        )
    parts.append("</svg>")
    legend = " ".join(
        f'<span><span class="swatch" style="background:{_color(i)}"></span>{_e(v)}</span>'
        for i, v in enumerate(variants)
    )
    return "".join(parts) + f"<p>{legend}</p>"


def _variant_table(variants: Sequence[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr><td><span class="swatch" style="background:{_color(i)}"></span>{_e(v["id"])}</td>'
        f'<td class="num">{v["allocations"]:,}</td><td class="num">{v["conversions"]:,}</td>'
        f'<td class="num">{_pct(v["conversion_rate"])}</td>'
        f'<td class="num">{_pct(v["share"])}</td></tr>'
        for i, v in enumerate(variants)
    )
    return (
        '<table><tr><th>variant</th><th class="num">allocations</th>'
        '<th class="num">conversions</th><th class="num">rate</th><th class="num">share</th></tr>'
        f"{rows}</table>"
    )


def _segment_table(data: dict[str, Any]) -> str:
    ids = [v["id"] for v in data["variants"]]
    head = "".join(f'<th class="num">{_e(v)} alloc / rate</th>' for v in ids)
    rows = []
    for s in data["segments"]:
        cells = "".join(
            f'<td class="num">{v["allocations"]:,} / {_pct(v["conversion_rate"])}</td>'
            for v in s["variants"]
        )
        rows.append(
            f"<tr><td>{_e(s['segment_key'] or '(global)')}</td>"
            f'<td class="num">{s["level"]}</td>{cells}</tr>'
        )
    more = data["segments_total"] - len(data["segments"])
    note = f'<p class="muted">{more} smaller segments not shown.</p>' if more > 0 else ""
    return (
        f'<table><tr><th>segment</th><th class="num">level</th>{head}</tr>'
        + "".join(rows)
        + "</table>"
        + note
    )


def _alerts(alerts: Sequence[dict[str, Any]]) -> str:
    if not alerts:
        return '<p class="muted">No alerts.</p>'
    return "".join(
        f'<div class="alert {_e(a["severity"])}"><b>{_e(a["severity"])}</b> '
        f"{_e(a['kind'])}: {_e(a['message'])}</div>"
        for a in alerts
    )


def _recommendations(items: Sequence[dict[str, Any]]) -> str:
    if not items:
        return '<p class="muted">No recommendations.</p>'
    rows = "".join(
        f"<tr><td>{_e(r['status'])}</td><td>{_e(r['kind'])}</td>"
        f"<td>{_e(', '.join(r['dimensions']) or '-')}</td><td>{_e(r['reason'])}</td></tr>"
        for r in items
    )
    return (
        "<table><tr><th>status</th><th>kind</th><th>dimensions</th><th>reason</th></tr>"
        f"{rows}</table>"
    )


def _cascade(levels: Sequence[dict[str, Any]]) -> str:
    if not levels:
        return '<p class="muted">No allocations yet.</p>'
    rows = "".join(
        f'<tr><td class="num">{c["level"]}</td><td>{_e(c["name"])}</td>'
        f'<td class="num">{c["allocations"]:,}</td><td class="num">{_pct(c["share"])}</td></tr>'
        for c in levels
    )
    return (
        '<table><tr><th class="num">level</th><th>name</th><th class="num">allocations</th>'
        f'<th class="num">share</th></tr>{rows}</table>'
    )


def experiment_page(data: dict[str, Any], has_tree: bool) -> str:
    key = quote(data["id"], safe="")
    tree = (
        f'<iframe src="/experiments/{key}/tree" title="segment tree"></iframe>'
        if has_tree
        else '<p class="muted">Segmentation is off: no segment tree.</p>'
    )
    return _document(
        f"allocsvc: {data['id']}",
        [
            '<p><a href="/">all experiments</a></p>',
            f"<h1>{_e(data['id'])} {_status(data['status'])}</h1>",
            f"<p>{_e(data['name'])}. Policy {_e(data['policy'])}; segments "
            f"{_e(' > '.join(data['segment_by']) or 'off')}. {_e(data['description'])}</p>",
            f'<p class="muted">JSON: <a href="/api/experiments/{key}">'
            f"/api/experiments/{_e(data['id'])}</a></p>",
            "<h2>Variants</h2>",
            _variant_table(data["variants"]),
            "<h2>Allocation share over time</h2>",
            share_chart(data["history"]),
            "<h2>Alerts</h2>",
            _alerts(data["alerts"]),
            f"<p>Early stopping: {_e(data['early_stopping'])}</p>",
            "<h2>Recommendations</h2>",
            _recommendations(data["recommendations"]),
            "<h2>Cascade levels used</h2>",
            _cascade(data["cascade"]),
            "<h2>Segments</h2>",
            _segment_table(data),
            "<h2>Segment tree</h2>",
            tree,
        ],
    )


def error_page(status: str, message: str) -> str:
    return _document(status, [f"<h1>{_e(status)}</h1>", f"<p>{_e(message)}</p>"])

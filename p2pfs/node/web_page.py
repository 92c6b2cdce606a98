"""The estate view's page: server-rendered HTML with its style and an SVG chart inline.

Nothing is fetched from elsewhere (no CDN, no script: the estate may have no way out),
every text from a node is escaped (a summary is a peer's word), and the page reloads
itself every few seconds with a meta refresh, so it works with scripting off.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

from p2pfs.sizes import format_size

REFRESH_S = 5
CHART_W, CHART_H = 720, 160
SOURCES = (("local", "#4c9a2a"), ("peers", "#2a6f9a"), ("origin", "#c2702a"))

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em}
.meta{color:#666;margin-bottom:1em}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.state-this-node,.state-connected{color:#2c7a2c;font-weight:600}
.state-unreachable,.state-quarantined,.state-revoked,.state-rejected{color:#b00020;font-weight:600}
.state-not-connected,.state-candidate,.state-connecting{color:#8a6d00;font-weight:600}
.problem{color:#b00020}
.legend span{display:inline-block;width:.8em;height:.8em;margin:0 .3em 0 1em}
svg{background:#fff;border:1px solid #ddd}
ul{margin:0;padding-left:1.1em}
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _ago(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 5400:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def _cache(n: dict[str, Any]) -> str:
    used = format_size(n["cache_bytes"])
    quota = n.get("cache_quota")
    if not quota:
        return f"{used} (no quota)"
    return f"{used} of {format_size(quota)} ({100 * n['cache_bytes'] // quota} %)"


def _volumes(n: dict[str, Any]) -> str:
    items = []
    for v in n.get("volumes", []):
        snap = (v["snapshot"] or "")[:12]
        access = "" if v["access"] == "public" else f", {_e(v['access'])}"
        items.append(
            f'<li class="volume">{_e(v["name"])} <small>#{_e(v["seq"])} '
            f"{_e(snap)}{access}</small></li>"
        )
    return f"<ul>{''.join(items)}</ul>" if items else "—"


def _events(n: dict[str, Any]) -> str:
    parts = []
    if n.get("corrupt_chunks_rejected"):
        parts.append(f"{n['corrupt_chunks_rejected']} corrupt chunks rejected")
    if n.get("quarantined_peers"):
        parts.append(f"{n['quarantined_peers']} peers quarantined")
    parts += n.get("problems", [])
    if not parts:
        return "none"
    return "<ul>" + "".join(f'<li class="problem">{_e(p)}</li>' for p in parts) + "</ul>"


def _sources(n: dict[str, Any]) -> str:
    b = n["bytes_from"]
    return "<br>".join(f"{k}: {format_size(b[k])}" for k, _ in SOURCES) + (
        f"<br>served: {format_size(n['bytes_served'])}"
    )


def _row(n: dict[str, Any]) -> str:
    state = n["state"]
    cls = "state-" + state.replace(" ", "-")
    heard = "" if state == "this node" else f"<br><small>heard {_ago(n['heard_s_ago'])}</small>"
    head = (
        f'<tr class="node" data-node="{_e(n["node_id"])}" data-state="{_e(state)}">'
        f"<td><b>{_e(n.get('name', '?'))}</b><br><small>{_e(n['node_id'][:16])}</small></td>"
        f'<td class="{_e(cls)}">{_e(state)}{heard}</td>'
    )
    if "name" not in n:  # never heard from
        return head + '<td colspan="7">no summary heard from this node</td></tr>'
    ready = "yes" if n["offline_ready"] else "<b>no</b>"
    return head + (
        f"<td>{_e(n['site'] or '—')}</td>"
        f"<td>{_e(n['version'])}</td>"
        f"<td>{_volumes(n)}</td>"
        f'<td class="num">{_cache(n)}</td>'
        f"<td>{ready} ({_e(n['pins'])} pins)</td>"
        f"<td>{_events(n)}</td>"
        f'<td class="num">{_sources(n)}</td>'
        "</tr>"
    )


def chart_svg(series: list[dict[str, int]], now: int, interval: int = 60, slots: int = 60) -> str:
    """Stacked bars of bytes read per interval by source, over the last ``slots``."""
    first = (now // interval - slots + 1) * interval
    shown = [p for p in series if p["t"] >= first]
    if not shown:
        return '<p id="chart-empty">No reads in the last hour.</p>'
    peak = max(sum(p[k] for k, _ in SOURCES) for p in shown) or 1
    width = CHART_W / slots
    plot = CHART_H - 16  # room for the time axis below
    bars = []
    for point in shown:
        x = (point["t"] - first) // interval * width
        y = float(plot)
        label = time.strftime("%H:%M", time.localtime(point["t"]))
        for key, colour in SOURCES:
            h = plot * point[key] / peak
            if h <= 0:
                continue
            y -= h
            bars.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(width - 1, 1):.1f}" '
                f'height="{h:.1f}" fill="{colour}"><title>{label} {key}: '
                f"{format_size(point[key])}</title></rect>"
            )
    start = time.strftime("%H:%M", time.localtime(first))
    axis = (
        f'<line x1="0" y1="{plot}" x2="{CHART_W}" y2="{plot}" stroke="#999"/>'
        f'<text x="2" y="{CHART_H - 3}" font-size="11">{start}</text>'
        f'<text x="{CHART_W - 2}" y="{CHART_H - 3}" font-size="11" text-anchor="end">now</text>'
        f'<text x="2" y="12" font-size="11">{format_size(peak)} per minute</text>'
    )
    return (
        f'<svg id="chart" role="img" width="{CHART_W}" height="{CHART_H}" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>Bytes read per minute by source, last hour (peak {format_size(peak)})</title>"
        f"{axis}{''.join(bars)}</svg>"
    )


def render(view: dict[str, Any]) -> str:
    nodes = view["nodes"]
    volumes = sorted({v["name"] for n in nodes for v in n.get("volumes", [])})
    legend = "".join(f'<span style="background:{c}"></span>{k}' for k, c in SOURCES)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(view["generated_at"]))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>p2pfs estate {_e((view["estate"] or "none")[:16])}</title>
<style>{STYLE}</style></head>
<body>
<h1>p2pfs estate <code>{_e((view["estate"] or "(not enrolled)")[:16])}</code></h1>
<div class="meta">{len(nodes)} nodes, seen from {_e(view["node_id"][:16])} at {_e(when)};
volumes: <span id="volumes">{_e(", ".join(volumes) or "none")}</span>.
This page reloads every {REFRESH_S} s.</div>
<h2>Where bytes came from (last hour, estate-wide)</h2>
<div class="legend">{legend}</div>
{chart_svg(view["chart"], view["generated_at"])}
<h2>Nodes</h2>
<table id="nodes">
<tr><th>node</th><th>state</th><th>site</th><th>version</th><th>volumes (snapshot)</th>
<th>cache</th><th>offline-ready</th><th>corruption, quarantine, problems</th>
<th>bytes by source</th></tr>
{"".join(_row(n) for n in nodes)}
</table>
</body></html>
"""

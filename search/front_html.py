"""An interactive, self-contained HTML scatter of a search: every trial, the front highlighted.

MLflow has no Pareto view; this file, logged next to front.png, opens in MLflow's artifact
viewer or any browser without network access (inline SVG, no scripts from elsewhere).
Hovering a point shows the trial's record; the table below lists every trial, front first.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from prunetune.search.pareto import Objective, objective_values

W, H, PAD = 760, 480, 60
STYLE = {"front": ("#d62728", "#000", 6.5), "finished": ("#9a9a9a", "none", 4.5), "stopped": ("none", "#555", 4.5),
         "parent": ("#f2c200", "#000", 9)}


def _label(rec: Mapping[str, Any], keys: Sequence[str]) -> str:
    parts = []
    for k in keys:
        v = rec.get(k)
        if v is None or v == "":
            continue
        parts.append(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    return "\n".join(parts)


def _scale(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return lo - pad, hi + pad


def render_front_html(records: Sequence[Mapping[str, Any]], front_ids: set[str], objectives: Sequence[Objective],
                      *, title: str, parent: Mapping[str, float] | None = None,
                      extra_keys: Sequence[str] = ("policy", "test_acc", "cka", "params", "latency_ms", "status", "stop_reason")) -> str:
    """The page as a string; x is the cost ("min") objective when the first two differ in mode."""
    first, second = objectives[0], objectives[1]
    xo, yo = (second, first) if first.mode == "max" and second.mode == "min" else (first, second)
    points = []
    for r in records:
        v = objective_values(r, [xo, yo])
        if v is None:
            continue
        kind = "front" if r.get("trial_id") in front_ids else ("finished" if r.get("status") == "finished" else "stopped")
        points.append((v[0], v[1], kind, r))
    if parent is not None and xo.metric in parent and yo.metric in parent:
        points.append((float(parent[xo.metric]), float(parent[yo.metric]), "parent", {"trial_id": "parent", **parent}))
    keys = ["trial_id", yo.metric, xo.metric, *[k for k in extra_keys if k not in (xo.metric, yo.metric)]]
    svg = _svg(points, xo, yo, keys) if points else "<p>no trial has both plotted values yet</p>"
    rows = sorted((p for p in points if p[2] != "parent"), key=lambda p: ({"front": 0, "finished": 1}.get(p[2], 2), p[0]))
    table = "".join("<tr class='{}'>{}</tr>".format(
        p[2], "".join(f"<td>{html.escape(_cell(p[3].get(k)))}</td>" for k in keys)) for p in rows)
    counts = {k: sum(p[2] == k for p in points) for k in ("front", "finished", "stopped")}
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:20px}} td,th{{padding:2px 8px;text-align:right;font-size:13px}}
tr.front td{{font-weight:bold;color:#a01010}} tr.stopped td{{color:#777}} circle:hover{{stroke-width:2.5}}</style></head>
<body><h3>{html.escape(title)}</h3>
<p>{counts['front']} on the front, {counts['finished'] + counts['front']} finished, {counts['stopped']} stopped or
unfinished (hollow). Hover a point for its record.</p>
{svg}
<table><tr>{''.join(f'<th>{html.escape(k)}</th>' for k in keys)}</tr>{table}</table></body></html>
"""


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _svg(points, xo: Objective, yo: Objective, keys: Sequence[str]) -> str:
    (x0, x1), (y0, y1) = _scale([p[0] for p in points]), _scale([p[1] for p in points])

    def sx(x):
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def sy(y):
        return H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)

    out = [f'<svg width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg">',
           f'<rect x="{PAD}" y="{PAD}" width="{W - 2 * PAD}" height="{H - 2 * PAD}" fill="none" stroke="#ccc"/>']
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{H - PAD + 16}" font-size="11" text-anchor="middle">{xv:.4g}</text>')
        out.append(f'<text x="{PAD - 6}" y="{sy(yv) + 4:.1f}" font-size="11" text-anchor="end">{yv:.4g}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 15}" font-size="13" text-anchor="middle">{xo.metric} ({xo.mode})</text>')
    out.append(f'<text x="15" y="{H / 2}" font-size="13" text-anchor="middle" '
               f'transform="rotate(-90 15 {H / 2})">{yo.metric} ({yo.mode})</text>')
    front = sorted((p for p in points if p[2] == "front"), key=lambda p: p[0])
    if len(front) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _, _ in front)
        out.append(f'<polyline points="{path}" fill="none" stroke="#d62728" stroke-width="1.2"/>')
    for x, y, kind, rec in sorted(points, key=lambda p: ["stopped", "finished", "front", "parent"].index(p[2])):
        fill, stroke, r = STYLE[kind]
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r}" fill="{fill}" stroke="{stroke}">'
                   f'<title>{html.escape(_label(rec, keys))}</title></circle>')
    out.append("</svg>")
    return "\n".join(out)

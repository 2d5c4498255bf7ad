"""The plot of BENCHMARKS.md as SVG, written with plain Python (no plotting dependency).

Three panels: the cost ratios (bar = median, dots = the rounds), p50/p99 latency on a log
scale, and Envoy's RSS against the number of distinct tokens in the memory runs.
"""

from __future__ import annotations

import math
from html import escape

from msrbench import report

WIDTH, LEFT, RIGHT, ROW = 900, 330, 90, 26
SHORT = {
    "none": "none (no filter)",
    "noop": "noop (hand-made wasm no-op)",
    "sdk_noop": "sdk_noop (Rust SDK no-op)",
    "minimal": "minimal (SDK, VM HashMap)",
    "lua": "lua (Envoy Lua, same routing)",
    "hit": "hit (matrix-sync-router, cached)",
    "hit_trusted": "hit_trusted (msr, trust_route_match)",
    "hit_shipped": "hit_shipped (msr, envoy.yaml options)",
    "other_path": "other_path (msr, non-sync, filter on)",
    "other_off": "other_off (msr, non-sync, filter off)",
}
COLOURS = {
    "bar": "#4c78a8",
    "dot": "#222",
    "p50": "#4c78a8",
    "p99": "#f58518",
    "lines": ["#4c78a8", "#f58518", "#54a24b"],
}


def _text(x, y, s, size=12, anchor="start", weight="normal") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'font-weight="{weight}">{escape(str(s))}</text>'
    )


def _line(x1, y1, x2, y2, colour="#999", dash="") -> str:
    d = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}"{d}/>'


def _ratios(r: report.Results, top: float) -> tuple[list[str], float]:
    rows = report.cost_rows(r)
    hi = max([1.1] + [x for row in rows for x in row["ratios"]])
    plot_w = WIDTH - LEFT - RIGHT

    def sx(v):
        return LEFT + plot_w * v / hi

    out = [
        _text(
            10,
            top + 16,
            "Throughput ratio to no filter (Envoy CPU/req of none ÷ "
            "variant's; bar: median, dots: rounds)",
            14,
            weight="bold",
        )
    ]
    y0 = top + 30
    for i, row in enumerate(rows):
        y = y0 + i * ROW
        out.append(_text(LEFT - 8, y + 16, SHORT.get(row["variant"], row["variant"]), 11, "end"))
        if not math.isnan(row["ratio"]):
            out.append(
                f'<rect x="{LEFT}" y="{y + 4}" width="{sx(row["ratio"]) - LEFT:.1f}" '
                f'height="{ROW - 8}" fill="{COLOURS["bar"]}" opacity="0.75"/>'
            )
            out.append(_text(LEFT + plot_w + 10, y + 16, f"{row['ratio']:.2f}", 11))
        for x in row["ratios"]:
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{y + ROW / 2:.1f}" r="2.5" fill="{COLOURS["dot"]}"/>'
            )
    bottom = y0 + len(rows) * ROW
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(_line(sx(v), y0, sx(v), bottom, dash="" if v in (0, 1.0) else "3,3"))
        out.append(_text(sx(v), bottom + 14, f"{v:g}", 11, "middle"))
    return out, bottom + 30


def _latency(r: report.Results, top: float) -> tuple[list[str], float]:
    names = {
        "msr": "matrix-sync-router",
        "minimal": "minimal SDK",
        "lua": "Envoy Lua",
        "none": "no filter",
        "whoami direct": "Synapse whoami (no proxy)",
    }
    kinds = {"miss": "new token", "hit": "cached"}
    items = [
        (f"{names[d]}, {kinds[k]}", v)
        for d in names
        if d in r.latency
        for k, v in r.latency[d].items()
        if v.get("n")
    ]
    out = [
        _text(
            10,
            top + 16,
            "Latency, one request at a time (ms, log scale; blue p50, orange p99)",
            14,
            weight="bold",
        )
    ]
    if not items:
        return out, top + 30
    lo = min(v["p50"] for _, v in items)
    lo_exp = math.floor(math.log10(max(lo, 1e-3)))
    hi_exp = math.ceil(math.log10(max(v["p99"] for _, v in items)))
    hi_exp = max(hi_exp, lo_exp + 1)
    plot_w = WIDTH - LEFT - RIGHT

    def sx(ms):
        return LEFT + plot_w * (math.log10(max(ms, 10**lo_exp)) - lo_exp) / (hi_exp - lo_exp)

    y0 = top + 30
    for i, (label, v) in enumerate(items):
        y = y0 + i * ROW
        out.append(_text(LEFT - 8, y + 16, label, 11, "end"))
        out.append(
            f'<rect x="{LEFT}" y="{y + 4}" width="{sx(v["p99"]) - LEFT:.1f}" '
            f'height="{ROW - 8}" fill="{COLOURS["p99"]}" opacity="0.6"/>'
        )
        out.append(
            f'<rect x="{LEFT}" y="{y + 4}" width="{sx(v["p50"]) - LEFT:.1f}" '
            f'height="{ROW - 8}" fill="{COLOURS["p50"]}"/>'
        )
        out.append(_text(sx(v["p99"]) + 4, y + 16, f"{v['p50']:.2f} / {v['p99']:.2f}", 11))
    bottom = y0 + len(items) * ROW
    for e in range(lo_exp, hi_exp + 1):
        out.append(_line(sx(10**e), y0, sx(10**e), bottom, dash="3,3"))
        out.append(_text(sx(10**e), bottom + 14, f"{10**e:g}", 11, "middle"))
    return out, bottom + 30


def _memory(r: report.Results, top: float) -> tuple[list[str], float]:
    out = [
        _text(
            10,
            top + 16,
            "Envoy VmRSS (MiB) against distinct tokens sent, per cache_capacity",
            14,
            weight="bold",
        )
    ]
    series = [(str(m["capacity"] or "default"), m["series"]) for m in r.memory if m["series"]]
    if not series:
        return out, top + 30
    height = 180
    x_max = max(c for _, s in series for c, _ in s) or 1
    ys = [b / 2**20 for _, s in series for _, b in s]
    y_lo, y_hi = math.floor(min(ys) / 10) * 10, math.ceil(max(ys) / 10) * 10 + 10
    plot_w = WIDTH - LEFT - RIGHT
    y0 = top + 30

    def sx(c):
        return LEFT + plot_w * c / x_max

    def sy(b):
        return y0 + height - height * (b / 2**20 - y_lo) / (y_hi - y_lo)

    out.append(_line(LEFT, y0 + height, LEFT + plot_w, y0 + height))
    out.append(_line(LEFT, y0, LEFT, y0 + height))
    for k in range(5):
        mb = y_lo + (y_hi - y_lo) * k / 4
        y = y0 + height - height * k / 4
        out.append(_text(LEFT - 6, y + 4, f"{mb:.0f}", 11, "end"))
        c = x_max * k / 4
        out.append(
            _text(
                sx(c), y0 + height + 14, f"{round(c, -2 if x_max > 1000 else 0):,.0f}", 11, "middle"
            )
        )
    for i, (label, s) in enumerate(series):
        colour = COLOURS["lines"][i % len(COLOURS["lines"])]
        pts = " ".join(f"{sx(c):.1f},{sy(b):.1f}" for c, b in s)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out.append(
            _text(LEFT - 8, y0 + 20 + i * 16, f"cache_capacity {label}", 11, "end").replace(
                "<text", f'<text fill="{colour}"'
            )
        )
    return out, y0 + height + 40


def svg(r: report.Results) -> str:
    parts, y = _ratios(r, 0)
    more, y = _latency(r, y)
    parts += more
    more, y = _memory(r, y)
    parts += more
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{y:.0f}" '
        f'viewBox="0 0 {WIDTH} {y:.0f}" font-family="sans-serif">\n'
        f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n"
    )

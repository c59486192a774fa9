"""Charts as inline SVG strings.

Why hand-drawn SVG: the same markup serves the live app and the self-contained report, needs no network asset, no
JavaScript and no matplotlib start-up per request, and stays sharp at any zoom. Every label (dataset names, filter
reasons) comes from data and is escaped.
"""
from __future__ import annotations

import math
from html import escape

import numpy as np

W, H = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 44, 42
PALETTE = ["#2f6fb0", "#d0603a", "#3b9a5a", "#8a5cb8", "#b8902c", "#4aa3a8", "#b84a7a", "#6b6b6b"]


def _num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e3:
        return f"{v / 1e3:.3g}k"
    return f"{v:.3g}"


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _frame(title: str, body: list[str], legend: list[tuple[str, str]] = ()) -> str:
    parts = [f'<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
             f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(title)}</title>",
             f'<text x="{LEFT}" y="18" class="ct">{escape(title)}</text>']
    x = LEFT
    for label, color in legend:
        parts.append(f'<rect x="{x}" y="25" width="10" height="10" fill="{color}"/>'
                     f'<text x="{x + 14}" y="34" class="cl">{escape(label)}</text>')
        x += 24 + 7 * len(label)
    return "".join(parts + body + ["</svg>"])


def _axes(xlo, xhi, ylo, yhi, xlabel: str, ylabel: str, xticks: list[float] | None = None
          ) -> tuple[list[str], callable, callable]:
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(v):
        return LEFT + (v - xlo) / ((xhi - xlo) or 1) * pw

    def sy(v):
        return TOP + ph - (v - ylo) / ((yhi - ylo) or 1) * ph

    out = [f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}" class="ax"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}" class="ax"/>']
    for t in ticks(xlo, xhi) if xticks is None else xticks:
        out.append(f'<line x1="{sx(t):.1f}" y1="{TOP + ph}" x2="{sx(t):.1f}" y2="{TOP + ph + 4}" class="ax"/>'
                   f'<text x="{sx(t):.1f}" y="{TOP + ph + 16}" class="tk" text-anchor="middle">'
                   f"{escape(_num(t))}</text>")
    for t in ticks(ylo, yhi, 4):
        out.append(f'<line x1="{LEFT}" y1="{sy(t):.1f}" x2="{LEFT + pw}" y2="{sy(t):.1f}" class="gr"/>'
                   f'<text x="{LEFT - 6}" y="{sy(t) + 4:.1f}" class="tk" text-anchor="end">{escape(_num(t))}</text>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 6}" class="tk" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text x="12" y="{TOP + ph / 2}" class="tk" text-anchor="middle" '
               f'transform="rotate(-90 12 {TOP + ph / 2})">{escape(ylabel)}</text>')
    return out, sx, sy


def histogram(title: str, series: list[tuple[str, np.ndarray, np.ndarray]], xlabel: str) -> str:
    """Overlaid step histograms, each normalised to its own total so that series of different sizes compare
    (one positive per query against several negatives)."""
    series = [(label, e, c) for label, e, c in series if c.sum() > 0]
    if not series:
        return empty(title)
    xlo = min(float(e[0]) for _, e, _ in series)
    xhi = max(float(e[-1]) for _, e, _ in series)
    yhi = max(float((c / c.sum()).max()) for _, _, c in series) * 1.08
    body, sx, sy = _axes(xlo, xhi, 0, yhi, xlabel, "share")
    legend = []
    for k, (label, edges, counts) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        share = counts / counts.sum()
        pts = [f"{sx(edges[0]):.1f},{sy(0):.1f}"]
        for i, s in enumerate(share):
            pts += [f"{sx(edges[i]):.1f},{sy(s):.1f}", f"{sx(edges[i + 1]):.1f},{sy(s):.1f}"]
        pts.append(f"{sx(edges[-1]):.1f},{sy(0):.1f}")
        body.append(f'<polygon points="{" ".join(pts)}" fill="{color}" fill-opacity="0.28" stroke="{color}" '
                    f'stroke-width="1.4"/>')
        legend.append((label, color))
    return _frame(title, body, legend)


def bars(title: str, items: list[tuple[str, float]], xlabel: str = "") -> str:
    """Horizontal bars, one per labelled value, labels and values printed."""
    if not items:
        return empty(title)
    row = 20
    height = TOP + row * len(items) + 24
    label_w = min(200, 8 + 7 * max(len(str(k)) for k, _ in items))
    vmax = max(v for _, v in items) or 1
    pw = W - label_w - 70
    parts = [f'<svg class="chart" viewBox="0 0 {W} {height}" width="{W}" height="{height}" role="img" '
             f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(title)}</title>", f'<text x="8" y="18" class="ct">{escape(title)}</text>']
    for i, (label, value) in enumerate(items):
        y = TOP + i * row
        shown = str(label) if len(str(label)) <= 28 else str(label)[:27] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" class="tk" text-anchor="end">{escape(shown)}'
                     f"<title>{escape(str(label))}</title></text>"
                     f'<rect x="{label_w}" y="{y + 3}" width="{max(1.0, value / vmax * pw):.1f}" height="{row - 6}" '
                     f'fill="{PALETTE[0]}"/>'
                     f'<text x="{label_w + value / vmax * pw + 4:.1f}" y="{y + 14}" class="tk">'
                     f"{escape(_num(value))}</text>")
    if xlabel:
        parts.append(f'<text x="{label_w}" y="{height - 6}" class="tk">{escape(xlabel)}</text>')
    return "".join(parts + ["</svg>"])


def lines(title: str, xs: list[int], series: list[tuple[str, list[float | None]]], xlabel: str, ylabel: str) -> str:
    """One line per series over integer x (epochs); missing values break nothing, they are skipped."""
    vals = [v for _, ys in series for v in ys if v is not None]
    if not xs or not vals:
        return empty(title)
    ylo, yhi = min(0.0, min(vals)), max(vals)
    pad = (yhi - ylo) * 0.08 or 1.0
    step = max(1, math.ceil((max(xs) - min(xs)) / 10))
    body, sx, sy = _axes(min(xs), max(max(xs), min(xs) + 1), ylo, yhi + pad, xlabel, ylabel,
                         list(range(min(xs), max(max(xs), min(xs) + 1) + 1, step)))
    legend = []
    for k, (label, ys) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        pts = [(sx(x), sy(y)) for x, y in zip(xs, ys) if y is not None]
        body.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}" fill="none" '
                    f'stroke="{color}" stroke-width="2"/>')
        body += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in pts]
        legend.append((label, color))
    return _frame(title, body, legend)


def tradeoff(title: str, curve: list[dict], chosen: float | None) -> str:
    """The false-negative trade-off of one dataset: as the estimated FN rate (x) goes down, how many queries stay
    full and how hard their negatives are; the dashed line marks the thresholds in use."""
    pts = sorted((100 * c["fn_rate"], c["queries_full"], c["mean_neg_score"]) for c in curve
                 if c.get("fn_rate") is not None)
    if not pts:
        return empty(title)
    xhi = max(max(p[0] for p in pts), 100 * (chosen or 0), 1.0)
    ylo = min(0.0, min(p[2] for p in pts))
    body, sx, sy = _axes(0, xhi * 1.05, ylo, 1.0, "estimated false-negative rate (%)", "share / score")
    legend = []
    for k, (label, col) in enumerate((("queries full", 1), ("mean negative score", 2))):
        color = PALETTE[k]
        body.append(f'<polyline points="{" ".join(f"{sx(p[0]):.1f},{sy(p[col]):.1f}" for p in pts)}" fill="none" '
                    f'stroke="{color}" stroke-width="2"/>')
        body += [f'<circle cx="{sx(p[0]):.1f}" cy="{sy(p[col]):.1f}" r="2.5" fill="{color}"/>' for p in pts]
        legend.append((label, color))
    if chosen is not None:
        x = sx(100 * chosen)
        body.append(f'<line x1="{x:.1f}" y1="{sy(1.0):.1f}" x2="{x:.1f}" y2="{sy(ylo):.1f}" stroke="#444" '
                    f'stroke-dasharray="4 3"/>')
        legend.append(("in use", "#444"))
    return _frame(title, body, legend)


def fn_estimate(est: dict) -> str:
    """'2.10% [1.20, 3.40] on 812 pairs': an estimated FN rate with its 95% interval."""
    if est.get("fn_rate") is None:
        return "no estimate"
    return (f"{100 * est['fn_rate']:.2f}% [{100 * est['low']:.2f}, {100 * est['high']:.2f}] "
            f"on {est['pairs']} pairs")


def empty(title: str) -> str:
    return _frame(title, [f'<text x="{W / 2}" y="{H / 2}" class="tk" text-anchor="middle">no data</text>'])

"""Charts as inline SVG, rendered on the server (no script, no external asset).

Colours come from CSS classes (``s0`` ... ``s5``) so the page's stylesheet themes them and
the Content-Security-Policy needs no inline styles. Every chart has a ``<title>`` and a
``<desc>`` for screen readers; pages also show the numbers in a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

W, H = 720, 220
PAD_L, PAD_R, PAD_T, PAD_B = 48, 12, 14, 34


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    values: Sequence[float]
    css: str = "s0"


def _nice_max(value: float) -> float:
    if value <= 4:
        return 4.0  # counts: whole-number grid lines
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 2.5, 5, 10):
        top = step * magnitude
        if top >= value:
            return float(top)
    return float(10 * magnitude)


def _fmt(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:g}"


def _frame(title: str, desc: str, top: float, labels: Sequence[str], ident: str) -> list[str]:
    inner_h = H - PAD_T - PAD_B
    out = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" '
           f'aria-labelledby="{ident}-t {ident}-d" xmlns="http://www.w3.org/2000/svg">',
           f'<title id="{ident}-t">{escape(title)}</title>',
           f'<desc id="{ident}-d">{escape(desc)}</desc>']
    for i in range(5):
        y = PAD_T + inner_h * i / 4
        out.append(f'<line class="grid" x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" '
                   f'y2="{y:.1f}"/>')
        out.append(f'<text class="axis" x="{PAD_L - 6}" y="{y + 4:.1f}" '
                   f'text-anchor="end">{_fmt(top * (4 - i) / 4)}</text>')
    n = len(labels)
    if n:
        step = max(1, n // 6)
        for i in range(0, n, step):
            x = PAD_L + (W - PAD_L - PAD_R) * (i + 0.5) / n
            out.append(f'<text class="axis" x="{x:.1f}" y="{H - PAD_B + 16}" '
                       f'text-anchor="middle">{escape(labels[i])}</text>')
    return out


def _legend(series: Sequence[Series]) -> str:
    x = PAD_L
    out = []
    for s in series:
        out.append(f'<rect class="{s.css}" x="{x}" y="{H - 12}" width="10" height="10"/>'
                   f'<text class="legend" x="{x + 14}" y="{H - 3}">{escape(s.name)}</text>')
        x += 24 + 7 * len(s.name)
    return "".join(out)


def stacked_bars(series: Sequence[Series], labels: Sequence[str], *, title: str,
                 ident: str) -> Markup:
    """One bar per label, the series stacked bottom to top."""
    n = len(labels)
    totals = [sum(s.values[i] for s in series) for i in range(n)]
    top = _nice_max(max(totals, default=0))
    desc = f"{n} buckets from {labels[0]} to {labels[-1]}" if n else "no data"
    out = _frame(title, desc, top, labels, ident)
    inner_w, inner_h = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    bar = inner_w / max(n, 1)
    for i in range(n):
        base = 0.0
        x = PAD_L + bar * i + bar * 0.1
        for s in series:
            v = s.values[i]
            if v <= 0:
                continue
            h = inner_h * v / top
            y = PAD_T + inner_h - inner_h * base / top - h
            out.append(f'<rect class="{s.css}" x="{x:.1f}" y="{y:.1f}" width="{bar * 0.8:.1f}" '
                       f'height="{h:.1f}"><title>{escape(labels[i])} {escape(s.name)}: '
                       f'{v:g}</title></rect>')
            base += v
    out.append(_legend(series))
    out.append("</svg>")
    return Markup("".join(out))


def lines(series: Sequence[Series], labels: Sequence[str], *, title: str,
          ident: str) -> Markup:
    """One polyline per series over the labels."""
    n = len(labels)
    top = _nice_max(max((max(s.values, default=0) for s in series), default=0))
    desc = f"{n} points from {labels[0]} to {labels[-1]}" if n else "no data"
    out = _frame(title, desc, top, labels, ident)
    inner_w, inner_h = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    for s in series:
        points = " ".join(
            f"{PAD_L + inner_w * (i + 0.5) / max(n, 1):.1f},"
            f"{PAD_T + inner_h - inner_h * v / top:.1f}" for i, v in enumerate(s.values))
        out.append(f'<polyline class="line {s.css}" points="{points}"/>')
    out.append(_legend(series))
    out.append("</svg>")
    return Markup("".join(out))


def hbars(items: Sequence[tuple[str, float]], *, title: str, ident: str) -> Markup:
    """Horizontal bars with labels, e.g. a capability or model mix."""
    rows = max(len(items), 1)
    height = 24 * rows + 8
    top = max((v for _, v in items), default=0) or 1
    out = [f'<svg class="chart hbars" viewBox="0 0 {W} {height}" role="img" '
           f'aria-labelledby="{ident}-t" xmlns="http://www.w3.org/2000/svg">',
           f'<title id="{ident}-t">{escape(title)}</title>']
    for i, (label, v) in enumerate(items):
        y = 4 + 24 * i
        w = (W - 200) * v / top
        out.append(f'<text class="axis" x="120" y="{y + 15}" text-anchor="end">'
                   f'{escape(label[:20])}</text>'
                   f'<rect class="s{i % 6}" x="128" y="{y + 2}" width="{max(w, 1):.1f}" '
                   f'height="16"/><text class="axis" x="{134 + w:.1f}" y="{y + 15}">'
                   f'{_fmt(v)}</text>')
    out.append("</svg>")
    return Markup("".join(out))

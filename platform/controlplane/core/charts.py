"""Charts drawn on the server as SVG: no JavaScript library, nothing fetched from outside.

Pure functions from numbers to an SVG document (a string); a template includes it with
`mark_safe` at the call site. Every piece of text that comes from data (titles, series
and metric names, labels) is escaped here, so the string is safe to include as is.

- `line_chart`: several series of (x, y) points over shared axes with "nice" ticks, a
  legend, and a gap wherever a value is missing or not finite (NaN, inf). A series of one
  point is drawn as a dot; no finite point at all draws "No data yet".
- `bar_chart`: grouped bars, one group per metric (e.g. before and after a compression).
  Metrics have different units, so each group is normalised to its own largest magnitude
  (the tallest bar of a group is full height) and every bar is labelled with its raw value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import TypeGuard

#: Colour-blind-friendly (Okabe-Ito) colours, one per series, in order.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")

_FONT = 'font-family="system-ui, sans-serif" font-size="11"'


@dataclass(frozen=True)
class Series:
    """One line: (x, y) points in any order (drawn sorted by x); y may be None or NaN."""

    name: str
    points: Sequence[tuple[float, float | None]]


@dataclass(frozen=True)
class BarGroup:
    """One metric: a value per series (None when it was not measured) and its raw labels."""

    label: str
    values: Sequence[float | None]
    #: How each raw value reads (e.g. "1.2 MB"); by default the number itself.
    display: Sequence[str] = field(default_factory=tuple)


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (steps of 1, 2 or 5 x 10^k) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high - step * 1e-9:
        ticks.append(round(value, 12))
    return ticks


def number(value: float) -> str:
    """A short label for a tick or a value: 3 significant digits, thousands as k/M/G."""
    if not math.isfinite(value):
        return "n/a"
    size = abs(value)
    for limit, unit, suffix in (
        (1e12, 1e12, "T"),
        (1e9, 1e9, "G"),
        (1e6, 1e6, "M"),
        (1e4, 1e3, "k"),
    ):
        if size >= limit:
            return f"{value / unit:.3g}{suffix}"
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}"


def _svg(element_id: str, width: int, height: int, title: str, body: list[str]) -> str:
    ident = f' id="{escape(element_id)}"' if element_id else ""
    label = escape(title)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg"{ident} class="chart" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'aria-label="{label}"><title>{label}</title>'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>'
        + "".join(body)
        + "</svg>"
    )


def _empty(element_id: str, width: int, height: int, title: str, message: str) -> str:
    return _svg(
        element_id,
        width,
        height,
        title,
        [
            f'<text class="empty" x="{width / 2:g}" y="{height / 2:g}" text-anchor="middle" '
            f'{_FONT} fill="#666">{escape(message)}</text>'
        ],
    )


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    out = ['<g class="legend">']
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        top = y + i * 16
        out.append(
            f'<rect x="{x:g}" y="{top:g}" width="12" height="10" fill="{colour}"/>'
            f'<text x="{x + 16:g}" y="{top + 9:g}" {_FONT} fill="#333">{escape(name)}</text>'
        )
    out.append("</g>")
    return out


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str = "",
    y_label: str = "",
    element_id: str = "",
    width: int = 640,
    height: int = 300,
) -> str:
    """Lines over shared axes. Each series is a `<g class="series" data-name=…>` holding
    a `<path>` (one `M`/`L` command per finite point, `M` again after a gap) and, for a
    single point, a `<circle>`; `data-points` on the group counts the points drawn."""
    finite = [
        [(float(x), float(y)) for x, y in s.points if _finite(x) and _finite(y)] for s in series
    ]
    every = [p for points in finite for p in points]
    if not every:
        return _empty(element_id, width, height, title, "No data yet")

    left, right, top, bottom = 56, 16 + 140, 28, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    x_ticks = nice_ticks(min(x for x, _ in every), max(x for x, _ in every), 6)
    y_ticks = nice_ticks(min(y for _, y in every), max(y for _, y in every), 5)
    x0, x1 = x_ticks[0], x_ticks[-1]
    y0, y1 = y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return round(left + (x - x0) / (x1 - x0) * plot_w, 2)

    def sy(y: float) -> float:
        return round(top + plot_h - (y - y0) / (y1 - y0) * plot_h, 2)

    body = [
        f'<text x="{left:g}" y="16" {_FONT} font-weight="bold" fill="#333">{escape(title)}</text>',
        '<g class="axes" stroke="#999" stroke-width="1">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
        "</g>",
        '<g class="x-ticks">',
    ]
    for tick in x_ticks:
        px = sx(tick)
        body.append(
            f'<line x1="{px:g}" y1="{top + plot_h}" x2="{px:g}" y2="{top + plot_h + 4}" '
            f'stroke="#999"/><text x="{px:g}" y="{top + plot_h + 16}" text-anchor="middle" '
            f'{_FONT} fill="#555">{escape(number(tick))}</text>'
        )
    body.append('</g><g class="y-ticks">')
    for tick in y_ticks:
        py = sy(tick)
        body.append(
            f'<line x1="{left}" y1="{py:g}" x2="{left + plot_w}" y2="{py:g}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{py + 4:g}" text-anchor="end" {_FONT} '
            f'fill="#555">{escape(number(tick))}</text>'
        )
    body.append("</g>")
    if x_label:
        body.append(
            f'<text class="x-label" x="{left + plot_w / 2:g}" y="{height - 6}" '
            f'text-anchor="middle" {_FONT} fill="#333">{escape(x_label)}</text>'
        )
    if y_label:
        body.append(
            f'<text class="y-label" x="12" y="{top + plot_h / 2:g}" text-anchor="middle" '
            f'transform="rotate(-90 12 {top + plot_h / 2:g})" {_FONT} '
            f'fill="#333">{escape(y_label)}</text>'
        )

    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        commands: list[str] = []
        segments: list[list[tuple[float, float]]] = []
        gap = True
        for x, y in sorted(s.points, key=lambda p: p[0] if _finite(p[0]) else math.inf):
            if not (_finite(x) and _finite(y)):
                gap = True
                continue
            at = (sx(float(x)), sy(float(y)))
            commands.append(f"{'M' if gap else 'L'}{at[0]:g},{at[1]:g}")
            if gap:
                segments.append([])
            segments[-1].append(at)
            gap = False
        body.append(
            f'<g class="series" data-name="{escape(s.name)}" data-points="{len(commands)}">'
            f'<path d="{" ".join(commands)}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
        )
        # A point with no neighbour (alone, or between gaps) draws no line: a dot shows it.
        for (cx, cy), *rest in segments:
            if not rest:
                body.append(f'<circle cx="{cx:g}" cy="{cy:g}" r="3" fill="{colour}"/>')
        body.append("</g>")
    body.extend(_legend([s.name for s in series], width - right + 12, top))
    return _svg(element_id, width, height, title, body)


def _wrap(label: str, room: float) -> list[str]:
    """A label on one line, or two (split at the space nearest its middle) when it is
    wider than `room` pixels at about 6 pixels a character."""
    if len(label) * 6 <= room or " " not in label:
        return [label]
    spaces = [i for i, c in enumerate(label) if c == " "]
    cut = min(spaces, key=lambda i: abs(i - len(label) / 2))
    return [label[:cut], label[cut + 1 :]]


def bar_chart(
    groups: Sequence[BarGroup],
    *,
    series_names: Sequence[str],
    title: str,
    element_id: str = "",
    width: int = 720,
    height: int = 300,
) -> str:
    """Grouped bars, each group normalised to its own largest magnitude: bar `i` of a group
    is `<rect class="bar" data-series=… data-value=…>` of height |value| / max |value| of
    the plot's height, labelled (`<text class="value">`) with the raw value. A missing or
    non-finite value draws no bar and reads "n/a"."""
    if not groups or not series_names:
        return _empty(element_id, width, height, title, "No report yet")
    left, right, top, bottom = 16, 16 + 130, 40, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    group_w = plot_w / len(groups)
    n = len(series_names)
    bar_w = min(40.0, max(4.0, (group_w - 16) / n))
    body = [
        f'<text x="{left:g}" y="16" {_FONT} font-weight="bold" fill="#333">{escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="#999"/>',
    ]
    for g, group in enumerate(groups):
        values: list[float | None] = [
            float(v) if _finite(v) else None for v in list(group.values)[:n]
        ]
        values += [None] * (n - len(values))
        scale = max((abs(float(v)) for v in values if v is not None), default=0.0)
        start = left + g * group_w + (group_w - bar_w * n) / 2
        body.append(f'<g class="group" data-label="{escape(group.label)}">')
        for i, value in enumerate(values):
            if value is None:
                shown = "n/a"
            elif i < len(group.display):
                shown = group.display[i]
            else:
                shown = number(value)
            x = start + i * bar_w
            share = abs(float(value)) / scale if value is not None and scale else 0.0
            bar_h = round(share * plot_h, 2)
            if value is not None:
                body.append(
                    f'<rect class="bar" data-series="{escape(series_names[i])}" '
                    f'data-value="{float(value)!r}" x="{x + 1:g}" y="{top + plot_h - bar_h:g}" '
                    f'width="{bar_w - 2:g}" height="{bar_h:g}" '
                    f'fill="{PALETTE[i % len(PALETTE)]}"/>'
                )
            body.append(
                f'<text class="value" x="{x + bar_w / 2:g}" y="{top + plot_h - bar_h - 3:g}" '
                f'text-anchor="middle" {_FONT} fill="#333">{escape(shown)}</text>'
            )
        centre = start + bar_w * n / 2
        lines = "".join(
            f'<tspan x="{centre:g}" dy="{0 if i == 0 else 13}">{escape(line)}</tspan>'
            for i, line in enumerate(_wrap(group.label, group_w))
        )
        body.append(
            f'<text class="label" x="{centre:g}" y="{top + plot_h + 16}" '
            f'text-anchor="middle" {_FONT} fill="#333">{lines}</text></g>'
        )
    body.extend(_legend(series_names, width - right + 12, top))
    return _svg(element_id, width, height, title, body)

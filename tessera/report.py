"""The one toolkit for Tessera's self-contained HTML reports: elements, a page, tables, inline images, SVG charts.

Every report (``tessera eval``'s ``report.html``, the quickstart's) is a single file: images are embedded as
base64 PNG and plots are inline SVG, so it can be copied anywhere, attached to a ticket or opened straight
from S3 and still show everything.

Escaping goes by type (markupsafe, the library Jinja2 uses): a plain ``str`` is text and is escaped; a
``Markup`` is HTML built by a function here (or deliberately by the caller) and passes through unchanged.

The charts are drawn by hand rather than with a plotting library: matplotlib is not a dependency of Tessera,
and three small primitives over plain SVG elements (line, bar, histogram) keep the reports light and their
markup predictable enough for tests to read.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Iterable

from markupsafe import Markup, escape

__all__ = ["Markup", "BASE_CSS", "el", "page", "cell", "table", "png_data_uri", "image_data_uri", "img", "figure",
           "tick_label", "running_mean", "line_plot", "bar_chart", "histogram"]

BASE_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;
font-size:13px}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{image-rendering:pixelated;border:1px solid #ddd}code,pre{background:#f6f6f6}
pre{padding:8px;font-size:12px;overflow:auto}.muted{color:#777;font-size:.9em}
.plots{display:flex;flex-wrap:wrap;gap:12px}svg.chart{font-family:system-ui,sans-serif}"""

LINE = "#1f6feb"  # main series colour
LINE_RAW = "#9ecae1"  # the raw series under a running mean
BAR = "#6baed6"


# --------------------------------------------------------------------------- HTML


def el(tag: str, *children, **attrs) -> Markup:
    """``<tag attrs>children</tag>``: text children and attribute values escaped; ``class_`` -> ``class``.

    A ``None`` child or attribute is left out; ``True`` writes a bare attribute.
    """
    parts = [f"<{tag}"]
    for name, value in attrs.items():
        if value is None or value is False:
            continue
        name = name.rstrip("_").replace("_", "-")
        parts.append(f" {name}" if value is True else f' {name}="{escape(str(value))}"')
    body = "".join(str(escape(c)) for c in children if c is not None)
    return Markup("".join(parts) + f">{body}</{tag}>")


def page(title: str, body: Iterable, *, css: str = "") -> str:
    """A complete HTML document: ``title`` (escaped), the base style plus ``css``, and the ``body`` parts."""
    content = "".join(str(escape(b)) for b in body if b is not None)
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{BASE_CSS}\n{css}</style></head><body>{content}</body></html>")


def cell(value) -> Markup:
    """A table cell's content: floats to 6 significant digits, other text escaped, ``Markup`` as is."""
    if isinstance(value, float):
        return Markup(f"{value:.6g}")
    return escape("" if value is None else value)


def table(header: list, rows: Iterable[list]) -> Markup:
    """A table with a header row; the first column is left-aligned, the others right-aligned (numbers)."""
    head = "".join(str(el("th", cell(h))) for h in header)
    body = "".join("<tr>" + "".join(str(el("td", cell(c))) for c in row) + "</tr>" for row in rows)
    return Markup(f"<table><tr>{head}</tr>{body}</table>")


def png_data_uri(png: bytes) -> str:
    """A ``data:`` URI for PNG bytes (embeds an image in the page)."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_data_uri(image, max_size: int | None = None) -> str:
    """A PIL image as a PNG ``data:`` URI; with ``max_size``, a thumbnail whose longer side is ``max_size``.

    Small images are upscaled by an integer factor with nearest-neighbour (pixels stay crisp, nothing is
    invented); large ones are downscaled with Lanczos.
    """
    from PIL import Image

    im = image.convert("RGB")
    if max_size is not None:
        w, h = im.size
        if max(w, h) < max_size:
            k = max(1, max_size // max(w, h))
            im = im.resize((w * k, h * k), Image.NEAREST)
        elif max(w, h) > max_size:
            im = im.copy()
            im.thumbnail((max_size, max_size), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return png_data_uri(buf.getvalue())


def img(src: str, *, alt: str = "", title: str | None = None) -> Markup:
    """An ``<img>`` (``src`` is usually a data URI from ``png_data_uri``/``image_data_uri``)."""
    return Markup(f'<img alt="{escape(alt)}"' + (f' title="{escape(title)}"' if title else "")
                  + f' src="{escape(src)}">')


def figure(src: str, caption) -> Markup:
    """An image with a caption under it."""
    return el("figure", img(src, alt=str(caption)), el("figcaption", caption))


# --------------------------------------------------------------------------- SVG charts


def tick_label(v: float) -> str:
    """A compact axis number: ``1.5k``, ``2.3M``, ``0.0123``."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e3:
        return f"{v / 1e3:.3g}k"
    return f"{v:.3g}"


def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values at each position."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@dataclass
class _Frame:
    """The plot area of a chart: maps data coordinates (x0..x1, y0..y1) to SVG pixels and draws the axes."""

    width: int
    height: int
    x0: float
    x1: float
    y0: float
    y1: float
    left: int = 56
    right: int = 16
    top: int = 26
    bottom: int = 40

    def sx(self, x: float) -> float:
        """SVG x of data x."""
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.width - self.left - self.right)

    def sy(self, y: float) -> float:
        """SVG y of data y (up is larger)."""
        return self.height - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.height - self.top - self.bottom)

    def axes(self, title: str, x_label: str, y_label: str, n_ticks: int = 5) -> str:
        """Background, horizontal grid lines, tick labels on both axes, axis labels and the title."""
        w, h, lft, bot = self.width, self.height, self.left, self.bottom
        out = [f'<rect x="{lft}" y="{self.top}" width="{w - lft - self.right}" height="{h - self.top - bot}" '
               'fill="#fafafa" stroke="#ccc"/>']
        for i in range(n_ticks):
            ty = self.y0 + (self.y1 - self.y0) * i / (n_ticks - 1)
            tx = self.x0 + (self.x1 - self.x0) * i / (n_ticks - 1)
            out.append(f'<line x1="{lft}" x2="{w - self.right}" y1="{self.sy(ty):.1f}" y2="{self.sy(ty):.1f}" '
                       f'stroke="#eee"/><text x="{lft - 5}" y="{self.sy(ty) + 4:.1f}" text-anchor="end">'
                       f'{tick_label(ty)}</text><text x="{self.sx(tx):.1f}" y="{h - bot + 15}" '
                       f'text-anchor="middle">{tick_label(tx)}</text>')
        mid_y = (self.top + h - bot) / 2
        out.append(f'<text x="{(lft + w - self.right) / 2:.0f}" y="{h - 6}" text-anchor="middle">'
                   f'{escape(x_label)}</text><text x="12" y="{mid_y:.0f}" text-anchor="middle" '
                   f'transform="rotate(-90 12 {mid_y:.0f})">{escape(y_label)}</text>'
                   f'<text x="{w / 2:.0f}" y="16" text-anchor="middle" font-size="12" font-weight="bold">'
                   f'{escape(title)}</text>')
        return "".join(out)


def _svg(width: int, height: int, inner: str) -> Markup:
    return Markup(f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                  f'viewBox="0 0 {width} {height}" font-size="10">{inner}</svg>')


def _span(lo: float, hi: float) -> tuple[float, float]:
    """A non-empty axis range around [lo, hi] (a flat series gets room above and below)."""
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def line_plot(points: Iterable[tuple[float, float | None]], *, title: str = "", x_label: str = "",
              y_label: str = "", width: int = 360, height: int = 220, markers: bool = True,
              smooth: bool = False, y_from_zero: bool = False) -> Markup:
    """An SVG line plot of (x, y) points sorted by x; None/NaN/inf y are dropped; empty Markup if none is left.

    ``markers`` puts a dot with a hover tooltip on every point; ``smooth`` draws the raw series thin and a
    running mean (window: 1/20 of the points) on top; ``y_from_zero`` starts the y axis at 0 (losses).
    """
    pts = sorted((float(x), float(y)) for x, y in points if y is not None and math.isfinite(float(y)))
    if not pts:
        return Markup("")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = _span(min(xs), max(xs))
    y0, y1 = _span(min(0.0, min(ys)), max(ys) * 1.05) if y_from_zero else _span(min(ys), max(ys))
    f = _Frame(width, height, x0, x1, y0, y1)

    def polyline(series: list[tuple[float, float]], color: str, stroke: int) -> str:
        coords = " ".join(f"{f.sx(x):.1f},{f.sy(y):.1f}" for x, y in series)
        return f'<polyline fill="none" stroke="{color}" stroke-width="{stroke}" points="{coords}"/>'

    parts = [f.axes(title, x_label, y_label)]
    if smooth:
        mean = running_mean(ys, max(1, len(ys) // 20))
        parts += [polyline(pts, LINE_RAW, 1), polyline(list(zip(xs, mean)), LINE, 2)]
    else:
        parts.append(polyline(pts, LINE, 2))
    if markers:
        dots = "".join(f'<circle cx="{f.sx(x):.1f}" cy="{f.sy(y):.1f}" r="3"><title>{escape(x_label)} {x:g}: '
                       f'{y:.6g}</title></circle>' for x, y in pts)
        parts.append(f'<g fill="{LINE}">{dots}</g>')
    return _svg(width, height, "".join(parts))


def bar_chart(bars: Iterable[tuple[str, float]], *, title: str = "", unit: str = "", width: int = 480,
              bar_height: int = 16) -> Markup:
    """Horizontal bars, one per (label, value >= 0), each with its value (and ``unit``) written at its end."""
    bars = [(str(label), float(v)) for label, v in bars]
    if not bars:
        return Markup("")
    label_w = min(220, 16 + 6 * max(len(label) for label, _ in bars))  # ~6 px per character at font size 10
    top, gap, value_w = 26 if title else 6, 4, 60
    height = top + len(bars) * (bar_height + gap) + 6
    vmax = max(max(v for _, v in bars), 1e-12)
    parts = [f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="12" font-weight="bold">'
             f'{escape(title)}</text>'] if title else []
    for i, (label, v) in enumerate(bars):
        y = top + i * (bar_height + gap)
        w = max(0.0, v) / vmax * (width - label_w - value_w)
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_height - 4}" text-anchor="end">{escape(label)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_height}" fill="{BAR}">'
                     f'<title>{escape(label)}: {v:.6g}{escape(unit)}</title></rect>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + bar_height - 4}">{tick_label(v)}{escape(unit)}</text>')
    return _svg(width, height, "".join(parts))


def histogram(values: Iterable[float], *, bins: int = 10, title: str = "", width: int = 480) -> Markup:
    """A histogram of the finite ``values`` in ``bins`` equal-width bins, drawn as a bar chart of counts."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return Markup("")
    lo, hi = min(vals), max(vals)
    if hi == lo:  # one distinct value: one bar
        return bar_chart([(tick_label(lo), len(vals))], title=title, width=width)
    bins = max(1, bins)
    step = (hi - lo) / bins
    counts = [0] * bins
    for v in vals:
        counts[min(int((v - lo) / step), bins - 1)] += 1  # the maximum falls in the last bin
    labels = [f"{tick_label(lo + i * step)} to {tick_label(lo + (i + 1) * step)}" for i in range(bins)]
    return bar_chart(list(zip(labels, counts)), title=title, width=width)

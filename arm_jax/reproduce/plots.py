"""Small charts drawn with PIL (already a dependency): curves with bands, paired bars, confusion matrices.

matplotlib would draw nicer axes, but it would be a new dependency for three figures; these
panels are enough to read a curve, a spread and a confusion matrix, and tests can check
their pixels against the data (`Axes.pixel` is the one mapping both use).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))
GREY = (120, 120, 120)
BAND_ALPHA = 70  # of 255: a band stays readable under the other series' lines


def font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


@dataclasses.dataclass(frozen=True)
class Series:
    """A curve; `low`/`high` (same length as y) draw a band around it."""

    name: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    colour: tuple[int, int, int] = PALETTE[0]
    dashed: bool = False


@dataclasses.dataclass(frozen=True)
class Axes:
    """Data coordinates -> pixels inside `box` (left, top, right, bottom)."""

    box: tuple[int, int, int, int]
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def pixel(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (y - y0) / (y1 - y0) * (bottom - top))


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [round(first + i * step, 10) for i in range(int(math.ceil((high - first) / step)) + 1)]


def data_range(values, pad: float = 0.05) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    margin = (high - low) * pad or max(abs(high) * pad, 0.5)
    return low - margin, high + margin


def _frame(draw: ImageDraw.ImageDraw, axes: Axes, title: str, x_label: str, y_label: str,
           x_ticks, y_ticks, tick_format: str) -> None:
    left, top, right, bottom = axes.box
    small = font(12)
    draw.text((left, 6), title, fill="black", font=font(14))
    for y in y_ticks:
        _, py = axes.pixel(axes.x_range[0], y)
        draw.line([(left, py), (right, py)], fill=(225, 225, 225))
        draw.text((left - 6, py), format(y, tick_format), fill="black", font=small, anchor="rm")
    for x in x_ticks:
        px, _ = axes.pixel(x, axes.y_range[0])
        draw.line([(px, bottom), (px, bottom + 4)], fill="black")
        draw.text((px, bottom + 6), format(x, "g"), fill="black", font=small, anchor="mt")
    draw.rectangle(axes.box, outline="black")
    draw.text(((left + right) / 2, bottom + 24), x_label, fill="black", font=small, anchor="mt")
    if y_label:
        draw.text((8, top - 16), y_label, fill="black", font=small)


def line_panel(series: list[Series], *, title: str, x_label: str, y_label: str, size=(560, 380),
               y_range: tuple[float, float] | None = None, references: tuple[tuple[str, float], ...] = (),
               tick_format: str = "g") -> tuple[Image.Image, Axes]:
    """Curves with optional bands and horizontal reference lines; returns the image and its Axes."""
    width, height = size
    xs = [x for s in series for x in s.x] or [0.0, 1.0]
    ys = [v for s in series for v in (*s.y, *(s.low or ()), *(s.high or ()))] + [v for _, v in references]
    x_range = (min(xs) - 0.5, max(xs) + 0.5) if len(set(xs)) < 12 else data_range(xs, 0.02)
    axes = Axes((70, 50, width - 20, height - 90), x_range, y_range or data_range(ys))
    image = Image.new("RGB", size, "white")
    _frame(ImageDraw.Draw(image), axes, title, x_label, y_label,
           sorted(set(xs)) if len(set(xs)) < 12 else nice_ticks(*x_range),
           [t for t in nice_ticks(*axes.y_range) if axes.y_range[0] <= t <= axes.y_range[1]], tick_format)
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    for s in series:  # bands first, under every line
        if s.low is not None and s.high is not None and len(s.x) > 1:
            upper = [axes.pixel(x, h) for x, h in zip(s.x, s.high)]
            lower = [axes.pixel(x, lo) for x, lo in zip(s.x, s.low)]
            ImageDraw.Draw(overlay).polygon(upper + lower[::-1], fill=(*s.colour, BAND_ALPHA))
    image.paste(Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB"))
    draw = ImageDraw.Draw(image)
    for name, value in references:
        (x0, y), (x1, _) = axes.pixel(axes.x_range[0], value), axes.pixel(axes.x_range[1], value)
        _dashed(draw, (x0, y), (x1, y), GREY)
        draw.text((x0 + 4, y - 2), name, fill=GREY, font=font(11), anchor="lb")
    for s in series:
        points = [axes.pixel(x, y) for x, y in zip(s.x, s.y) if y is not None]
        for a, b in zip(points, points[1:]):
            (_dashed(draw, a, b, s.colour) if s.dashed else draw.line([a, b], fill=s.colour, width=2))
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=s.colour)
    _legend(draw, [(s.name, s.colour) for s in series], (axes.box[0], height - 40))
    return image, axes


def bar_panel(groups: list[str], bars: list[tuple[str, list[float | None], list[float | None]]], *, title: str,
              y_label: str, size=(760, 400), y_range: tuple[float, float] | None = None) -> tuple[Image.Image, Axes]:
    """Grouped bars: for each (name, values, sds) one bar per group, with an sd whisker where given."""
    width, height = size
    tops = [v + (sd or 0.0) for _, vs, sds in bars for v, sd in zip(vs, sds) if v is not None]
    axes = Axes((70, 50, width - 20, height - 90), (-0.5, len(groups) - 0.5),
                y_range or (0.0, data_range(tops + [0.0])[1]))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    _frame(draw, axes, title, "", y_label, [], nice_ticks(*axes.y_range), "g")
    slot = 0.8 / max(len(bars), 1)
    for b, (name, vs, sds) in enumerate(bars):
        colour = PALETTE[b % len(PALETTE)]
        for g, (v, sd) in enumerate(zip(vs, sds)):
            if v is None:
                continue
            x0 = g - 0.4 + b * slot
            (left, top), (right, bottom) = axes.pixel(x0, v), axes.pixel(x0 + slot * 0.9, axes.y_range[0])
            draw.rectangle([left, top, right, bottom], fill=colour)
            if sd:
                centre = (left + right) / 2
                (_, hi), (_, lo) = axes.pixel(0, v + sd), axes.pixel(0, v - sd)
                draw.line([(centre, hi), (centre, lo)], fill="black", width=2)
    for g, name in enumerate(groups):
        px, _ = axes.pixel(g, axes.y_range[0])
        draw.text((px, axes.box[3] + 6), name, fill="black", font=font(12), anchor="mt")
    entries = [(name, PALETTE[b % len(PALETTE)]) for b, (name, _, _) in enumerate(bars)]
    _legend(draw, entries, (axes.box[0], height - 40))
    return image, axes


def confusion_panel(matrix, class_names: list[str], title: str, cell: int = 46) -> Image.Image:
    """A row-normalised confusion matrix (rows: true class), shade and percent per cell."""
    matrix = np.asarray(matrix, dtype=np.float64)
    n, m = matrix.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.nan_to_num(matrix / matrix.sum(axis=1, keepdims=True))
    left, top = 90, 60
    image = Image.new("RGB", (left + m * cell + 10, top + n * cell + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), title, fill="black", font=font(13))
    for j in range(m):
        draw.text((left + j * cell + cell / 2, top - 6), class_names[j][:7] if j < len(class_names) else str(j),
                  fill="black", font=font(10), anchor="mb")
    for i in range(n):
        draw.text((left - 6, top + i * cell + cell / 2), class_names[i][:11], fill="black", font=font(11), anchor="rm")
        for j in range(m):
            shade = int(round(255 * (1 - fraction[i, j])))
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), f"{100 * fraction[i, j]:.0f}",
                      fill="white" if fraction[i, j] > 0.5 else "black", font=font(11), anchor="mm")
    draw.text((left, top + n * cell + 8), "rows: true class; columns: predicted; % of the row",
              fill=GREY, font=font(10))
    return image


def side_by_side(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Panels in a grid, left to right then down."""
    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    width, height = max(i.width for i in images), max(i.height for i in images)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


def titled(image: Image.Image, title: str, height: int = 34) -> Image.Image:
    """`image` under a strip holding `title`."""
    sheet = Image.new("RGB", (image.width, image.height + height), "white")
    ImageDraw.Draw(sheet).text((10, 8), title, fill="black", font=font(16))
    sheet.paste(image, (0, height))
    return sheet


def save(image: Image.Image, path: Path) -> Path:
    image.save(path, optimize=True)
    return path


def _legend(draw: ImageDraw.ImageDraw, entries, origin) -> None:
    x, y = origin
    for name, colour in entries:
        draw.rectangle([x, y + 3, x + 14, y + 11], fill=colour)
        draw.text((x + 20, y), name, fill="black", font=font(12))
        x += 30 + int(draw.textlength(name, font=font(12)))


def _dashed(draw: ImageDraw.ImageDraw, a, b, colour, dash: float = 6.0) -> None:
    (x0, y0), (x1, y1) = a, b
    length = math.hypot(x1 - x0, y1 - y0)
    for start in np.arange(0.0, length, 2 * dash):
        t0, t1 = start / length, min(start + dash, length) / length
        draw.line([(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0), (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)],
                  fill=colour, width=2)

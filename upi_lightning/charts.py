"""Line charts and heat maps as RGB tensors, drawn with PIL (no plotting library needed).

Each function returns an image ``(3, H, W)`` in ``[0, 1]``, ready for ``SummaryWriter.add_image`` or
:func:`upi_lightning.figures.save_png`: metric-against-eps curves of a sweep, scalar curves exported
from TensorBoard, and transfer matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from upi_lightning.figures import heat_colormap

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
"""Series colours, in order (the first series is blue, the second red...)."""
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 28, 40
CHAR_WIDTH = 6  # PIL's default bitmap font


def _to_tensor(canvas: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values inside ``[low, high]``, about ``count`` of them.

    The ticks are the multiples, inside the range, of the step (1, 2, 5 or 10 times a power of ten) whose
    number of ticks is closest to ``count`` (the larger step on a tie).
    """
    if not high > low:
        return [low]
    power = 10 ** math.floor(math.log10((high - low) / max(1, count - 1)))
    steps = [m * power for m in (10, 5, 2, 1)]

    def ticks(step: float) -> list[float]:
        first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
        return [round(i * step, 12) for i in range(first, last + 1)]

    return min((ticks(step) for step in steps), key=lambda values: abs(len(values) - count))


@dataclass(frozen=True)
class Axes:
    """The data ranges of a chart and its plotting area in pixels; :meth:`pixel` maps data to pixels."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    box: tuple[int, int, int, int]  # left, top, right, bottom

    def pixel(self, x: float, y: float) -> tuple[float, float]:
        """Pixel ``(column, row)`` of the data point ``(x, y)``."""
        (x0, x1), (y0, y1), (left, top, right, bottom) = self.x_range, self.y_range, self.box
        column = left + (x - x0) / (x1 - x0) * (right - left)
        row = bottom - (y - y0) / (y1 - y0) * (bottom - top)
        return column, row


def chart_axes(series: Mapping[str, Sequence[tuple[float, float]]], size: tuple[int, int]) -> Axes:
    """The :class:`Axes` of :func:`line_chart`: the data's range, widened where it is a single value."""
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points if math.isfinite(y)]
    if not xs or not ys:
        raise ValueError("line_chart needs at least one finite point.")
    x_range = (min(xs), max(xs)) if max(xs) > min(xs) else (min(xs) - 0.5, min(xs) + 0.5)
    low, high = min(ys), max(ys)
    pad = 0.05 * (high - low) if high > low else (0.1 * abs(low) if low else 0.5)
    y_range = (low - pad, high + pad)
    width, height = size
    return Axes(x_range, y_range, (MARGIN_LEFT, MARGIN_TOP, width - MARGIN_RIGHT, height - MARGIN_BOTTOM))


def _label(value: float) -> str:
    return f"{value:.4g}"


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    size: tuple[int, int] = (480, 320),
) -> Tensor:
    """A line chart of ``{name: [(x, y), ...]}``, one coloured curve with point markers per series.

    Points are joined in order of ``x``; non-finite ``y`` values are skipped. The legend (a box at the
    top left inside the plot, drawn over the curves) lists the series in the order given, in the colours
    of :data:`PALETTE`.

    Raises:
        ValueError: if there is no finite point at all.
    """
    axes = chart_axes(series, size)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = axes.box
    for tick in nice_ticks(*axes.x_range):
        if axes.x_range[0] <= tick <= axes.x_range[1]:
            column, _ = axes.pixel(tick, axes.y_range[0])
            draw.line([(column, top), (column, bottom)], fill="#e6e6e6")
            text = _label(tick)
            draw.text((column - CHAR_WIDTH * len(text) / 2, bottom + 4), text, fill="black")
    for tick in nice_ticks(*axes.y_range):
        if axes.y_range[0] <= tick <= axes.y_range[1]:
            _, row = axes.pixel(axes.x_range[0], tick)
            draw.line([(left, row), (right, row)], fill="#e6e6e6")
            text = _label(tick)
            draw.text((left - 4 - CHAR_WIDTH * len(text), row - 6), text, fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    for index, points in enumerate(series.values()):
        color = PALETTE[index % len(PALETTE)]
        pixels = [axes.pixel(x, y) for x, y in sorted(points) if math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for column, row in pixels:
            draw.ellipse([column - 3, row - 3, column + 3, row + 3], fill=color)
    legend_width = 32 + CHAR_WIDTH * max(len(name) for name in series)
    legend = [left + 4, top + 2, left + 4 + legend_width, top + 6 + 14 * len(series)]
    draw.rectangle(legend, fill="white", outline="#999999")
    for index, name in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        draw.line([(left + 8, top + 10 + 14 * index), (left + 24, top + 10 + 14 * index)], fill=color, width=3)
        draw.text((left + 28, top + 4 + 14 * index), name, fill="black")
    draw.text(((left + right) / 2 - CHAR_WIDTH * len(title) / 2, 2), title, fill="black")
    draw.text(((left + right) / 2 - CHAR_WIDTH * len(x_label) / 2, size[1] - 16), x_label, fill="black")
    draw.text((4, 14), y_label, fill="black")
    return _to_tensor(canvas)


def heat_map(
    matrix: Tensor,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str = "",
    cell: int = 72,
) -> Tensor:
    """A labelled heat map of a ``(R, C)`` matrix, each cell coloured and printed with its value.

    Colours run black-red-yellow-white from the matrix minimum to its maximum. Cells are ``cell`` pixels
    square, wider when a column label needs it.

    Raises:
        ValueError: if the labels do not match the matrix shape.
    """
    rows, columns = matrix.shape
    if len(row_labels) != rows or len(column_labels) != columns:
        counts = f"{len(row_labels)} row and {len(column_labels)} column labels"
        raise ValueError(f"a {rows} x {columns} matrix needs as many labels, got {counts}.")
    values = matrix.detach().double().cpu()
    low, high = values.min().item(), values.max().item()
    scaled = (values - low) / (high - low) if high > low else torch.full_like(values, 0.5)
    colors = heat_colormap(scaled.float().unsqueeze(0) + 1e-6)[0]  # (3, R, C)
    cell = max(cell, 8 + CHAR_WIDTH * max(len(label) for label in column_labels))
    left = 12 + CHAR_WIDTH * max(len(label) for label in row_labels)
    top = 44
    canvas = Image.new("RGB", (left + columns * cell + 8, top + rows * cell + 8), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 6), title, fill="black")
    for j, label in enumerate(column_labels):
        draw.text((left + j * cell + cell / 2 - CHAR_WIDTH * len(label) / 2, top - 16), label, fill="black")
    for i, label in enumerate(row_labels):
        draw.text((4, top + i * cell + cell / 2 - 6), label, fill="black")
        for j in range(columns):
            rgb = tuple(round(255 * c) for c in colors[:, i, j].tolist())
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell - 2, top + (i + 1) * cell - 2]
            draw.rectangle(box, fill=rgb)
            text = f"{values[i, j].item():.3f}"
            ink = "black" if sum(rgb) > 380 else "white"
            draw.text((box[0] + cell / 2 - CHAR_WIDTH * len(text) / 2, box[1] + cell / 2 - 7), text, fill=ink)
    return _to_tensor(canvas)

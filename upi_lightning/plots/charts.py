"""Charts of metrics: one chart per metric, every method (or run) overlaid, spreads as bands."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from upi_lightning.plots.style import bare, series_styles, styled

CHART_SIZE = (3.4, 2.5)
"""Width and height of one chart, inches."""
MIN_IMAGE_SIDE = 112
"""Images of :func:`dashboard_figure` are enlarged by an integer factor to this many pixels (shorter side)."""

Charts = Mapping[str, Mapping[str, "Curve"]]
"""``{chart title: {series name: Curve}}``."""


@dataclass(frozen=True)
class Curve:
    """Points ``(x, y)`` of one series; ``spread`` (same length) draws a band ``y ± spread``."""

    x: Sequence[float]
    y: Sequence[float]
    spread: Sequence[float] | None = None


def draw_curve(ax: Axes, curve: Curve, color: str, marker: str) -> None:
    """Line and markers through the finite points, sorted by x, and the band of ``spread`` when given."""
    spread = curve.spread if curve.spread is not None else [0.0] * len(curve.x)
    points = sorted((x, y, s) for x, y, s in zip(curve.x, curve.y, spread, strict=True) if math.isfinite(y))
    if not points:
        return
    x, y, s = (np.array(values, dtype=float) for values in zip(*points, strict=True))
    ax.plot(x, y, color=color, marker=marker, markersize=4, linewidth=1.5)
    if curve.spread is not None:
        ax.fill_between(x, y - s, y + s, color=color, alpha=0.2, linewidth=0)


def draw_charts(
    target: Figure | SubFigure,
    charts: Charts,
    x_label: str,
    columns: int,
    x_ticks: Mapping[float, str] | None = None,
    band_label: str = "± std",
) -> None:
    """The charts of :func:`chart_grid` in ``target`` (a figure or a part of one), its legend below them."""
    rows = math.ceil(len(charts) / columns)
    styles = series_styles([name for series in charts.values() for name in series])
    banded = {name for series in charts.values() for name, curve in series.items() if curve.spread is not None}
    axes = target.subplots(rows, columns, squeeze=False).flatten()
    for ax, (chart, series) in zip(axes, charts.items(), strict=False):
        for name, curve in series.items():
            draw_curve(ax, curve, *styles[name])
        ax.set_title(chart)
        ax.set_xlabel(x_label)
        xs = {x for curve in series.values() for x in curve.x}
        if x_ticks is not None:
            ax.set_xticks(list(x_ticks), list(x_ticks.values()))
        elif len(xs) == 1:  # one step: its tick alone, not a range around it
            ax.set_xticks(list(xs))
    for ax in axes[len(charts) :]:
        ax.set_axis_off()
    handles: list[Any] = []
    for name, (color, marker) in styles.items():
        line = Line2D([], [], color=color, marker=marker, markersize=4, linewidth=1.5)
        handles.append((Patch(color=color, alpha=0.2, linewidth=0), line) if name in banded else line)
    labels = [f"{name} ({band_label})" if name in banded else name for name in styles]
    target.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), frameon=False)


def check_charts(charts: Charts, columns: int) -> int:
    """The number of columns of the grid (at most one per chart).

    Raises:
        ValueError: if ``charts`` is empty or ``columns < 1``.
    """
    if not charts or columns < 1:
        raise ValueError(f"a chart grid needs at least one chart and columns >= 1, got {len(charts)} and {columns}.")
    return min(columns, len(charts))


@styled
def chart_grid(
    charts: Charts,
    title: str,
    x_label: str,
    columns: int = 3,
    x_ticks: Mapping[float, str] | None = None,
    band_label: str = "± std",
) -> Figure:
    """One chart per entry of ``charts``, series overlaid, in a grid of ``columns`` columns.

    Each series keeps one colour and marker in every chart (:func:`~upi_lightning.plots.style.series_styles`);
    a series with a ``spread`` gets a band, and ``band_label`` in the legend, which sits below the charts,
    outside the data. ``x_ticks`` (``{position: label}``) puts the x ticks at given values (every eps of a
    sweep).

    Raises:
        ValueError: if ``charts`` is empty or ``columns < 1``.
    """
    columns = check_charts(charts, columns)
    rows = math.ceil(len(charts) / columns)
    figure = Figure(figsize=(CHART_SIZE[0] * columns, CHART_SIZE[1] * rows + 0.9), layout="constrained")
    figure.suptitle(title)
    draw_charts(figure, charts, x_label, columns, x_ticks, band_label)
    return figure


def image_rows(sizes: Mapping[str, tuple[float, float]], width: float) -> list[list[tuple[str, float, float]]]:
    """Images ``{name: (width, height)}`` flowed left to right into rows at most ``width`` wide.

    An image wider than ``width`` is shrunk to it (keeping its aspect) and gets a row of its own.
    """
    rows: list[list[tuple[str, float, float]]] = []
    for name, (image_width, image_height) in sizes.items():
        shrink = min(1.0, width / image_width)
        item = (name, image_width * shrink, image_height * shrink)
        if rows and sum(placed[1] for placed in rows[-1]) + item[1] <= width:
            rows[-1].append(item)
        else:
            rows.append([item])
    return rows


@styled
def dashboard_figure(
    charts: Charts, images: Mapping[str, np.ndarray], title: str, x_label: str, columns: int = 3, dpi: int = 150
) -> Figure:
    """Charts (as :func:`chart_grid`) above images (``(H, W, 3)`` uint8 arrays, titled by their keys).

    Each image is shown at its size in pixels at ``dpi`` (enlarged by the smallest integer factor that
    makes its shorter side :data:`MIN_IMAGE_SIDE` pixels); the images flow left to right in rows as wide
    as the charts (:func:`image_rows`).

    Raises:
        ValueError: if there is neither a chart nor an image, or ``columns < 1``.
    """
    if not charts and not images:
        raise ValueError("dashboard_figure needs at least one chart or image.")
    columns = check_charts(charts, columns) if charts else columns
    sizes = {}  # display width and height of each image, inches
    for name, image in images.items():
        height, width = image.shape[:2]
        scale = max(1, math.ceil(MIN_IMAGE_SIDE / min(height, width))) / dpi
        sizes[name] = (width * scale, height * scale)
    figure_width = CHART_SIZE[0] * columns if charts else max(width for width, _ in sizes.values())
    rows = image_rows(sizes, figure_width)
    heights = [CHART_SIZE[1] * math.ceil(len(charts) / columns) + 0.6] if charts else []
    heights += [max(height for *_, height in row) + 0.35 for row in rows]
    figure = Figure(figsize=(figure_width, sum(heights) + 0.4), layout="constrained")
    figure.suptitle(title)
    parts = list(figure.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0])
    if charts:
        draw_charts(parts.pop(0), charts, x_label, columns)
    for part, row in zip(parts, rows, strict=True):
        axes = part.subplots(1, len(row), squeeze=False, width_ratios=[width for _, width, _ in row])[0]
        for ax, (name, *_) in zip(axes, row, strict=True):
            ax.imshow(images[name], interpolation="nearest")
            ax.set_title(name, fontsize="small")
            bare(ax)
    return figure

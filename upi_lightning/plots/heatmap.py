"""Matrices of ratios (transfer studies) as labelled heat maps, white at 1."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import Colormap, LogNorm
from matplotlib.figure import Figure
from torch import Tensor

from upi_lightning.plots.style import SIGNED_CMAP, styled

RATIO_TICKS = (0.1, 0.2, 0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 2.0, 5.0, 10.0)
"""Colour-bar ticks, those inside the scale (with its two ends)."""


def ink(cmap: Colormap, level: float) -> str:
    """Black or white, whichever reads better on ``cmap(level)``."""
    red, green, blue, _ = cmap(level)
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


@styled
def ratio_heat_map(
    ratios: Tensor | np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str,
    colorbar_label: str,
    cell_text: Sequence[Sequence[str]] | None = None,
    axis_labels: tuple[str, str] = ("evaluated on", "fitted on"),
) -> Figure:
    """A ``(R, C)`` matrix of positive ratios on ``RdBu_r``, white at 1, each cell labelled.

    The scale is logarithmic from ``1/m`` to ``m``, ``m`` the largest ratio or inverse ratio of the matrix
    (at least 1.05): centred at 1, and ``r`` and ``1/r`` get colours of equal strength, red above 1 and
    blue below. Each cell prints ``cell_text[i][j]`` (default: the ratio, ``1.23×``).

    Raises:
        ValueError: if the labels or texts do not match the matrix, or a ratio is not positive.
    """
    values = np.asarray(ratios.detach().cpu() if isinstance(ratios, Tensor) else ratios, dtype=float)
    rows, columns = values.shape
    texts = cell_text or [[f"{value:.2f}×" for value in row] for row in values]
    shapes = (len(row_labels), len(column_labels), len(texts), *(len(row) for row in texts))
    if shapes != (rows, columns, rows, *([columns] * rows)):
        raise ValueError(f"a {rows} x {columns} matrix needs as many labels and cell texts, got {shapes}.")
    if not (values > 0).all():
        raise ValueError(f"ratio_heat_map draws positive ratios, got a minimum of {values.min()}.")
    reach = max(float(np.abs(np.log(values)).max()), math.log(1.05))
    norm = LogNorm(vmin=math.exp(-reach), vmax=math.exp(reach))
    figure = Figure(figsize=(1.4 * columns + 2.8, 1.0 * rows + 1.5), layout="constrained")
    ax = figure.subplots()
    shown = ax.imshow(values, cmap=SIGNED_CMAP, norm=norm)
    for i in range(rows):
        for j in range(columns):
            color = ink(shown.get_cmap(), float(norm(values[i, j])))
            ax.text(j, i, texts[i][j], ha="center", va="center", color=color)
    ax.set_xticks(range(columns), column_labels, rotation=20 if max(map(len, column_labels)) > 10 else 0)
    ax.set_yticks(range(rows), row_labels)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.grid(False)
    ax.set_title(title)
    bar = figure.colorbar(shown, ax=ax, label=colorbar_label)
    ends = (math.exp(-reach), math.exp(reach))
    ticks = sorted({*ends, *(tick for tick in RATIO_TICKS if ends[0] * 1.1 < tick < ends[1] / 1.1)})
    bar.set_ticks(ticks, labels=[f"{tick:.2g}" for tick in ticks])
    bar.ax.minorticks_off()
    return figure

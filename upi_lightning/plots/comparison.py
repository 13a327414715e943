"""Models compared: one bar chart per panel (a metric in a budget), attack methods as groups, a bar per model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from upi_lightning.plots.style import series_styles, styled

PANEL_SIZE = (3.4, 2.6)
"""Width and height of one panel, inches."""


@dataclass(frozen=True)
class Bar:
    """One bar: its panel, its group (an attack method), its series (a model), height and error (std)."""

    panel: str
    group: str
    series: str
    value: float
    error: float | None = None


@styled
def comparison_figure(bars: Sequence[Bar], columns: int, title: str = "") -> Figure:
    """Grouped bar charts: a panel per distinct ``panel`` (in order), ``columns`` panels a row.

    In each panel the groups stand side by side and each series has its colour (one legend below);
    errors are drawn as error bars (random's std over its draws).
    """
    panels = list(dict.fromkeys(bar.panel for bar in bars))
    series = list(dict.fromkeys(bar.series for bar in bars))
    styles = series_styles([f"model {name}" for name in series])
    colors = {name: styles[f"model {name}"][0] for name in series}
    columns = max(1, min(columns, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    width = 0.8 / max(1, len(series))
    for ax, panel in zip(axes, panels, strict=False):
        shown = [bar for bar in bars if bar.panel == panel]
        groups = list(dict.fromkeys(bar.group for bar in shown))
        for bar in shown:
            x = groups.index(bar.group) + (series.index(bar.series) - (len(series) - 1) / 2) * width
            error = None if bar.error is None else [bar.error]
            ax.bar(x, bar.value, width, yerr=error, capsize=2, color=colors[bar.series])
        ax.set_xticks(np.arange(len(groups)), groups)
        ax.set_title(panel)
        ax.grid(axis="x", visible=False)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles = [Patch(color=colors[name], label=name) for name in series]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(series), 6), title="model")
    if title:
        figure.suptitle(title)
    return figure

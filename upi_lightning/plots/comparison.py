"""Models compared: one bar chart per panel (a metric in a budget), attack methods as groups, a bar per model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from upi_lightning.plots.style import OKABE_ITO, styled

PANEL_SIZE = (3.4, 2.6)
"""Width and height of one panel, inches."""
HATCHES = ("", "///", "...", "xxx")
"""Beyond the 8 Okabe-Ito colours, the colours come again with these hatches: every model keeps its own look."""


def series_looks(series: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``name -> (colour, hatch)``: the Okabe-Ito colours in turn, a new hatch at each round of them."""
    return {
        name: (OKABE_ITO[index % len(OKABE_ITO)], HATCHES[index // len(OKABE_ITO) % len(HATCHES)])
        for index, name in enumerate(series)
    }


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

    In each panel the groups stand side by side and each series has its colour, and a hatch from the
    ninth series on (:func:`series_looks`; one legend below); errors are drawn as error bars (random's std
    over its draws).
    """
    panels = list(dict.fromkeys(bar.panel for bar in bars))
    series = list(dict.fromkeys(bar.series for bar in bars))
    looks = series_looks(series)
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
            color, hatch = looks[bar.series]
            ax.bar(x, bar.value, width, yerr=error, capsize=2, color=color, hatch=hatch, edgecolor="white", lw=0)
        ax.set_xticks(np.arange(len(groups)), groups)
        ax.set_title(panel)
        ax.grid(axis="x", visible=False)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles = [
        Patch(facecolor=color, hatch=hatch, edgecolor="white", lw=0, label=name)
        for name, (color, hatch) in looks.items()
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(series), 6), title="model")
    if title:
        figure.suptitle(title)
    return figure

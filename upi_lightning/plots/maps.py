"""Saliency maps and perturbations as figures, every map of a figure on one colour scale."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from torch import Tensor

from upi_lightning.plots.style import SALIENCY_CMAP, SIGNED_CMAP, bare, styled


@dataclass(frozen=True)
class Panel:
    """One image of a :func:`saliency_figure`: ``kind`` is ``image``, ``map`` or ``delta``."""

    array: np.ndarray
    kind: str
    title: str = ""


def image_array(image: Tensor) -> np.ndarray:
    """A ``(C, H, W)`` image in ``[0, 1]`` as ``(H, W)`` (grey) or ``(H, W, 3)``, for imshow."""
    array = image.detach().float().cpu().clamp(0, 1).numpy()
    return array[0] if array.shape[0] == 1 else np.moveaxis(array[:3], 0, -1)


def delta_array(delta: Tensor) -> np.ndarray:
    """A ``(C, H, W)`` perturbation as ``(H, W)``: itself when grey, its channel mean otherwise."""
    return delta.detach().float().cpu().mean(dim=0).numpy()


def peak(arrays: Sequence[np.ndarray]) -> float:
    """The largest absolute value in ``arrays`` (1 when all are zero, so a colour scale stays valid)."""
    value = max((float(np.abs(array).max()) for array in arrays), default=0.0)
    return value if value > 0 else 1.0


def show(ax: Axes, panel: Panel, map_peak: float, delta_peak: float) -> AxesImage:
    """Draw ``panel``: images on ``[0, 1]``, maps on ``[0, map_peak]``, perturbations on ``±delta_peak``."""
    bare(ax)
    if panel.kind == "image":
        return ax.imshow(panel.array, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if panel.kind == "map":
        return ax.imshow(panel.array, cmap=SALIENCY_CMAP, vmin=0, vmax=map_peak, interpolation="nearest")
    ax.set_title(panel.title)
    return ax.imshow(panel.array, cmap=SIGNED_CMAP, vmin=-delta_peak, vmax=delta_peak, interpolation="nearest")


@styled
def saliency_figure(
    images: Tensor,
    clean_maps: Tensor,
    perturbed: Sequence[tuple[str, Tensor, Tensor | None]],
    title: str,
    samples_in_columns: bool = False,
) -> Figure:
    """Clean images, their maps, the maps under each perturbation and the perturbations, on shared scales.

    One row per image (one column with ``samples_in_columns``), headed ``image``, ``clean map`` and
    ``<name> map`` per perturbation; a last row shows each universal perturbation under its maps, titled
    ``<name> δ``. Every map is drawn on one ``inferno`` scale from 0 to the largest value over all maps of
    the figure, the perturbations on one ``RdBu_r`` scale centred at 0, each scale with a colour bar (a
    perturbation of several channels is shown as its channel mean).

    Args:
        images: ``(N, C, H, W)`` clean images in ``[0, 1]``.
        clean_maps: ``(N, H, W)`` their saliency maps.
        perturbed: ``(name, maps (N, H, W), delta (C, H, W) or None)`` per perturbation.
        title: the figure title (name model, saliency method, norm and eps: :func:`budget_title`).
        samples_in_columns: one column per image instead of one row.
    """
    grid: list[list[Panel | None]] = [
        [
            Panel(image_array(image), "image"),
            Panel(clean_maps[i].detach().float().cpu().numpy(), "map"),
            *(Panel(maps[i].detach().float().cpu().numpy(), "map") for _, maps, _ in perturbed),
        ]
        for i, image in enumerate(images)
    ]
    headers = ["image", "clean\nmap" if perturbed else "map", *(f"{name}\nmap" for name, _, _ in perturbed)]
    deltas = [None, None, *(None if d is None else Panel(delta_array(d), "delta", f"{n}\nδ") for n, _, d in perturbed)]
    if any(deltas):
        grid.append(deltas)
    if samples_in_columns:
        grid = [list(column) for column in zip(*grid, strict=True)]
    rows, columns = len(grid), len(grid[0])
    figure = Figure(figsize=(1.1 * columns + 1.6, 1.1 * rows + 0.9), layout="constrained")
    figure.suptitle(title)
    axes = figure.subplots(rows, columns, squeeze=False)
    panels = [panel for row in grid for panel in row if panel is not None]
    map_peak = peak([panel.array for panel in panels if panel.kind == "map"])
    delta_peak = peak([panel.array for panel in panels if panel.kind == "delta"])
    drawn: dict[str, list[Axes]] = {"image": [], "map": [], "delta": []}
    scales: dict[str, AxesImage] = {}
    for r, row in enumerate(grid):
        for c, panel in enumerate(row):
            if panel is None:
                axes[r, c].set_axis_off()
                continue
            scales[panel.kind] = show(axes[r, c], panel, map_peak, delta_peak)
            drawn[panel.kind].append(axes[r, c])
    for index, header in enumerate(headers):
        if samples_in_columns:
            axes[index, 0].set_ylabel(header.replace("\n", " "))
        else:
            axes[0, index].set_title(header)
    figure.colorbar(scales["map"], ax=drawn["map"], shrink=0.8, label="saliency (each map sums to 1)")
    if drawn["delta"]:
        where = "right" if samples_in_columns else "bottom"
        figure.colorbar(scales["delta"], ax=drawn["delta"], location=where, shrink=0.8, label="δ (pixels)")
    return figure


@styled
def perturbation_figure(delta: Tensor, title: str) -> Figure:
    """One perturbation ``(C, H, W)`` on a diverging scale centred at 0, with a colour bar (channel mean if C > 1)."""
    panel = Panel(delta_array(delta), "delta", title)
    figure = Figure(figsize=(3.2, 2.8), layout="constrained")
    ax = figure.subplots()
    figure.colorbar(show(ax, panel, 1.0, peak([panel.array])), ax=ax, label="δ (pixels)")
    return figure

"""The sweeps and the TensorBoard scalars of an attack run, drawn from its result rows.

* :func:`write_sweeps`: for each norm attacked at two eps or more, ``sweep_<saliency>_<norm>.png`` and
  ``.pdf`` (and the TensorBoard image ``sweep/<norm>``): every table metric against eps, one curve per
  method, random's mean ± std over its draws as a band.
* :func:`log_metrics`: the :data:`~upi_lightning.tensorboard_layout.DASHBOARD_METRICS` of every row as
  the scalar ``<norm>/<metric>/<method>`` at step ``k``, the index of the row's eps among the norm's eps
  in increasing order (an eps axis that keeps ``8/255`` and ``0.031`` apart), and a custom-scalars
  layout with one chart per norm and metric overlaying the methods, its category naming the eps of
  every step (``L2: step 0 = ε 0.5, step 1 = ε 1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from upi_lightning.attacks.report import TABLE_METRICS
from upi_lightning.attacks.run_folder import sweep_name
from upi_lightning.plots import Curve, budget_title, chart_grid, eps_label, figure_image, save_figure
from upi_lightning.tensorboard_layout import Layout, dashboard_metrics, overlay_layout

Row = dict[str, Any]
"""A result row of ``report.json``: ``method``, ``norm``, ``eps``, ``metrics``..."""

METRIC_TITLES = {
    "relative_l2": "relative L2 distance",
    "topk_intersection": "top-k intersection",
    "spearman": "Spearman rank correlation",
    "kendall": "Kendall τ (top-k union)",
    "com_shift": "centre-of-mass shift (pixels)",
    "flip_rate": "prediction flip rate",
}
"""Chart titles of the sweep metrics."""


def norm_epsilons(results: list[Row]) -> dict[str, list[float]]:
    """The eps of each norm in ``results``, in increasing order (norms in order of appearance)."""
    norms = dict.fromkeys(row["norm"] for row in results)
    return {norm: sorted({row["eps"] for row in results if row["norm"] == norm}) for norm in norms}


def log_metrics(writer: SummaryWriter, results: list[Row]) -> None:
    """Every row's dashboard metrics at its eps index, and the layout overlaying the methods (module docstring)."""
    epsilons = norm_epsilons(results)
    for row in results:
        step = epsilons[row["norm"]].index(row["eps"])
        for metric, value in dashboard_metrics(row["metrics"]).items():
            writer.add_scalar(f"{row['norm']}/{metric}/{row['method']}", value, global_step=step)
    layout: Layout = {}
    for norm, values in epsilons.items():
        methods = list(dict.fromkeys(row["method"] for row in results if row["norm"] == norm))
        steps = ", ".join(f"step {k} = ε {eps_label(eps)}" for k, eps in enumerate(values))
        layout |= overlay_layout(f"{norm.upper()}: {steps}", norm + "/{metric}/{method}", methods)
    writer.add_custom_scalars(layout)


def sweep_figure(rows: list[Row], title: str) -> Figure:
    """The table metrics of ``rows`` (one norm) against eps, one curve per method, bands for ``*_std``."""
    norm = rows[0]["norm"]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    charts: dict[str, dict[str, Curve]] = {}
    for metric in TABLE_METRICS:
        charts[METRIC_TITLES[metric]] = {}
        for method in methods:
            own = sorted((row for row in rows if row["method"] == method), key=lambda row: row["eps"])
            spread = [row["metrics"].get(f"{metric}_std") for row in own]
            charts[METRIC_TITLES[metric]][method] = Curve(
                [row["eps"] for row in own],
                [row["metrics"][metric] for row in own],
                None if None in spread else spread,
            )
    draws = max(int(row["metrics"].get("n_draws", 0)) for row in rows)
    return chart_grid(
        charts,
        title,
        f"ε ({norm.upper()} radius, pixels)",
        x_ticks={eps: eps_label(eps) for eps in norm_epsilons(rows)[norm]},
        band_label=f"mean ± std over {draws} draws",
    )


def write_sweeps(writer: SummaryWriter, output: Path, results: list[Row], model: str, saliency: str) -> None:
    """For each norm attacked at several eps: its sweep figure as PNG, PDF and TensorBoard image (module docstring)."""
    for norm, values in norm_epsilons(results).items():
        if len(values) < 2:
            continue
        rows = [row for row in results if row["norm"] == norm]
        samples = max(int(row["metrics"].get("n_samples", 0)) for row in rows)
        figure = sweep_figure(rows, f"{budget_title(model, saliency, norm)} · mean over {samples} held-out images")
        save_figure(figure, output / sweep_name(saliency, norm))
        writer.add_image(f"sweep/{norm}", figure_image(figure))

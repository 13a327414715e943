"""Every figure of the project, drawn with matplotlib on its Agg canvas (no display, no pyplot state).

* :func:`saliency_figure`: images, their saliency maps and the maps under each perturbation, the
  perturbations themselves, every map of the figure on one colour scale (``maps``);
* :func:`perturbation_figure`: one perturbation on a diverging scale centred at 0 (``maps``);
* :func:`chart_grid`: one chart per metric, every method overlaid, spreads as bands (``charts``);
  :func:`dashboard_figure` adds images below the charts (the TensorBoard export);
* :func:`comparison_figure`: models side by side, a bar per model in each method's group, a panel per
  metric (``comparison``);
* :func:`ratio_heat_map`: a labelled matrix of ratios on a log scale, white at 1 (``heatmap``);
* :func:`save_figure` (PNG and PDF, atomically), :func:`write_figure`, :func:`figure_image` (for
  TensorBoard) (``output``).

The look (``style``): ``inferno`` for saliency, ``RdBu_r`` for signed quantities, the Okabe-Ito palette
for curves, each attack method in a fixed colour and marker, titles that name model, saliency method,
norm and eps (:func:`budget_title`).
"""

from upi_lightning.plots.charts import Curve, chart_grid, dashboard_figure
from upi_lightning.plots.comparison import Bar, comparison_figure, series_looks
from upi_lightning.plots.heatmap import ratio_heat_map
from upi_lightning.plots.maps import perturbation_figure, saliency_figure
from upi_lightning.plots.output import figure_image, save_figure, write_figure
from upi_lightning.plots.style import budget_label, budget_title, eps_label

__all__ = [
    "Bar",
    "Curve",
    "budget_label",
    "budget_title",
    "chart_grid",
    "comparison_figure",
    "dashboard_figure",
    "eps_label",
    "figure_image",
    "perturbation_figure",
    "ratio_heat_map",
    "saliency_figure",
    "save_figure",
    "series_looks",
    "write_figure",
]

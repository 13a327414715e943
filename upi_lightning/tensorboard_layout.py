"""What the attack dashboards put in TensorBoard: the stability metrics, every method on one chart per metric.

Only :data:`DASHBOARD_METRICS` go to TensorBoard; the counts (``n_samples``, ``n_seen``, ``n_draws``), the
spreads over random draws (``*_std``), the perturbation norms and the clean accuracy (the same for every
method) stay in ``report.json`` and the perturbation files. :func:`overlay_layout` builds the
custom-scalars layout (TensorBoard's CUSTOM SCALARS tab) that overlays the methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DASHBOARD_METRICS = (
    "relative_l2",
    "topk_intersection",
    "spearman",
    "kendall",
    "com_shift",
    "cosine",
    "ssim",
    "flip_rate",
)
"""The metrics of an attack shown in TensorBoard, in this order."""

Layout = dict[str, dict[str, list[Any]]]
"""``{category: {chart title: ["Multiline", [tags]]}}``, as ``SummaryWriter.add_custom_scalars`` takes it."""


def dashboard_metrics(metrics: Mapping[str, float], extra: Sequence[str] = ()) -> dict[str, float]:
    """The entries of ``metrics`` named in :data:`DASHBOARD_METRICS` (then ``extra``), in that order."""
    return {name: metrics[name] for name in (*DASHBOARD_METRICS, *extra) if name in metrics}


def overlay_layout(
    category: str, tag: str, methods: Sequence[str], metrics: Sequence[str] = DASHBOARD_METRICS, suffix: str = ""
) -> Layout:
    """One category with a chart per metric, each overlaying the methods' tags.

    Args:
        category: the category title.
        tag: the tag pattern, with ``{method}`` and ``{metric}`` fields (e.g. ``"upi/{method}/{metric}"``).
        methods: the methods overlaid on each chart.
        metrics: one chart per metric, titled by it (and ``suffix``).
        suffix: appended to every chart title (e.g. the budget).
    """
    return {
        category: {
            f"{metric}{suffix}": ["Multiline", [tag.format(method=method, metric=metric) for method in methods]]
            for metric in metrics
        }
    }

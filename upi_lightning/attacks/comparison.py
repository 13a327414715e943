"""Several models side by side: their profiles and attack results in one JSON and one Markdown table.

:func:`comparison` gathers, per model, the :mod:`~upi_lightning.attacks.profile` numbers and the rows of
its attack report (every method fitted on that model: an adaptive attack); :func:`comparison_markdown`
writes the tables and :data:`LEGEND`, which says which question each number answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from upi_lightning.attacks.profile import robust_key
from upi_lightning.attacks.report import metric_cell
from upi_lightning.plots.style import budget_label

HEADLINE_METRICS = ("topk_intersection", "kendall", "spearman", "cosine")
"""The metrics compared across models (the figure's panels)."""
TABLE_METRICS = (*HEADLINE_METRICS, "relative_l2", "flip_rate")
"""Every attack metric of the comparison (``relative_l2`` with a footnote)."""
LEGEND = {
    "topk_intersection": "do the k most important pixels stay?",
    "kendall": "does the order of the top-k pixels stay?",
    "spearman": "does the ranking of all pixels stay?",
    "cosine": "does the map's shape stay (insensitive to its scale)?",
    "relative_l2": "how far the L1-normalized map moves: compare within one model only",
    "flip_rate": "how often the prediction changes (a map attack should not need it)",
    "topk_mass_share": "how concentrated the clean maps are (share of their L1 mass in the top-k pixels)",
    "map_image_cosine": "are the clean maps a copy of the image (cosine with the channel-mean image)?",
}
"""Which question each number answers."""
RELATIVE_L2_NOTE = "comparable only within one model (L1-normalized maps of different concentration)"


def comparison(reports: Mapping[str, Mapping[str, Any]], profiles: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The comparison of models by name: ``{"models": [...], "results": [...], "legend": LEGEND}``.

    Args:
        reports: each model's attack report (``report.json`` of ``attack.py``).
        profiles: each model's :func:`~upi_lightning.attacks.profile.model_profile`, same names.

    Returns:
        ``models``: one row per model, its name, checkpoint and profile; ``results``: one row per model,
        budget and method, ``{"model", "method", "norm", "eps", "metrics"}`` with every metric of the
        attack (random's ``<key>_std`` included).
    """
    models = [{"name": name, "ckpt": reports[name]["description"].get("ckpt"), **profiles[name]} for name in reports]
    results = [
        {"model": name, **{key: row[key] for key in ("method", "norm", "eps")}, "metrics": row["metrics"]}
        for name, report in reports.items()
        for row in report["results"]
    ]
    return {"models": models, "results": results, "legend": LEGEND}


def budgets_of(results: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """The ``(norm, eps)`` of the result rows, in order of first appearance."""
    return list(dict.fromkeys((row["norm"], row["eps"]) for row in results))


def models_table(models: list[dict[str, Any]]) -> list[str]:
    """Markdown table: a row per model with its clean and PGD accuracy, concentration and map-image cosine."""
    robust = [(robust_key(row), budget_label(row["norm"], row["eps"])) for row in models[0]["robust_accuracy"]]
    header = ["model", "clean acc", *[f"PGD acc {label}" for _, label in robust], "top-k mass share", "map-image cos"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for model in models:
        accuracy = {robust_key(row): row["accuracy"] for row in model["robust_accuracy"]}
        cells = [f"{model['clean_accuracy']:.4f}", *[f"{accuracy[key]:.4f}" for key, _ in robust]]
        cells += [f"{model['topk_mass_share']:.4f}", f"{model['map_image_cosine']:.4f}"]
        lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")
    return lines


def budget_table(results: list[dict[str, Any]], norm: str, eps: float) -> list[str]:
    """Markdown table of one budget: a row per method and model, the attack metrics side by side."""
    header = ["method", "model", *HEADLINE_METRICS, "relative_l2 [^l2]", "flip_rate"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    rows = [row for row in results if (row["norm"], row["eps"]) == (norm, eps)]
    for method in dict.fromkeys(row["method"] for row in rows):
        for row in (row for row in rows if row["method"] == method):
            cells = [metric_cell(row["metrics"], name) for name in TABLE_METRICS]
            lines.append(f"| {method} | {row['model']} | " + " | ".join(cells) + " |")
    return lines


def comparison_markdown(compared: Mapping[str, Any], figure: str = "compare.png") -> str:
    """The comparison as Markdown: the models table, one table per budget, the legend and the figure."""
    lines = ["# Model comparison", "", "## Models", "", *models_table(compared["models"])]
    for norm, eps in budgets_of(compared["results"]):
        lines += ["", f"## Attacks, {budget_label(norm, eps)}", "", *budget_table(compared["results"], norm, eps)]
    lines += ["", f"[^l2]: relative L2 is {RELATIVE_L2_NOTE}.", "", "Random: mean ± std over its draws.", ""]
    lines += ["## Which number answers which question", "", "| number | question |", "| --- | --- |"]
    lines += [f"| {name} | {question} |" for name, question in compared["legend"].items()]
    lines += ["", f"![comparison]({figure})", ""]
    return "\n".join(lines)

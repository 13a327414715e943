"""The attack report as Markdown: a table per budget, sweeps over eps, transfer to other models.

Every value comes from the report dictionary that ``report.json`` holds, so the Markdown can be rebuilt
from the JSON alone.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

import torch

from upi_lightning.attacks.run_folder import figure_name, sweep_name
from upi_lightning.attacks.settings import Budget, maps_name

TABLE_METRICS = ("relative_l2", "topk_intersection", "spearman", "kendall", "com_shift", "flip_rate")


def machine_description(device: torch.device, processes: int = 1) -> str:
    """Where a result was measured, e.g. ``x86_64, 2 CPUs, torch 2.5.1, cpu`` (``, 2 processes`` if several)."""
    several = f", {processes} processes" if processes > 1 else ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {device}{several}"


def markdown_report(report: dict[str, Any]) -> str:
    """The results as Markdown: one table per budget, random's mean ± std, each UPI's ratio to random, figures."""
    lines = ["# UPI attack report", ""]
    description = report["description"]
    settings = report["settings"]
    saliency = maps_name(settings)
    attacked = f"`{settings['saliency']['method']}` ({settings['saliency']['score']})"
    captum = settings.get("captum")
    maps = f"Captum's `{captum['method']}` (evaluated; the attacks differentiate {attacked})" if captum else attacked
    lines.append(
        f"Model: `{description.get('model', '?')}`; data: `{description.get('data', '?')}`; saliency: {maps}; "
        f"fit on {report['fit_samples']} samples, evaluated on {report['eval_samples']} held-out samples "
        f"(correctly classified ones); {report['created']}; {report['machine']}."
    )
    header = "| method | " + " | ".join(TABLE_METRICS) + " | relative_l2 / random | fit s |"
    budgets = dict.fromkeys((row["norm"], row["eps"]) for row in report["results"])
    for norm, eps in budgets:
        rows = [row for row in report["results"] if (row["norm"], row["eps"]) == (norm, eps)]
        random_l2 = next((r["metrics"]["relative_l2"] for r in rows if r["method"] == "random"), None)
        lines += ["", f"## {norm} eps = {eps:g}", "", header, "|" + " --- |" * (len(TABLE_METRICS) + 3)]
        for row in rows:
            metrics = row["metrics"]
            cells = [metric_cell(metrics, name) for name in TABLE_METRICS]
            ratio = f"{metrics['relative_l2'] / random_l2:.2f}x" if random_l2 else "-"
            lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {ratio} | {row['fit_seconds']:.1f} |")
        lines += ["", f"![maps]({figure_name(saliency, Budget(norm, eps))}.png)"]
    lines += ["", "Per-sample time is the whole per-sample attack on the evaluated samples."]
    lines += sweep_tables(report["results"], saliency) + transfer_tables(report.get("transfer", []))
    return "\n".join([*lines, ""])


def metric_cell(metrics: dict[str, float], name: str) -> str:
    """``metrics[name]`` to 4 decimals, ``± <name>_std`` when the row has it (random's draws)."""
    std = metrics.get(f"{name}_std")
    return f"{metrics[name]:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def relative_to_random(rows: list[dict[str, Any]], row: dict[str, Any]) -> str:
    """``row``'s relative L2 and its ratio to random's among ``rows`` (same budget and model)."""
    random_l2 = next((r["metrics"]["relative_l2"] for r in rows if r["method"] == "random"), None)
    value = row["metrics"]["relative_l2"]
    return f"{value:.4f}" + (f" ({value / random_l2:.2f}x)" if random_l2 else "")


def method_table(rows: list[dict[str, Any]], column: str, values: list[Any], label: Callable[[Any], str]) -> list[str]:
    """Markdown table: a row per method, a column per value of ``row[column]``.

    Each cell is the relative L2 and its ratio to random's among the rows that share that value.
    """
    lines = ["| method | " + " | ".join(map(label, values)) + " |", "|" + " --- |" * (1 + len(values))]
    for method in dict.fromkeys(row["method"] for row in rows):
        cells = []
        for value in values:
            same = [row for row in rows if row[column] == value]
            cells += [relative_to_random(same, row) for row in same if row["method"] == method] or ["-"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def sweep_tables(results: list[dict[str, Any]], saliency: str) -> list[str]:
    """Markdown: for each norm attacked at several eps, its sweep figure and relative L2 (ratio to random)."""
    lines: list[str] = []
    for norm in dict.fromkeys(row["norm"] for row in results):
        rows = [row for row in results if row["norm"] == norm]
        epsilons = list(dict.fromkeys(row["eps"] for row in rows))
        if len(epsilons) > 1:
            lines += ["", f"## Sweep over {norm} eps: relative L2 (ratio to random)"]
            lines += ["", f"![sweep]({sweep_name(saliency, norm)}.png)"]
            lines += ["", *method_table(rows, "eps", epsilons, lambda eps: f"eps {eps:g}")]
    return lines


def transfer_tables(transfer: list[dict[str, Any]]) -> list[str]:
    """Markdown: per budget, relative L2 (ratio to random on the same model) of each method on each eval model."""
    lines: list[str] = []
    models = list(dict.fromkeys(row["eval_model"] for row in transfer))
    for norm, eps in dict.fromkeys((row["norm"], row["eps"]) for row in transfer):
        rows = [row for row in transfer if (row["norm"], row["eps"]) == (norm, eps)]
        lines += ["", f"## Transfer, {norm} eps = {eps:g}: relative L2 on other models (ratio to random there)", ""]
        lines += method_table(rows, "eval_model", models, lambda model: f"`{model}`")
    return lines

"""Transfer matrix: fit universal perturbations on each classifier, evaluate them on every classifier.

For each ``--model NAME=CKPT`` this runs ``attack.py`` (``--config``, one budget) on that checkpoint with
every other checkpoint as ``--eval_ckpt``, then gathers, for each method, the matrix
``M[fit model][eval model]`` of the relative L2 change of the saliency maps and its ratio to random
noise of the same norm on the evaluated model. Writes ``matrix.json``, ``matrix.md`` and one heat map
per method (``transfer_<method>_<norm>_eps<eps>.png`` and ``.pdf``: the ratios on a diverging scale,
white at 1, each cell printing the relative L2 and the ratio) under ``--output``; each attack's own
report is kept in ``<output>/fit_<NAME>``, and attacks already reported are not run again.

Run: ``python studies/transfer_matrix.py --model small_cnn=runs/mnist/version_0/checkpoints/last.ckpt
--model mlp=runs/mnist_mlp/version_0/checkpoints/last.ckpt``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from upi_lightning.attack_cli import attack_main  # noqa: E402
from upi_lightning.attacks.settings import Budget  # noqa: E402
from upi_lightning.errors import UPIError, run_reporting_errors  # noqa: E402
from upi_lightning.io import atomic_write_json, atomic_write_text  # noqa: E402
from upi_lightning.plots import budget_label, ratio_heat_map, save_figure  # noqa: E402

METHODS = ("upi_grad", "upi_pca", "uap")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The study's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=CKPT, at least two.")
    parser.add_argument("--config", default=str(REPO / "configs" / "attack_mnist.yaml"), help="attack.py config.")
    parser.add_argument("--data-root", default="data", help="data.init_args.root of the config's data module.")
    parser.add_argument("--norm", default="l2")
    parser.add_argument("--eps", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=1000, help="Fit and held-out samples (each).")
    parser.add_argument("--output", default="runs/transfer_mnist")
    args = parser.parse_args(argv)
    if bad := [item for item in args.model if "=" not in item]:
        raise UPIError(f"--model takes NAME=CKPT, got {bad[0]!r}.")
    args.models = dict(item.split("=", 1) for item in args.model)
    if len(args.models) < 2:
        raise UPIError("give at least two --model NAME=CKPT (two different names).")
    return args


def attack(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``attack.py`` on model ``name``, evaluated on every other model too (skipped when reported)."""
    output = Path(args.output) / f"fit_{name}"
    if (output / "report.json").is_file():
        return json.loads((output / "report.json").read_text())
    others = [f"--eval_ckpt={ckpt}" for other, ckpt in args.models.items() if other != name]
    return attack_main(
        [
            f"--config={args.config}",
            f"--ckpt={args.models[name]}",
            *others,
            f"--data.init_args.root={args.data_root}",
            f"--attack.budgets=[{{norm: {args.norm}, eps: {args.eps}}}]",
            f"--attack.methods=[{', '.join(METHODS)}, random]",
            f"--attack.fit_samples={args.samples}",
            f"--attack.eval_samples={args.samples}",
            f"--output={output}",
            "--progress=false",
        ]
    )


def entries(name: str, report: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """``{eval model: {method: {relative_l2, ratio}}}`` of one report (its own model and the transfers)."""
    rows = {name: report["results"]}
    for other, ckpt in args.models.items():
        if other != name:
            rows[other] = [row for row in report["transfer"] if row["eval_model"].endswith(f"({ckpt})")]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for model, model_rows in rows.items():
        random_l2 = next(row["metrics"]["relative_l2"] for row in model_rows if row["method"] == "random")
        table[model] = {}
        for row in model_rows:
            value = row["metrics"]["relative_l2"]
            table[model][row["method"]] = {"relative_l2": value, "ratio": value / random_l2}
    return table


def main(argv: list[str] | None = None) -> None:
    """Attack every model, gather the matrices, write JSON, Markdown and heat maps."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    names = list(args.models)
    reports = {name: attack(name, args) for name in names}
    matrix = {name: entries(name, report, args) for name, report in reports.items()}
    saliency = reports[names[0]]["settings"]["saliency"]["method"]
    budget = Budget(args.norm, args.eps)
    output = Path(args.output)
    summary = {"models": args.models, "budget": [args.norm, args.eps], "samples": args.samples, "matrix": matrix}
    atomic_write_json(output / "matrix.json", summary)
    lines = [
        f"# Transfer matrix ({args.norm} eps {args.eps:g}, {args.samples} fit / {args.samples} held-out samples)",
        "",
        "Rows: the model the perturbation was fitted on; columns: the model it is evaluated on. Cells: relative L2",
        "change of the saliency maps (ratio to random noise of the same norm on the evaluated model).",
    ]
    for method in METHODS:
        lines += ["", f"## {method}", "", "| fit \\ eval | " + " | ".join(names) + " |"]
        lines.append("|" + " --- |" * (1 + len(names)))
        for fit in names:
            cells = [f"{c['relative_l2']:.4f} ({c['ratio']:.2f}x)" for c in (matrix[fit][ev][method] for ev in names)]
            lines.append(f"| {fit} | " + " | ".join(cells) + " |")
        cells = [[matrix[fit][ev][method] for ev in names] for fit in names]
        title = f"{method} · {saliency} maps · {budget_label(args.norm, args.eps)} · {args.samples} held-out images"
        figure = ratio_heat_map(
            torch.tensor([[cell["ratio"] for cell in row] for row in cells]),
            names,
            names,
            title,
            "relative L2 of the maps / random's",
            [[f"{cell['relative_l2']:.3f}\n{cell['ratio']:.2f}×" for cell in row] for row in cells],
        )
        save_figure(figure, output / f"transfer_{method}_{budget.tag}")
        lines += ["", f"![{method}](transfer_{method}_{budget.tag}.png)"]
    atomic_write_text(output / "matrix.md", "\n".join([*lines, ""]))
    print("\n".join(lines))


if __name__ == "__main__":
    run_reporting_errors(main)

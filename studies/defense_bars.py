"""Issue 15's two bars, read from a finished study: which defense meets them, with every number beside it.

* **Bar 1**: an interpretation mode (not plain PGD-AT) whose top-100 intersection under the per-sample
  attack is at least ``--margin-1`` above the standard model's and at least PGD-AT's, with clean accuracy
  at least ``--min-accuracy``.
* **Bar 2**: the UPI-adversarial mode: top-100 intersection under UPI-Grad at least ``--margin-2`` above the
  standard model's, Spearman and cosine under UPI-Grad not below its, under random noise no headline metric
  below its, the same clean accuracy, and time per epoch at most ``--max-cost`` times standard
  (``--cost``: the measured multiple, e.g. from ``benchmarks/training_modes.py``; the study's own times
  are of fits side by side).

Clean accuracy is the study's test accuracy on the whole test set (``table.json``); the attack metrics are
the protocol's (``compare.json``).

Run: ``python studies/defense_bars.py --study runs/study15/mnist --protocol runs/study15/protocol_mnist``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HEADLINE = ("topk_intersection", "kendall", "spearman", "cosine")
NOT_INTERPRETATION = ("standard", "pgd")
"""Modes that do not count for bar 1."""


def metrics_by_model(compared: dict[str, Any], method: str) -> dict[str, dict[str, float]]:
    """``model -> metrics`` of one attack method (the first budget)."""
    return {row["model"]: row["metrics"] for row in compared["results"] if row["method"] == method}


def bar_1(accuracy: dict[str, float], per_sample: dict[str, dict[str, float]], args: argparse.Namespace) -> list[str]:
    """One line per interpretation mode: its per-sample top-k against the standard model's and PGD-AT's."""
    standard, pgd = per_sample["standard"]["topk_intersection"], per_sample.get("pgd", {}).get("topk_intersection")
    lines = [f"Bar 1 (per-sample top-k; standard {standard:.3f}, PGD-AT {pgd if pgd is None else f'{pgd:.3f}'}):"]
    for model, metrics in per_sample.items():
        if model in NOT_INTERPRETATION or model not in accuracy:
            continue
        topk = metrics["topk_intersection"]
        checks = {
            f"top-k {topk:.3f} >= standard + {args.margin_1}": topk >= standard + args.margin_1,
            "top-k >= PGD-AT's": pgd is None or topk >= pgd,
            f"clean {accuracy[model]:.4f} >= {args.min_accuracy}": accuracy[model] >= args.min_accuracy,
        }
        verdict = "MET" if all(checks.values()) else "not met"
        lines.append(f"  {model}: {verdict} ({'; '.join(f'{k}: {v}' for k, v in checks.items())})")
    return lines


def bar_2(accuracy: dict[str, float], compared: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The UPI-adversarial mode against the standard model."""
    upi, random = metrics_by_model(compared, "upi_grad"), metrics_by_model(compared, "random")
    mode, standard = args.upi_mode, "standard"
    checks = {
        f"UPI-Grad top-k {upi[mode]['topk_intersection']:.3f} >= {upi[standard]['topk_intersection']:.3f} + "
        f"{args.margin_2}": upi[mode]["topk_intersection"] >= upi[standard]["topk_intersection"] + args.margin_2
    }
    for key in ("spearman", "cosine"):
        checks[f"UPI-Grad {key} {upi[mode][key]:.3f} >= {upi[standard][key]:.3f}"] = (
            upi[mode][key] >= upi[standard][key]
        )
    for key in HEADLINE:
        checks[f"random {key} {random[mode][key]:.3f} >= {random[standard][key]:.3f}"] = (
            random[mode][key] >= random[standard][key]
        )
    checks[f"clean {accuracy[mode]:.4f} >= {args.min_accuracy}"] = accuracy[mode] >= args.min_accuracy
    if args.cost is not None:
        checks[f"time per epoch {args.cost:.2f}x <= {args.max_cost}x"] = args.cost <= args.max_cost
    lines = [f"Bar 2 ({mode}): {'MET' if all(checks.values()) else 'not met'}"]
    lines += [f"  {'ok ' if ok else 'NO '} {check}" for check, ok in checks.items()]
    return lines


def main(argv: list[str] | None = None) -> None:
    """Print both bars."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--study",
        type=Path,
        nargs="+",
        required=True,
        help="the study's --output (its table.json); several folders are merged, a later one's mode replacing an "
        "earlier one's (a mode retrained in a folder of its own)",
    )
    parser.add_argument("--protocol", type=Path, required=True, help="the protocol's folder (its compare.json)")
    parser.add_argument("--upi-mode", default="upi_adv")
    parser.add_argument("--margin-1", type=float, default=0.15)
    parser.add_argument("--margin-2", type=float, default=0.10)
    parser.add_argument("--min-accuracy", type=float, default=0.98)
    parser.add_argument("--cost", type=float, default=None, help="measured time per epoch of --upi-mode / standard")
    parser.add_argument("--max-cost", type=float, default=4.0)
    args = parser.parse_args(argv)
    for path in [*(study / "table.json" for study in args.study), args.protocol / "compare.json"]:
        if not path.is_file():
            parser.error(f"{path} does not exist: run the study (and its protocol) first")
    accuracy = {
        row["mode"]: row["clean_acc"] for study in args.study for row in json.loads((study / "table.json").read_text())
    }
    compared = json.loads((args.protocol / "compare.json").read_text())
    missing = [mode for mode in ("standard", args.upi_mode) if mode not in accuracy]
    missing += [mode for mode in ("standard", args.upi_mode) if mode not in metrics_by_model(compared, "upi_grad")]
    if missing:
        parser.error(f"no finished study or protocol row for {sorted(set(missing))}: train and compare them first")
    print("\n".join(bar_1(accuracy, metrics_by_model(compared, "per_sample"), args)))
    print("\n".join(bar_2(accuracy, compared, args)))


if __name__ == "__main__":
    main()

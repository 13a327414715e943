"""Train a small CNN in every training mode, then measure what each mode buys and costs.

For each mode (standard, input-gradient norm, IR, UPI-adversarial, consistency, PGD-AT, and the
literature's defenses: softplus, IG-NORM, IG-SUM-NORM, gradient consistency, attributional AT; or any
variant with a ``configs/<dataset>_<name>.yaml``) on MNIST or the CIFAR-10 subset, this script

1. trains ``configs/<dataset>[_<mode>].yaml`` for ``--epochs`` epochs (``train.py fit``), timing the fit;
2. tests the last checkpoint (``train.py test``): clean accuracy on the whole test set and PGD robust
   accuracy (40 steps, random start) at the dataset's budgets on its first ``--robust-samples``;
3. runs the comparison protocol (``compare.py`` with ``configs/compare_<dataset>.yaml``) on every mode
   trained so far, into ``--protocol-output``: each attack fitted on the model it evaluates, clean and PGD
   accuracy, map concentration; ``compare.md`` / ``compare.json`` / ``compare.png`` there,

and writes ``table.md`` / ``table.json`` under ``--output`` from every mode fitted and tested so far. Each
step's result is saved as it finishes and skipped when present (the protocol resumes per model), so an
interrupted study resumes where it stopped, and several invocations with disjoint ``--modes`` can run side
by side. The configs each run used (with the study's overrides: epochs, output folder, data, fewer PGD
steps, IR teacher samples and IG points when asked) are written to ``<output>/configs``.

Run: ``python studies/training_modes.py --data-root data --epochs 3`` (``studies/defenses_gpu.sh`` runs
it on a GPU machine, several modes side by side).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from upi_lightning.cli import train_cli  # noqa: E402
from upi_lightning.compare_cli import compare_main  # noqa: E402
from upi_lightning.errors import run_reporting_errors  # noqa: E402
from upi_lightning.eta import TimeLeft  # noqa: E402
from upi_lightning.io import atomic_write_json, atomic_write_text  # noqa: E402

MODES = (
    "standard",
    "input_grad",
    "ir",
    "upi_adv",
    "consistency",
    "pgd",
    "softplus",
    "ig_norm",
    "ig_sum_norm",
    "gradient_consistency",
    "attributional_adv",
    "ssr",
)
"""Every training mode; ``mode`` trains ``configs/<dataset>_<mode>.yaml`` (``standard``: ``<dataset>.yaml``)."""
DATASETS = {"mnist": "root", "cifar10_subset": "path"}
"""The study's datasets and the data module option ``--data-root`` sets (MNIST's folder, the subset's file)."""
PGD_TRAINED = ("PGDAdversarial", "IGNorm", "IGSumNorm", "AttributionalAdversarial")
"""Regularizers whose PGD steps ``--pgd-train-steps`` replaces."""
ROBUST_BUDGETS = {
    "mnist": [("linf", 0.1), ("linf", 0.2), ("linf", 0.3), ("l2", 1.5), ("l2", 2.5)],
    "cifar10_subset": [("linf", 2 / 255), ("linf", 8 / 255), ("l2", 0.25), ("l2", 0.5)],
}
"""PGD robust accuracy budgets per dataset (MNIST: IR's evaluation; CIFAR: the usual 8/255 and L2 0.5)."""
STAGES = ("test", "protocol")
"""What runs after the fits: PGD robust accuracy (``train.py test``), the comparison protocol (``compare.py``)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The study's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=list(DATASETS), help="Which configs to train.")
    parser.add_argument(
        "--data-root", default="data", help="MNIST: folder holding MNIST/raw; cifar10_subset: the .npz file."
    )
    parser.add_argument("--output", default="runs/study_training_modes", help="Output folder.")
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs of every mode.")
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), help="Modes: MODES, or NAME of any configs/<dataset>_NAME.yaml."
    )
    parser.add_argument(
        "--stages", nargs="+", default=list(STAGES), choices=STAGES, help="Steps after the fit (e.g. test alone)."
    )
    parser.add_argument("--robust-samples", type=int, default=500, help="Test images attacked by PGD.")
    parser.add_argument("--protocol-output", default=None, help="The protocol's folder (default: <output>/protocol).")
    parser.add_argument(
        "--pgd-train-steps", type=int, default=None, help="PGD steps of the PGD-trained modes (None: each config's)."
    )
    parser.add_argument("--ir-samples", type=int, default=None, help="IR teacher SmoothGrad copies (None: 50).")
    parser.add_argument("--ig-steps", type=int, default=None, help="IG-NORM's IG points (None: the configs').")
    parser.add_argument(
        "--attack-ig-steps", type=int, default=None, help="IG points per PGD step of IG-NORM (None: the configs')."
    )
    parser.add_argument("--limit-batches", type=int, default=None, help="Batches per epoch and split (smoke runs).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default).")
    args = parser.parse_args(argv)
    missing = [mode for mode in args.modes if not (REPO / "configs" / config_name(args.dataset, mode)).is_file()]
    if missing:
        first = config_name(args.dataset, missing[0])
        parser.error(f"no config for modes {missing} on {args.dataset}: configs/{first} does not exist")
    return args


def robust_callbacks(dataset: str, eval_batch_size: int, robust_samples: int) -> list[dict[str, Any]]:
    """RobustAccuracy callbacks (test stage) attacking the first ``robust_samples`` test images."""
    max_batches = max(1, robust_samples // eval_batch_size)
    return [
        {
            "class_path": "upi_lightning.callbacks.RobustAccuracy",
            "init_args": {"norm": norm, "eps": eps, "steps": 40, "max_batches": max_batches},
        }
        for norm, eps in ROBUST_BUDGETS[dataset]
    ]


def config_name(dataset: str, mode: str) -> str:
    """The config file of ``mode`` on ``dataset``."""
    return f"{dataset}.yaml" if mode == "standard" else f"{dataset}_{mode}.yaml"


def mode_config(mode: str, args: argparse.Namespace, teacher: Path | None) -> Path:
    """Write the config of ``mode`` with the study's overrides; return its path."""
    config = yaml.safe_load((REPO / "configs" / config_name(args.dataset, mode)).read_text())
    trainer = config["trainer"]
    trainer["max_epochs"] = args.epochs
    trainer["logger"]["init_args"].update(save_dir=str(Path(args.output)), name=mode, version="fit")
    if args.limit_batches is not None:
        for split in ("train", "val", "test"):
            trainer[f"limit_{split}_batches"] = args.limit_batches
    data = config["data"]["init_args"]
    data[DATASETS[args.dataset]] = args.data_root
    trainer["callbacks"] = robust_callbacks(args.dataset, data["eval_batch_size"], args.robust_samples)
    for regularizer in config["model"].get("regularizers") or []:
        init = regularizer["init_args"]
        name = regularizer["class_path"].rsplit(".", 1)[1]
        if name in PGD_TRAINED and args.pgd_train_steps is not None:
            # Same radius, fewer steps: step 2.5 eps / steps (Madry et al.'s rule of thumb).
            init.update(steps=args.pgd_train_steps, step_size=2.5 * init["eps"] / args.pgd_train_steps)
        if name == "InterpretationRegularization":
            if teacher is None:
                raise SystemExit("IR needs the standard mode's checkpoint as its teacher; run --modes standard ir.")
            init["teacher_ckpt"] = str(teacher)
            if args.ir_samples is not None:
                init["n_samples"] = args.ir_samples
        for option in ("ig_steps", "attack_ig_steps"):
            if name in ("IGNorm", "IGSumNorm") and getattr(args, option) is not None:
                init[option] = getattr(args, option)
    path = Path(args.output) / "configs" / f"{mode}.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def load_json(path: Path) -> dict[str, Any] | None:
    """A step's saved result, or ``None`` when the step has not finished yet."""
    return json.loads(path.read_text()) if path.is_file() else None


def fit(mode: str, config: Path, out: Path) -> dict[str, Any]:
    """``train.py fit``; its wall time and the last checkpoint (skipped when done before)."""
    done = load_json(out / "fit.json")
    if done is not None:
        return done
    start = time.perf_counter()
    cli = train_cli(["fit", "--config", str(config)])
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "epochs": cli.trainer.current_epoch,
        "ckpt": cli.last_checkpoint_path,
    }
    atomic_write_json(out / "fit.json", result)
    return result


def test(config: Path, ckpt: str, out: Path) -> dict[str, float]:
    """``train.py test``: clean and PGD robust accuracy of the checkpoint."""
    done = load_json(out / "test.json")
    if done is not None:
        return done
    version = ["--trainer.logger.init_args.version", "test"]
    cli = train_cli(["test", "--config", str(config), "--ckpt_path", ckpt, *version])
    metrics = {key: float(value) for key, value in cli.trainer.callback_metrics.items() if key.startswith("test/")}
    atomic_write_json(out / "test.json", metrics)
    return metrics


def protocol(args: argparse.Namespace) -> None:
    """``compare.py`` on every mode fitted so far (each model's attacks resume from its folder)."""
    output = Path(args.output)
    fitted = {mode: load_json(output / mode / "fit.json") for mode in modes_in(output)}
    models = [f"{mode}={result['ckpt']}" for mode, result in fitted.items() if result is not None]
    if len(models) < 2:
        print("protocol: fewer than two modes fitted yet, nothing to compare", flush=True)
        return
    compare_main(
        [
            "--config",
            str(REPO / "configs" / f"compare_{args.dataset}.yaml"),
            f"--data.init_args.{DATASETS[args.dataset]}",
            args.data_root,
            "--output",
            args.protocol_output or str(output / "protocol"),
            "--progress",
            "false",
            "--models",
            *models,
        ]
    )


def row_of(mode: str, dataset: str, fit_result: dict[str, Any], metrics: dict[str, float]) -> dict[str, Any]:
    """One table row from the fit time and the test metrics of a mode."""
    row: dict[str, Any] = {"mode": mode, "clean_acc": metrics["test/acc"]}
    for norm, eps in ROBUST_BUDGETS[dataset]:
        row[f"robust_{norm}_{eps:g}"] = metrics[f"test/robust_acc_{norm}_{eps:g}"]
    row["seconds_per_epoch"] = fit_result["seconds"] / max(1, fit_result["epochs"])
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The table as Markdown, time per epoch also as a multiple of the standard mode's."""
    standard = next((row["seconds_per_epoch"] for row in rows if row["mode"] == "standard"), None)
    budgets = ROBUST_BUDGETS[args.dataset]
    header = ["mode", "clean acc", *(f"{norm} {eps:.4g}" for norm, eps in budgets), "s / epoch", "x standard"]
    lines = [
        f"{args.dataset}: PGD robust accuracy (40 steps) on the first {args.robust_samples} test images; "
        f"{args.epochs} epochs per mode.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for row in rows:
        cells = [row["mode"], f"{row['clean_acc']:.4f}"]
        cells += [f"{row[f'robust_{norm}_{eps:g}']:.3f}" for norm, eps in budgets]
        cells.append(f"{row['seconds_per_epoch']:.1f}")
        cells.append(f"{row['seconds_per_epoch'] / standard:.2f}x" if standard else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def modes_in(output: Path) -> list[str]:
    """The modes with a folder in ``output``: :data:`MODES` first, then other variants by name."""
    variants = sorted(path.parent.name for path in output.glob("*/fit.json") if path.parent.name not in MODES)
    return [mode for mode in [*MODES, *variants] if (output / mode).is_dir()]


def finished_rows(output: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Table rows of every mode whose fit and test are saved."""
    rows = []
    for mode in modes_in(output):
        fitted, tested = load_json(output / mode / "fit.json"), load_json(output / mode / "test.json")
        if fitted is not None and tested is not None:
            rows.append(row_of(mode, args.dataset, fitted, tested))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run every requested mode (resuming finished steps) and rewrite the table after each."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    standard_fit = load_json(output / "standard" / "fit.json")
    teacher = None if standard_fit is None else Path(standard_fit["ckpt"])
    time_left = TimeLeft(len(args.modes))
    for mode in args.modes:
        out = output / mode
        computed = load_json(out / "test.json") is None
        config = mode_config(mode, args, teacher)
        fit_result = fit(mode, config, out)
        if mode == "standard":
            teacher = Path(fit_result["ckpt"])
        if "test" in args.stages:
            test(config, fit_result["ckpt"], out)
        rows = finished_rows(output, args)
        atomic_write_json(output / "table.json", rows)
        atomic_write_text(output / "table.md", markdown(rows, args))
        print(markdown(rows, args), flush=True)
        print(f"{mode}: {time_left.step(computed)}", flush=True)
    if "protocol" in args.stages:
        protocol(args)


if __name__ == "__main__":
    run_reporting_errors(main)

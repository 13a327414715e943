"""Why UPI-adversarial training did not harden maps, and which change does: short MNIST runs of its variants.

Each variant is ``configs/mnist_upi_adv_l2.yaml`` (the mode as configured before issue 15) with some
``UPIAdversarial`` options (and, under ``model``, some model options) replaced (or the standard model, no
regularizer), trained for ``--steps`` steps; the script then

1. reads the mode's diagnostics from TensorBoard (``train/upi_adversarial/*``: the L2 norm of the mean
   gradient w.r.t. ``delta``, how far ``delta`` moved per update, the term's parts), averaged over the
   last half of training;
2. profiles its clean maps (top-k mass share, map-image cosine: is a stable map merely peaked, or unlike
   the image?) on the attack's held-out samples;
3. attacks the checkpoint with ``attack.py`` (``configs/attack_mnist.yaml``: UPI-Grad and random noise
   at L2 ``--upi-eps``, fitted on ``--attack-samples`` and evaluated on as many held-out samples),

and writes ``table.md`` / ``table.json`` under ``--output`` from every variant finished so far. Each step is
saved as it finishes and skipped when present (resumable, like ``studies/training_modes.py``).

Run: ``python studies/upi_adversarial_variants.py --data-root data --steps 469``
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_modes import REPO, fit, load_json

from upi_lightning.attack_cli import attack_main
from upi_lightning.attacks.profile import clean_map_profile
from upi_lightning.attacks.runner import attack_loaders
from upi_lightning.attacks.settings import AttackSettings
from upi_lightning.checkpoints import load_classifier
from upi_lightning.data import MNISTDataModule
from upi_lightning.errors import run_reporting_errors
from upi_lightning.io import atomic_write_json, atomic_write_text

COSINE: dict[str, Any] = {"weight": 5.0, "objective": {"saliency": {"method": "gradient"}, "dissimilarity": "cosine"}}
"""The cosine dissimilarity in place of the L2 one, the start of every variant below but the first two."""
VARIANTS: dict[str, dict[str, Any] | None] = {
    "standard": None,
    "l2 (issue-6 config)": {},
    "cosine": COSINE,
    "cosine + 1 random": {**COSINE, "random_draws": 1},
    "cosine + CE(x+delta)": {**COSINE, "adversarial_ce": 1.0},
    "cosine + 1 random + CE(x+delta)": {**COSINE, "random_draws": 1, "adversarial_ce": 1.0},
    "cosine + CE(x+delta), softplus network": {
        **COSINE,
        "adversarial_ce": 1.0,
        "model": {"activation": "softplus", "softplus_beta": 10.0},
    },
    "cosine, update every step": {**COSINE, "every_n_steps": 1},
}
METRICS = ("topk_intersection", "kendall", "spearman", "cosine", "relative_l2", "flip_rate")


def slug(name: str) -> str:
    """A folder name for a variant."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def variant_config(name: str, args: argparse.Namespace) -> Path:
    """Write the config of variant ``name``; return its path."""
    overrides = VARIANTS[name]
    config = yaml.safe_load((REPO / "configs" / "mnist_upi_adv_l2.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_epochs=None, max_steps=args.steps, log_every_n_steps=10, callbacks=[])
    trainer["logger"]["init_args"].update(save_dir=str(Path(args.output)), name=slug(name), version="fit")
    config["data"]["init_args"]["root"] = args.data_root
    if overrides is None:
        config["model"].pop("regularizers")
    else:
        options = dict(overrides)
        config["model"].update(options.pop("model", {}))
        config["model"]["regularizers"][0]["init_args"].update(options)
    path = Path(args.output) / "configs" / f"{slug(name)}.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def diagnostics(logs: Path) -> dict[str, float]:
    """Mean of every ``train/upi_adversarial/*`` scalar (and the term) over the last half of training."""
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    events.Reload()
    summary = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith("train/upi_adversarial") and not tag.endswith("_epoch"):
            values = [event.value for event in events.Scalars(tag)]
            key = tag.removeprefix("train/upi_adversarial").strip("/")
            summary["term" if key == "_step" else key] = statistics.fmean(values[len(values) // 2 :])
    return summary


def attack(ckpt: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``attack.py``: UPI-Grad and random noise at L2 ``--upi-eps``."""
    done = load_json(out / "attack" / "report.json")
    if done is not None:
        return done
    options = {
        "--data.init_args.root": args.data_root,
        "--attack.budgets": json.dumps([{"norm": "l2", "eps": args.upi_eps}]),
        "--attack.methods": json.dumps(["upi_grad", "random"]),
        "--attack.fit_samples": str(args.attack_samples),
        "--attack.eval_samples": str(args.attack_samples),
        "--output": str(out / "attack"),
        "--progress": "false",
    }
    arguments = ["--config", str(REPO / "configs" / "attack_mnist.yaml"), "--ckpt", ckpt]
    report = attack_main([*arguments, *(item for pair in options.items() for item in pair)])
    assert report is not None  # one process
    return report


def map_profile(ckpt: str, args: argparse.Namespace) -> dict[str, float]:
    """Top-k mass share and map-image cosine of the clean maps of the attack's held-out samples."""
    datamodule = MNISTDataModule(root=args.data_root, eval_batch_size=500)
    datamodule.prepare_data()
    datamodule.setup("test")
    settings = AttackSettings(fit_samples=args.attack_samples, eval_samples=args.attack_samples)
    evaluated = attack_loaders(datamodule, settings)[1]
    return clean_map_profile(load_classifier(ckpt, torch.device("cpu")).eval(), evaluated, settings)


def row_of(
    name: str, fit_result: dict[str, Any], report: dict[str, Any], logs: dict[str, float], profile: dict[str, float]
) -> dict[str, Any]:
    """One table row: fit time, clean accuracy, the map profile, each method's metrics, the diagnostics."""
    methods = {r["method"]: {key: r["metrics"][key] for key in METRICS} for r in report["results"]}
    clean = report["results"][0]["metrics"]["clean_accuracy"]
    return {
        "variant": name,
        "seconds": fit_result["seconds"],
        "clean_accuracy": clean,
        "profile": profile,
        **methods,
        "diagnostics": logs,
    }


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The study's table."""
    head = (
        f"UPI-adversarial variants: MNIST small CNN, {args.steps} training steps, attacks at L2 eps {args.upi_eps} "
        f"(fit {args.attack_samples} / eval {args.attack_samples}); diagnostics: mean over the last half of "
        "training.\n\n"
        "| variant | fit s | clean acc | top-k mass / map-image cos | UPI-Grad top-k / Kendall / Spearman / cosine | "
        "random top-k / Kendall / Spearman / cosine | grad norm wrt delta | delta moved / update | term delta | "
        "term random |\n"
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        cells = [" / ".join(f"{row[m][key]:.3f}" for key in METRICS[:4]) for m in ("upi_grad", "random")]
        logs = row["diagnostics"]
        extra = [
            f"{logs[k]:.3g}" if k in logs else "-"
            for k in ("delta_grad_norm", "delta_step", "term_delta", "term_random")
        ]
        lines.append(
            f"| {row['variant']} | {row['seconds']:.0f} | {row['clean_accuracy']:.4f} | "
            f"{row['profile']['topk_mass_share']:.3f} / {row['profile']['map_image_cosine']:.3f} | "
            f"{cells[0]} | {cells[1]} | " + " | ".join(extra) + " |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Train, read and attack every variant asked for; write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--output", default="runs/study_upi_adversarial_variants")
    parser.add_argument("--steps", type=int, default=469, help="training steps of every variant (469 = 1 epoch)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--attack-samples", type=int, default=500)
    parser.add_argument("--upi-eps", type=float, default=1.0)
    args = parser.parse_args(argv)
    output = Path(args.output)
    for name in args.variants:
        out = output / slug(name)
        fitted = fit(name, variant_config(name, args), out)
        report = attack(fitted["ckpt"], args, out)
        logs = diagnostics(output / slug(name) / "fit") if VARIANTS[name] is not None else {}
        saved = load_json(out / "row.json")
        profile = saved["profile"] if saved is not None and "profile" in saved else map_profile(fitted["ckpt"], args)
        atomic_write_json(out / "row.json", row_of(name, fitted, report, logs, profile))
    rows = [load_json(output / slug(name) / "row.json") for name in VARIANTS]
    finished = [row for row in rows if row is not None]
    atomic_write_json(output / "table.json", finished)
    atomic_write_text(output / "table.md", markdown(finished, args))
    print((output / "table.md").read_text())


if __name__ == "__main__":
    run_reporting_errors(main)

"""Every training mode against standard training, next to its arithmetic cost (issue 18 target: <= 1.3).

Each mode is the ``model`` section of its ``configs/mnist_<mode>.yaml`` (the MNIST small CNN, Adam, its
one ``model.regularizers`` entry built by ``regularizer_from_config``); ``standard`` is
``configs/mnist.yaml``. A real Lightning fit runs ``--warmup`` + ``--steps`` steps on the same batch of
``--batch-size`` random ``[0, 1]`` images with random labels, and a callback times each step from
``on_train_batch_start`` to ``on_train_batch_end`` (regularizer hooks, forward, backward, optimizer).
Fits run in turn (round-robin, ``harness.interleaved_seconds``) ``--repeats`` times; the table shows
the minimum over repeats of the mean seconds per timed step, its multiple of standard, the mode's
**count** of forward+backward units and ``multiple / count`` (the overhead beyond arithmetic; target <= 1.3).

Counts, in units of one forward+backward pass of the batch (a forward ~1/3, a backward ~2/3): standard
1; a double-backprop term (input gradient with ``create_graph`` and the backward through it) 3, plus
the clean step it shares its forward with: 3 in all (SSR takes one such input gradient per class:
``1 + 2K``); a k-step PGD k (input-gradient steps) plus the clean and adversarial training passes
(k + 2); an IG of m points on a graph m times the cost of its gradient. Each mode's formula is printed
beside its count (column ``how``), computed from its settings.
The batch repeats, so the IR teacher targets come from the cache after the first step (as from the
second epoch on; the first epoch adds a teacher SmoothGrad of ``n_samples`` points per batch), and
UPIAdversarial's ``every_n_steps`` updates are amortized when ``--steps`` is a multiple of it.

    python benchmarks/training_modes.py                                  # all modes, 2 threads
    python benchmarks/training_modes.py --modes standard pgd --steps 2 --warmup 1
    python benchmarks/training_modes.py --device cuda --threads 0 --json modes.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from harness import add_run_arguments, interleaved_seconds, machine_line, set_threads, write_json
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from upi_lightning.module import Classifier
from upi_lightning.regularizers import (
    AttributionalAdversarial,
    Consistency,
    GradientConsistency,
    IGNorm,
    IGSumNorm,
    InputGradientNorm,
    InterpretationRegularization,
    PGDAdversarial,
    SmoothSurfaceRegularization,
    UPIAdversarial,
)
from upi_lightning.regularizers.base import Regularizer, regularizer_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODES = (
    "standard",
    "input_grad",
    "ir",
    "upi_adv",
    "pgd",
    "consistency",
    "ig_norm",
    "ig_sum_norm",
    "gradient_consistency",
    "attributional_adv",
    "ssr",
)
"""Mode names: ``standard`` is ``configs/mnist.yaml``, the others ``configs/mnist_<mode>.yaml``."""
TARGET = 1.3
CLASSES = 10
"""MNIST's classes: the random labels' range, and the class gradients of an SSR step."""
DOUBLE_BACKPROP = 3.0
"""Forward+backward units of a term built from an input gradient with its graph, then differentiated."""
BACKWARD = 2 / 3
"""Units of a backward pass alone (an input gradient without a graph)."""


def pgd_count(steps: int) -> tuple[float, str]:
    """Units of ``steps`` PGD steps plus the clean and adversarial training passes."""
    return steps + 2.0, f"PGD {steps} + clean 1 + adv 1"


def arithmetic_count(regularizer: Regularizer | None, batch_size: int) -> tuple[float, str]:
    """Forward+backward units of a training step with ``regularizer`` (``None``: standard), and the formula."""
    match regularizer:
        case None:
            return 1.0, "forward + backward"
        case InputGradientNorm():
            return DOUBLE_BACKPROP, "double backprop 3"
        case InterpretationRegularization():
            return DOUBLE_BACKPROP, "double backprop 3 (teacher targets cached)"
        case UPIAdversarial():
            update = (1 + DOUBLE_BACKPROP) * regularizer.ascent_steps / regularizer.every_n_steps
            copies = 1 + regularizer.random_draws
            ce = 1 if regularizer.adversarial_ce > 0 else 0
            share = min(regularizer.term_batch_size or batch_size, batch_size) / batch_size
            return 1 + share * (1 + copies * DOUBLE_BACKPROP + ce + update), (
                f"clean 1 + {share:g} x (clean maps 1 + double backprop 3 x {copies} + CE(x + delta) {ce} + (1 + 3) x "
                f"{regularizer.ascent_steps} ascent / {regularizer.every_n_steps} steps)"
            )
        case AttributionalAdversarial():
            points = regularizer.n_steps if regularizer.method == "integrated_gradients" else 1
            count, how = pgd_count(regularizer.steps)
            return count + 2 * points * DOUBLE_BACKPROP, f"{how} + maps of [x, x_adv] 2 x {points} x 3"
        case IGSumNorm():
            attack = 1 + regularizer.attack_ig_steps * DOUBLE_BACKPROP
            return 2 + regularizer.steps * attack + regularizer.ig_steps * DOUBLE_BACKPROP, (
                f"clean 1 + PGD {regularizer.steps} x (1 + {regularizer.attack_ig_steps} x 3) + adv 1 + "
                f"IG {regularizer.ig_steps} x 3"
            )
        case IGNorm():
            attack = regularizer.attack_ig_steps * DOUBLE_BACKPROP
            return 1 + regularizer.steps * attack + regularizer.ig_steps * DOUBLE_BACKPROP, (
                f"clean 1 + PGD {regularizer.steps} x {regularizer.attack_ig_steps} x 3 + IG {regularizer.ig_steps} x 3"
            )
        case PGDAdversarial() | Consistency():
            return pgd_count(regularizer.steps)
        case GradientConsistency():
            clean = DOUBLE_BACKPROP if not regularizer.detach_clean else BACKWARD
            return 1 + clean + DOUBLE_BACKPROP, f"clean 1 + clean map {clean:.2f} + noisy double backprop 3"
        case SmoothSurfaceRegularization():
            return 1 + CLASSES * (DOUBLE_BACKPROP - 1), f"clean 1 + {CLASSES} class gradients x double backprop 2"
    raise ValueError(f"no arithmetic count for {type(regularizer).__name__}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per fit")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each fit")
    parser.add_argument("--repeats", type=int, default=2, help="fits per mode (minimum kept)")
    parser.add_argument("--batch-size", type=int, default=128)
    add_run_arguments(parser)
    return parser.parse_args()


class StepTimer(Callback):
    """Records the wall time of every training step after the first ``warmup`` ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.seconds: list[float] = []
        self.start = 0.0

    @staticmethod
    def _now(module: LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.start = self._now(pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx >= self.warmup:
            self.seconds.append(self._now(pl_module) - self.start)


def model_section(mode: str, teacher_ckpt: Path) -> dict[str, Any]:
    """The ``model`` section of the mode's MNIST config, the IR teacher pointed at ``teacher_ckpt``."""
    name = "mnist.yaml" if mode == "standard" else f"mnist_{mode}.yaml"
    model = dict(yaml.safe_load((CONFIGS / name).read_text())["model"])
    for entry in model.get("regularizers") or ():
        if "teacher_ckpt" in entry.get("init_args", {}):
            entry["init_args"]["teacher_ckpt"] = str(teacher_ckpt)
    return model


def save_teacher(path: Path) -> None:
    """Save an untrained MNIST ``Classifier`` checkpoint (the IR teacher; timing does not depend on weights)."""
    module = Classifier(**model_section("standard", path))
    torch.save(
        {LightningModule.CHECKPOINT_HYPER_PARAMS_KEY: dict(module.hparams), "state_dict": module.state_dict()}, path
    )


def fit_seconds(model: dict[str, Any], loader: DataLoader, args: argparse.Namespace) -> float:
    """Mean seconds per timed step of one fit of the ``Classifier(**model)`` on ``loader``."""
    torch.manual_seed(0)
    module = Classifier(**model)
    timer = StepTimer(args.warmup)
    trainer = Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        max_epochs=1,
        max_steps=args.warmup + args.steps,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return statistics.mean(timer.seconds)


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 1, 28, 28)
    y = torch.randint(0, CLASSES, (args.batch_size,))
    n = args.warmup + args.steps
    loader = DataLoader(TensorDataset(x.repeat(n, 1, 1, 1), y.repeat(n)), batch_size=args.batch_size)
    print(
        f"training modes vs standard: MNIST small CNN, batch={args.batch_size}, {args.steps} steps after "
        f"{args.warmup} warm-up, min of {args.repeats} fits, {machine_line(device)}; random images\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher.ckpt"
        save_teacher(teacher)
        models = {mode: model_section(mode, teacher) for mode in ["standard", *args.modes]}
        fits: dict[str, Callable[[], float]] = {
            mode: partial(fit_seconds, model, loader, args) for mode, model in models.items()
        }
        times = interleaved_seconds(fits, args.repeats, warmup=0)
    standard = min(times["standard"])
    rows = []
    print("| mode | s/step | multiple of standard | count (fwd+bwd units) | how | multiple / count | target |")
    print("|---|---:|---:|---:|---|---:|---|")
    for mode, model in models.items():
        entries = model.get("regularizers") or [None]
        count, how = arithmetic_count(entries[0] and regularizer_from_config(entries[0]), args.batch_size)
        seconds = min(times[mode])
        multiple = seconds / standard
        ratio = multiple / count
        verdict = f"<= {TARGET}: {'met' if ratio <= TARGET else 'not met'}"
        rows.append({"mode": mode, "seconds": seconds, "multiple": multiple, "count": count, "ratio": ratio})
        print(f"| {mode} | {seconds:.3f} | {multiple:.2f}x | {count:g} | {how} | {ratio:.2f} | {verdict} |", flush=True)
    write_json(args.json, {"benchmark": "training_modes", "machine": machine_line(device), "rows": rows})


if __name__ == "__main__":
    main()

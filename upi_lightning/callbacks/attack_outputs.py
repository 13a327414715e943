"""What the ``UPIAttack`` callback draws and saves after an attack (global rank 0, no collective in here).

The maps figure of held-out images under each perturbation, every perturbation as an image in
TensorBoard beside the attack's scalars, and each perturbation as a file with its provenance.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor

from upi_lightning.attacks.evaluate import maps_under_perturbations
from upi_lightning.attacks.runner import figure_batch
from upi_lightning.attacks.settings import Budget
from upi_lightning.callbacks.steps import epoch_metrics_step
from upi_lightning.perturbation import UniversalPerturbation
from upi_lightning.plots import budget_label, budget_title, figure_image, perturbation_figure, saliency_figure
from upi_lightning.saliency import SaliencySettings

Batch = tuple[Tensor, Tensor]


def attack_figure(
    pl_module: LightningModule,
    batches: list[Batch],
    deltas: Mapping[str, Tensor],
    budget: Budget,
    saliency: SaliencySettings,
    count: int,
    moment: str = "",
) -> Figure | None:
    """The maps of the first ``count`` correctly classified held-out images under each of ``deltas``.

    ``None`` if no image is classified correctly. The title names the model, the saliency method, the
    budget and ``moment`` (e.g. the epoch).
    """
    images, labels = figure_batch(pl_module, batches, count)
    if len(images) == 0:
        return None
    clean, perturbed = maps_under_perturbations(pl_module, images, labels, deltas, saliency)
    model = str(pl_module.hparams.get("arch", type(pl_module).__name__))
    title = budget_title(model, saliency.method, budget.norm, budget.eps)
    rows = [(name, perturbed[name], delta) for name, delta in deltas.items()]
    return saliency_figure(images.cpu(), clean, rows, f"{title} · {moment}" if moment else title)


def log_attack_images(
    trainer: Trainer, tag: str, deltas: Mapping[str, Tensor], budget: Budget, figure: Figure | None
) -> None:
    """Add each perturbation (``<tag>/<method>/delta``) and the figure (``<tag>/figure``) to TensorBoard.

    At the step of the epoch's metrics (:func:`~upi_lightning.callbacks.steps.epoch_metrics_step`), so the
    images sit beside the attack's scalars.
    """
    label = budget_label(budget.norm, budget.eps)
    images = {
        f"{tag}/{method}/delta": perturbation_figure(delta, f"{method} · {label}") for method, delta in deltas.items()
    }
    if figure is not None:
        images[f"{tag}/figure"] = figure
    shown = epoch_metrics_step(trainer)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, image in images.items():
                logger.experiment.add_image(name, figure_image(image), shown)


def save_attack_perturbations(
    folder: Path,
    trainer: Trainer,
    stage: str,
    deltas: Mapping[str, Tensor],
    budget: Budget,
    metrics: Mapping[str, Mapping[str, float]],
    provenance: Mapping[str, Any],
) -> None:
    """Save each of ``deltas`` as ``<method>_<budget>_<stage>-epoch<e>-step<s>.pt`` in ``folder``.

    Its metadata: the method, stage, epoch, optimizer step, world size, its ``metrics`` and ``provenance``.
    """
    step = trainer.global_step  # optimizer steps taken, as in Lightning's checkpoint names
    suffix = f"{stage}-epoch{trainer.current_epoch}-step{step}"
    for method, delta in deltas.items():
        when = {"method": method, "stage": stage, "epoch": trainer.current_epoch, "global_step": step}
        metadata = {**when, "world_size": trainer.world_size, **provenance, "metrics": dict(metrics[method])}
        UniversalPerturbation(delta, budget.norm, budget.eps, metadata).save(
            folder / f"{method}_{budget.tag}_{suffix}.pt"
        )

"""``SaliencyMonitor``: a TensorBoard figure of fixed validation images and their saliency maps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor
from typing_extensions import override

from upi_lightning.attacks.settings import as_settings
from upi_lightning.callbacks.steps import epoch_metrics_step
from upi_lightning.errors import UPIError
from upi_lightning.plots import budget_title, figure_image, saliency_figure
from upi_lightning.saliency import SaliencySettings


class SaliencyMonitor(Callback):
    """Log a figure of fixed validation images (top row) and their saliency maps (bottom row) to TensorBoard.

    The first ``num_images`` images of the validation loader (of the first dataloader, on each
    process: under DDP, the start of rank 0's shard) are captured the first time validation runs outside
    the sanity check (fewer when that validation has fewer), and kept (on the module's device, and in
    checkpoints) so every figure shows the same images. Every
    ``every_n_epochs``-th validation epoch, global rank 0 computes their maps with
    :meth:`upi_lightning.saliency.SaliencySettings.maps` (model in eval mode, its mode restored) and adds the
    figure (:func:`~upi_lightning.plots.saliency_figure`: the maps on one colour scale, from 0 to their
    largest value, with a colour bar) to every :class:`~lightning.pytorch.loggers.TensorBoardLogger` under
    ``tag``. Works with any module whose forward returns logits.

    Args:
        num_images: how many validation images to show.
        every_n_epochs: log after validation epochs ``n - 1, 2n - 1, ...`` (0-based).
        saliency: the maps shown (:class:`~upi_lightning.saliency.SaliencySettings`; default: gradient of
            the logit).
        use_labels: explain the true label when batches are ``(x, y, ...)``; else the predicted class.
        tag: TensorBoard image tag.
    """

    def __init__(
        self,
        num_images: int = 8,
        every_n_epochs: int = 1,
        saliency: SaliencySettings | Mapping[str, Any] | None = None,
        use_labels: bool = True,
        tag: str = "saliency",
    ) -> None:
        super().__init__()
        if num_images < 1 or every_n_epochs < 1:
            raise UPIError(
                f"SaliencyMonitor needs num_images >= 1 and every_n_epochs >= 1, got {num_images} and {every_n_epochs}."
            )
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.saliency = as_settings(SaliencySettings, saliency)
        self.use_labels = use_labels
        self.tag = tag
        self.images: Tensor | None = None
        self.labels: Tensor | None = None
        self.capture_done = False  # set when a validation epoch captured images: later epochs add none

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Capture the first ``num_images`` validation images (and labels) once."""
        if trainer.sanity_checking or dataloader_idx != 0 or self._captured():
            return
        x, y = _split_batch(batch)
        with torch.inference_mode(False):  # stored images must outlive inference mode
            x = x.detach().clone()
            y = y.detach().clone() if y is not None and self.use_labels else None
        if self.images is not None:
            x = torch.cat([self.images, x])
            y = torch.cat([self.labels, y]) if self.labels is not None and y is not None else None
        self.images, self.labels = x[: self.num_images], None if y is None else y[: self.num_images]

    def _captured(self) -> bool:
        """Whether the images are final: ``num_images`` held, or a validation epoch already captured some."""
        return self.capture_done or (self.images is not None and len(self.images) >= self.num_images)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the image / saliency figure every ``every_n_epochs`` epochs (skipped in the sanity check)."""
        if not trainer.sanity_checking and self.images is not None:
            self.capture_done = True  # a shard smaller than num_images must not be captured again
        if (
            trainer.sanity_checking
            or self.images is None
            or not trainer.is_global_zero
            or (trainer.current_epoch + 1) % self.every_n_epochs
        ):
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers:
            return
        image = figure_image(self.make_figure(pl_module, f"epoch {trainer.current_epoch}"))
        for logger in loggers:
            logger.experiment.add_image(self.tag, image, global_step=epoch_metrics_step(trainer))

    def make_figure(self, pl_module: LightningModule, moment: str = "") -> Figure:
        """The figure: the images on the first row, their saliency maps on the second; ``moment`` ends the title."""
        if self.images is None:
            raise UPIError("SaliencyMonitor has no images yet: run a validation epoch first.")
        images = self.images.to(pl_module.device)
        self.images = images
        labels = None if self.labels is None else self.labels.to(pl_module.device)
        maps = self.saliency.maps(pl_module, images, labels)
        title = budget_title(str(pl_module.hparams.get("arch", type(pl_module).__name__)), self.saliency.method)
        title = f"{title} · {moment}" if moment else title
        return saliency_figure(images.detach().cpu(), maps.detach().cpu(), [], title, samples_in_columns=True)

    @property
    @override
    def state_key(self) -> str:
        """Checkpoint key; distinct for monitors with different tags or methods."""
        return self._generate_state_key(tag=self.tag, method=self.saliency.method)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The fixed images and labels (tensors only), so a resumed run shows the same images."""
        return {"images": self.images, "labels": self.labels}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the fixed images and labels."""
        self.images, self.labels = state_dict["images"], state_dict["labels"]
        self.capture_done = self.images is not None


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` of a batch that is a tensor ``x`` or a sequence ``(x, y, ...)``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        label = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], label
    raise UPIError(
        f"SaliencyMonitor expects validation batches to be an image tensor or (images, labels, ...), got "
        f"{type(batch).__name__}."
    )

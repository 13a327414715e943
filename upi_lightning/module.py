"""The :class:`Classifier` LightningModule: any classifier of ``[0, 1]`` images, trained with cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from upi_lightning.errors import UPIError
from upi_lightning.models import Activation, build_classifier

OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["none", "cosine", "step", "onecycle"]


class Classifier(LightningModule):
    """Wraps :func:`~upi_lightning.models.build_classifier`; logs loss and accuracy on every stage.

    All constructor arguments are primitives and are saved as hyperparameters, so
    ``Classifier.load_from_checkpoint(path)`` rebuilds the model with no other input.

    Args:
        arch: ``small_cnn``, ``cifar_resnet18`` or ``torchvision.<name>``.
        num_classes: number of classes (LightningCLI links it from the data).
        input_shape: ``(C, H, W)`` (linked from the data).
        mean: per-channel mean of the data (linked from the data).
        std: per-channel std of the data (linked from the data).
        activation: ``relu`` or ``softplus``.
        softplus_beta: sharpness of the softplus activation.
        pretrained: start from torchvision's default weights.
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        lr_schedule: ``none``, ``cosine`` (over ``max_epochs``), ``step`` (x0.1 at 50% and 75%) or
            ``onecycle`` (over all training steps).
    """

    def __init__(
        self,
        arch: str = "small_cnn",
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 28, 28),
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.25,),
        activation: Activation = "relu",
        softplus_beta: float = 10.0,
        pretrained: bool = False,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: ScheduleName = "cosine",
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise UPIError(f"lr must be > 0, got {lr}.")
        self.save_hyperparameters()
        self.net: nn.Sequential = build_classifier(
            arch, num_classes, list(input_shape), list(mean), list(std), activation, softplus_beta, pretrained
        )
        self.accuracy = nn.ModuleDict(
            {stage: MulticlassAccuracy(num_classes, average="micro") for stage in ("train_", "val_", "test_")}
        )

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of pixel-space images ``(N, C, H, W)``."""
        return self.net(x)

    def shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        """Cross-entropy and accuracy of one batch, logged under ``{stage}/loss`` and ``{stage}/acc``."""
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy = self.accuracy[f"{stage}_"]
        accuracy(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.shared_step(batch, "train")

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.shared_step(batch, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.shared_step(batch, "test")

    @override
    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(dim=1)

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig | torch.optim.Optimizer:
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.momentum > 0
            )
        elif hp.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            raise UPIError(f"Unknown optimizer {hp.optimizer!r}: use sgd, adam or adamw.")
        if hp.lr_schedule == "none":
            return optimizer
        interval = "epoch"
        epochs = max(self.trainer.max_epochs or 1, 1)
        if hp.lr_schedule == "cosine":
            scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=epochs
            )
        elif hp.lr_schedule == "step":
            milestones = [max(1, epochs // 2), max(1, 3 * epochs // 4)]
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        elif hp.lr_schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=hp.lr, total_steps=int(self.trainer.estimated_stepping_batches)
            )
            interval = "step"
        else:
            raise UPIError(f"Unknown lr_schedule {hp.lr_schedule!r}: use none, cosine, step or onecycle.")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

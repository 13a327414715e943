"""The :class:`Classifier` LightningModule: any classifier of ``[0, 1]`` images, trained with cross-entropy.

Training modes (double backprop, interpretation regularization, UPI-adversarial, consistency and PGD
adversarial training) are terms added to the cross-entropy by the objects of
:mod:`upi_lightning.regularizers`, chosen with ``Classifier(regularizers=[...])`` or in the YAML config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from upi_lightning.distributed import destroy_process_group_at_exit
from upi_lightning.errors import CheckpointMismatchError, UPIError
from upi_lightning.models import Activation, build_classifier
from upi_lightning.regularizers import CHECKPOINT_KEY, Regularizer, TrainingBatch, build_regularizers, log_keys

OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["none", "cosine", "step", "onecycle"]


class Classifier(LightningModule):
    """Wraps :func:`~upi_lightning.models.build_classifier`; logs loss and accuracy on every stage.

    All constructor arguments are saved as primitive hyperparameters (the regularizers as their
    ``{"class_path", "init_args"}`` configs), so ``Classifier.load_from_checkpoint(path)`` rebuilds the
    model, training mode included, with no other input. The regularizers' state (e.g. the UPI
    ``delta``) travels in the checkpoint entry :data:`~upi_lightning.regularizers.CHECKPOINT_KEY`, never
    in ``state_dict``, so a plain ``Classifier`` loads the weights of a regularized one strictly.

    Training loss: mean cross-entropy plus the term of every regularizer, logged as ``train/loss``;
    with regularizers the cross-entropy and each term are also logged (``train/ce``, ``train/<name>``).

    Args:
        arch: ``small_cnn``, ``cifar_resnet18``, ``mlp``, ``torchvision.<name>`` or ``timm.<name>``
            (:func:`~upi_lightning.models.build_net`).
        num_classes: number of classes (LightningCLI links it from the data).
        input_shape: ``(C, H, W)`` (linked from the data).
        mean: per-channel mean of the data (linked from the data).
        std: per-channel std of the data (linked from the data).
        activation: ``relu`` or ``softplus``.
        softplus_beta: sharpness of the softplus activation.
        pretrained: start from torchvision's or timm's pretrained weights.
        arch_kwargs: more keyword arguments of a torchvision or timm model (e.g. ``{patch_size: 4}``).
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD (plain momentum by default, as the IR authors used).
        weight_decay: L2 weight decay.
        lr_schedule: ``none``, ``cosine`` (over ``max_epochs``), ``step`` (x0.1 at 50% and 75%) or
            ``onecycle`` (over all training steps).
        regularizers: training-mode terms (:class:`~upi_lightning.regularizers.Regularizer` objects, or
            their configs as returned by ``Regularizer.config()``), summed with the cross-entropy.
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
        arch_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        lr_schedule: ScheduleName = "cosine",
        regularizers: Sequence[Regularizer | Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise UPIError(f"lr must be > 0, got {lr}.")
        if nesterov and momentum <= 0:
            raise UPIError(f"nesterov needs momentum > 0, got momentum={momentum}; set momentum or nesterov: false.")
        self.save_hyperparameters(ignore=["regularizers"])
        self.regularizers = build_regularizers(regularizers)
        self.hparams["regularizers"] = [regularizer.config() for regularizer in self.regularizers]
        self.regularizer_keys = log_keys(self.regularizers)
        self.needs_input_grad = any(regularizer.needs_input_grad for regularizer in self.regularizers)
        shape, statistics = list(input_shape), (list(mean), list(std))
        self.net: nn.Sequential = build_classifier(
            arch, num_classes, shape, *statistics, activation, softplus_beta, pretrained, arch_kwargs
        )
        self.accuracy = nn.ModuleDict(
            {stage: MulticlassAccuracy(num_classes, average="micro") for stage in ("train_", "val_", "test_")}
        )

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of pixel-space images ``(N, C, H, W)``."""
        return self.net(x)

    def log_step(self, stage: str, logits: Tensor, y: Tensor, loss: Tensor) -> None:
        """Log ``{stage}/loss`` and update and log the accuracy ``{stage}/acc`` of one batch."""
        accuracy = cast(MulticlassAccuracy, self.accuracy[f"{stage}_"])
        accuracy(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)

    def shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        """Cross-entropy and accuracy of one batch, logged under ``{stage}/loss`` and ``{stage}/acc``."""
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log_step(stage, logits, y, loss)
        return loss

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy plus every regularizer's term; input gradients use ``autograd.grad`` (no ``.backward``)."""
        if not self.regularizers:
            return self.shared_step(batch, "train")
        x, y = batch
        if self.needs_input_grad:
            x = x.detach().requires_grad_(True)
        logits = self(x)
        ce = F.cross_entropy(logits, y, reduction="none")
        loss = ce.mean()
        self.log("train/ce", loss, on_step=True, on_epoch=True, sync_dist=True)
        context = TrainingBatch(self.net, x, y, logits, ce, partial(self.trainer.strategy.reduce, reduce_op="sum"))
        for key, regularizer in zip(self.regularizer_keys, self.regularizers, strict=True):
            term = regularizer(context)
            self.log(key, term, on_step=True, on_epoch=True, sync_dist=True)
            for name, value in regularizer.diagnostics().items():
                self.log(f"{key}/{name}", value, on_step=True, on_epoch=False)
            loss = loss + term
        self.log_step("train", logits, y, loss)
        return loss

    @override
    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()  # DDP on the CPU: a clean exit for gloo

    @override
    def on_fit_start(self) -> None:
        for regularizer in self.regularizers:
            regularizer.on_fit_start(self)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        for regularizer in self.regularizers:
            regularizer.on_train_batch_start(self)

    @override
    def on_train_epoch_end(self) -> None:
        for regularizer in self.regularizers:
            regularizer.on_train_epoch_end(self)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.regularizers:
            checkpoint[CHECKPOINT_KEY] = [
                {"class_path": regularizer.config()["class_path"], "state": regularizer.state_dict()}
                for regularizer in self.regularizers
            ]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the regularizers' state; a checkpoint without any leaves them fresh.

        Raises:
            CheckpointMismatchError: if the checkpoint holds the state of other regularizers.
        """
        saved = checkpoint.get(CHECKPOINT_KEY) or []
        if not self.regularizers or not saved:
            return
        expected = [regularizer.config()["class_path"] for regularizer in self.regularizers]
        found = [entry["class_path"] for entry in saved]
        if found != expected:
            raise CheckpointMismatchError(
                f"The checkpoint holds the state of the regularizers {found} but this model trains with "
                f"{expected}; resume with the configuration the checkpoint was trained with."
            )
        for regularizer, entry in zip(self.regularizers, saved, strict=True):
            regularizer.load_state_dict(entry["state"])

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
        hp = cast(AttributeDict, self.hparams)
        params = self.parameters()
        optimizer: torch.optim.Optimizer
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
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

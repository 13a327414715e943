"""``RobustAccuracy``: PGD robust accuracy of the validation and/or test data, logged by Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from upi_lightning.attacks.engine import check_steps
from upi_lightning.attacks.pgd import count_robust
from upi_lightning.errors import UPIError
from upi_lightning.noise import make_generator
from upi_lightning.threat import Norm, threat_model

Stage = Literal["val", "test"]


class RobustAccuracy(Callback):
    """Log the PGD robust accuracy of the validation and/or test data as ``{stage}/robust_acc_{norm}_{eps}``.

    Every batch of the chosen stages (the first ``max_batches`` per process, when set) is attacked with
    :func:`pgd_attack` on the LightningModule (its forward must return logits); correct and total counts
    are summed over processes with ``trainer.strategy.reduce`` at the end of the epoch (exact under DDP,
    not a mean of means). Skipped during the sanity check. Works under ``torch.inference_mode``
    (``trainer.test``) and ``torch.no_grad`` (validation during fit).

    Args:
        norm: ``"l2"`` or ``"linf"``.
        eps: radius of each ball, pixel units.
        steps: PGD steps.
        step_size: PGD step (``None``: :func:`default_pgd_step_size`).
        random_start: random start in the ball.
        stages: ``val`` and/or ``test``.
        max_batches: attack at most this many batches per epoch and process (``None``: all).
        seed: seeds the random starts (the same at every epoch).

    """

    def __init__(
        self,
        norm: Norm = "linf",
        eps: float = 0.1,
        steps: int = 40,
        step_size: float | None = None,
        random_start: bool = True,
        stages: Sequence[Stage] = ("test",),
        max_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_steps("constant", step_size, "steps", steps)
        unknown = set(stages) - {"val", "test"}
        if unknown or not stages:
            raise UPIError(f"RobustAccuracy stages must be a non-empty subset of ['val', 'test'], got {list(stages)}.")
        if max_batches is not None and max_batches < 1:
            raise UPIError(f"max_batches must be None or >= 1, got {max_batches}.")
        self.threat = threat_model(norm, eps)
        self.attack: dict[str, Any] = {
            "steps": steps,
            "step_size": step_size,
            "random_start": random_start,
        }
        self.stages = tuple(stages)
        self.max_batches = max_batches
        self.seed = seed
        self.key = f"robust_acc_{norm}_{eps:g}"
        self.totals: Tensor | None = None
        self.generator: torch.Generator | None = None

    def start(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        """Reset the counts and the random starts at the beginning of an epoch of ``stage``."""
        if stage in self.stages and not trainer.sanity_checking:
            self.totals = torch.zeros(2, device=pl_module.device)
            self.generator = make_generator(self.seed, pl_module.device)

    def update(self, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Attack one batch (when counting and below ``max_batches``) and add its counts."""
        if self.totals is None or (self.max_batches is not None and batch_idx >= self.max_batches):
            return
        x, y = batch[0], batch[1]
        self.totals[0] += count_robust(pl_module, x, y, self.threat, generator=self.generator, **self.attack)
        self.totals[1] += len(x)

    def finish(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        """Reduce the counts over processes and log the robust accuracy of the epoch."""
        if self.totals is None:
            return
        correct, count = trainer.strategy.reduce(self.totals, reduce_op="sum").tolist()
        self.totals = None
        if count > 0:
            pl_module.log(f"{stage}/{self.key}", correct / count, sync_dist=True)  # identical on every rank

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start(trainer, pl_module, "val")

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
        self.update(pl_module, batch, batch_idx)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.finish(trainer, pl_module, "val")

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start(trainer, pl_module, "test")

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.update(pl_module, batch, batch_idx)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.finish(trainer, pl_module, "test")

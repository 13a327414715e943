"""Where Lightning puts the epoch's metrics in TensorBoard, so the callbacks' images go beside them."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn


def epoch_metrics_step(trainer: Trainer) -> int:
    """The TensorBoard step Lightning gives the epoch-level metrics logged now (images go beside them).

    While fitting, Lightning logs what ``on_train_epoch_end`` and the epoch-end validation log at the
    epoch's last optimizer step, ``global_step - 1``; in ``validate`` and ``test``, at ``global_step``.
    """
    fitting = trainer.state.fn == TrainerFn.FITTING
    return max(trainer.global_step - 1, 0) if fitting else trainer.global_step

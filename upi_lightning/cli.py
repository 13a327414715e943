"""LightningCLI wiring shared by ``train.py`` and ``attack.py``.

``UPILightningCLI`` links the data module's statistics (classes, image shape, mean/std) into the
model, defaults to a TensorBoard logger under ``runs/`` and always adds a ``ModelCheckpoint``
(``last.ckpt`` plus the best by validation accuracy). User errors (:class:`UPIError`) are printed
as one line instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from upi_lightning.data import ImageDataModule
from upi_lightning.errors import UPIError
from upi_lightning.module import Classifier

T = TypeVar("T")

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}


class UPILightningCLI(LightningCLI):
    """LightningCLI with data-to-model links, TensorBoard and checkpointing by default."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for attribute in ("num_classes", "input_shape", "mean", "std"):
            parser.link_arguments(f"data.{attribute}", f"model.{attribute}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def after_fit(self) -> None:
        """Tell the user where the logs and checkpoints are."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        checkpoint = trainer.checkpoint_callback
        if trainer.logger is not None and trainer.logger.log_dir:
            print(f"TensorBoard logs: {trainer.logger.log_dir}  (tensorboard --logdir {trainer.logger.save_dir})")
        if isinstance(checkpoint, ModelCheckpoint):
            print(f"Last checkpoint:  {checkpoint.last_model_path}")
            print(f"Best checkpoint:  {checkpoint.best_model_path} (val/acc={checkpoint.best_model_score})")


def run_reporting_errors(main: Callable[[], T]) -> T:
    """Run ``main``; print a :class:`UPIError` as ``error: <message>`` and exit with status 2."""
    try:
        return main()
    except UPIError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def train_cli(args: list[str] | None = None, run: bool = True) -> UPILightningCLI:
    """Entry point of ``train.py``: ``fit``, ``validate``, ``test`` and ``predict`` subcommands."""
    return run_reporting_errors(
        lambda: UPILightningCLI(
            Classifier,
            ImageDataModule,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    )

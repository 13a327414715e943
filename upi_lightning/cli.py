"""The ``train.py`` command line: LightningCLI with the project's defaults.

``UPILightningCLI`` links the data module's statistics (classes, image shape, mean/std) into the
model, defaults to a TensorBoard logger under ``runs/`` (without Lightning's placeholder ``hp_metric``)
and always adds two ``ModelCheckpoint`` callbacks: ``checkpoint`` keeps the best by validation
accuracy, ``last_checkpoint`` keeps the latest state as ``last.ckpt`` (every epoch, or every
``--last_checkpoint.every_n_train_steps`` steps, from the first step on: it monitors nothing, so it
never waits for a validation; and when training ends, :class:`LatestCheckpoint`). User errors
(:class:`UPIError`) are printed as one line instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from upi_lightning.checkpoints import CHECKPOINT_ERRORS, checkpoint_file, unreadable_checkpoint
from upi_lightning.data import ImageDataModule
from upi_lightning.errors import run_reporting_errors
from upi_lightning.module import Classifier

LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")
"""``--ckpt_path`` values the Trainer resolves itself (not files)."""

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
    },
}


class LatestCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` of the latest state (no ``monitor``) that also saves when training ends.

    With ``every_n_train_steps=N`` Lightning saves at steps ``N, 2N, ...`` only, so the file of a finished
    run could miss up to ``N - 1`` final steps; this one saves the final state too (once: not when the last
    step was just saved).
    """

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.monitor is None and not self._should_skip_saving_checkpoint(trainer):  # e.g. just saved at this step
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


class UPILightningCLI(LightningCLI):
    """LightningCLI with data-to-model links, TensorBoard and checkpointing by default."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for attribute in ("num_classes", "input_shape", "mean", "std"):
            parser.link_arguments(f"data.{attribute}", f"model.{attribute}", apply_on="instantiate")
        # Lightning defers a monitoring checkpoint's step-triggered saves until its metric exists (the first
        # validation), so the latest state, which a killed run resumes from, has a callback of its own
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LatestCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch:02d}",
                "checkpoint.auto_insert_metric_name": False,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
            }
        )

    @override
    def _parse_ckpt_path(self) -> None:
        """Lightning's reading of the ``--ckpt_path`` hyperparameters, a missing or unreadable file in one line.

        Lightning loads the checkpoint here (safely, ``weights_only``), right after parsing.
        """
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt is not None and ckpt not in LIGHTNING_CKPT_NAMES:
            checkpoint_file(ckpt, "--ckpt_path")
        try:
            super()._parse_ckpt_path()
        except CHECKPOINT_ERRORS as err:
            raise unreadable_checkpoint(Path(str(ckpt)), err) from None

    def after_fit(self) -> None:
        """Tell the user where the logs and checkpoints are."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        if trainer.logger is not None and trainer.logger.log_dir:
            print(f"TensorBoard logs: {trainer.logger.log_dir}  (tensorboard --logdir {trainer.logger.save_dir})")
        best = self.instantiated("checkpoint")
        print(f"Last checkpoint:  {self.last_checkpoint_path}")
        print(f"Best checkpoint:  {best.best_model_path} ({best.monitor}={best.best_model_score})")

    def instantiated(self, key: str) -> Any:
        """The object the parser built for ``key`` (with or without a subcommand)."""
        return (self.config_init[self.subcommand] if self.subcommand else self.config_init)[key]

    @property
    def last_checkpoint_path(self) -> str:
        """Path of the latest ``last.ckpt`` the run wrote (``""`` before the first save)."""
        return self.instantiated("last_checkpoint").best_model_path


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


def main(args: list[str] | None = None) -> None:
    """The ``upi-train`` command (and ``train.py``): :func:`train_cli`."""
    train_cli(args)

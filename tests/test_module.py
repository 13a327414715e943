from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest

from upi_lightning.data import SyntheticDataModule
from upi_lightning.errors import UPIError
from upi_lightning.module import Classifier


def test_training_lowers_the_loss_and_logs_accuracy(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = SyntheticDataModule(num_train=512, num_test=128, batch_size=64)
    model = Classifier(num_classes=dm.num_classes, input_shape=dm.input_shape, mean=dm.mean, std=dm.std, lr=3e-3)
    trainer = pl.Trainer(
        max_epochs=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert metrics["train/loss_epoch"] < 1.0 and metrics["val/acc"] > 0.5
    (result,) = trainer.test(model, dm, verbose=False)
    assert 0.5 < result["test/acc"] <= 1.0


@pytest.mark.parametrize("schedule", ["none", "cosine", "step", "onecycle"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizers_and_schedules(tmp_path: Path, optimizer: str, schedule: str) -> None:
    model = Classifier(optimizer=optimizer, lr_schedule=schedule, lr=0.01, mean=[0.5], std=[0.25])
    trainer = pl.Trainer(
        fast_dev_run=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, SyntheticDataModule(num_train=128, num_test=32, batch_size=16))


def test_bad_learning_rate_is_refused() -> None:
    with pytest.raises(UPIError, match="lr must be > 0"):
        Classifier(lr=0.0)


def test_ddp_spawn_fit_on_two_cpu_processes(tmp_path: Path) -> None:
    dm = SyntheticDataModule(num_train=256, num_test=64, batch_size=32)
    model = Classifier(num_classes=dm.num_classes, input_shape=dm.input_shape, mean=dm.mean, std=dm.std)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    # ddp_spawn returns only weights and callback_metrics to this process; files are written by rank 0
    assert trainer.state.finished and "val/acc" in trainer.callback_metrics
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["epoch=0-step=3.ckpt"]

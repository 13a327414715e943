"""Callbacks on tiny synthetic runs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from upi_lightning.callbacks import SaliencyMonitor
from upi_lightning.errors import UPIError

# ----------------------------------------------------------- SaliencyMonitor

SIDE, CLASSES, CELL = 8, 3, 8 + 2  # make_grid pads every image by 2 pixels


class LinearClassifier(LightningModule):
    """Logits ``W vec(x) + b`` (dropout in between): the gradient map of class ``c`` is ``|W_c|``."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(channels * SIDE * SIDE, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _data(channels: int = 1, n: int = 10) -> tuple[DataLoader, DataLoader, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.rand(n, channels, SIDE, SIDE, generator=gen), torch.arange(n) % CLASSES)
    return DataLoader(dataset, batch_size=3), DataLoader(dataset, batch_size=3), dataset


def _trainer(tmp_path: Path, monitor: SaliencyMonitor, epochs: int) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_train_batches=2,
        log_every_n_steps=1,
        num_sanity_val_steps=2,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _logged_images(log_dir: Path, tag: str = "saliency") -> list[tuple[int, np.ndarray]]:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    if tag not in events.Tags()["images"]:
        return []
    return [
        (event.step, np.asarray(Image.open(io.BytesIO(event.encoded_image_string))).astype(np.float64) / 255)
        for event in events.Images(tag)
    ]


def _cell(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    top, left = 2 + row * CELL, 2 + col * CELL
    return grid[top : top + SIDE, left : left + SIDE]


def test_saliency_monitor_logs_fixed_images_and_their_maps(tmp_path: Path) -> None:
    model = LinearClassifier()
    train, val, dataset = _data()
    monitor = SaliencyMonitor(num_images=4)  # spans two validation batches of 3
    trainer = _trainer(tmp_path, monitor, epochs=2)
    trainer.fit(model, train, val)

    logged = _logged_images(tmp_path)
    assert [step for step, _ in logged] == [2, 4]  # one grid per epoch, none for the sanity check
    weight = model.net[2].weight.detach().view(CLASSES, SIDE, SIDE).abs()
    for _, grid in logged:
        assert grid.shape == (2 * CELL + 2, 4 * CELL + 2, 3)
        for i in range(4):
            image = dataset.tensors[0][i, 0].numpy()
            np.testing.assert_allclose(_cell(grid, 0, i)[..., 0], image, atol=1.01 / 255)
    for i in range(4):  # the last grid shows the maps of the final weights
        expected = (weight[dataset[i][1]] / weight[dataset[i][1]].max()).numpy()
        np.testing.assert_allclose(_cell(logged[-1][1], 1, i)[..., 0], expected, atol=1.01 / 255)
    assert torch.equal(monitor.images, dataset.tensors[0][:4])
    assert torch.equal(monitor.labels, dataset.tensors[1][:4])


def test_saliency_monitor_every_n_epochs_and_under_validate(tmp_path: Path) -> None:
    model = LinearClassifier(channels=3)
    train, val, _ = _data(channels=3)
    monitor = SaliencyMonitor(
        num_images=2, every_n_epochs=2, method="smoothgrad", method_kwargs={"n_samples": 3}, tag="maps"
    )
    trainer = _trainer(tmp_path, monitor, epochs=3)
    trainer.fit(model, train, val)
    assert [step for step, _ in _logged_images(tmp_path, "maps")] == [4]  # after epoch index 1 only

    validate_dir = tmp_path / "validate"
    monitor = SaliencyMonitor(num_images=2, use_labels=False)
    _trainer(validate_dir, monitor, epochs=1).validate(model, val)  # runs under torch.inference_mode
    (grid,) = [grid for _, grid in _logged_images(validate_dir)]
    assert grid.shape == (2 * CELL + 2, 2 * CELL + 2, 3)
    assert monitor.labels is None
    assert not monitor.images.is_inference()


def test_saliency_monitor_restores_modes_and_checkpoints_its_images(tmp_path: Path) -> None:
    model = LinearClassifier()
    train, val, dataset = _data()
    monitor = SaliencyMonitor(num_images=5)
    trainer = _trainer(tmp_path, monitor, epochs=1)
    trainer.fit(model, train, val)
    model.train()
    model.net[1].eval()
    monitor.make_grid(model)
    assert model.training and model.net[0].training and not model.net[1].training

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][monitor.state_key]
    restored = SaliencyMonitor(num_images=5)
    restored.load_state_dict(state)
    assert torch.equal(restored.images, dataset.tensors[0][:5])
    assert torch.equal(restored.labels, dataset.tensors[1][:5])
    assert SaliencyMonitor(tag="a").state_key != SaliencyMonitor(tag="b").state_key


@pytest.mark.parametrize(
    "kwargs",
    [{"num_images": 0}, {"every_n_epochs": 0}, {"method": "occlusion"}],
)
def test_saliency_monitor_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(UPIError):
        SaliencyMonitor(**kwargs)


def test_saliency_monitor_rejects_unknown_batches(tmp_path: Path) -> None:
    monitor = SaliencyMonitor()
    trainer = _trainer(tmp_path, monitor, epochs=1)
    with pytest.raises(UPIError, match="image tensor"):
        monitor.on_validation_batch_end(trainer, LinearClassifier(), None, {"image": torch.rand(2)}, 0)
    with pytest.raises(UPIError, match="validation epoch"):
        monitor.make_grid(LinearClassifier())

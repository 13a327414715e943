"""Shared fixtures: the offline datasets of ``../shared/data``, small synthetic data and a trained checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import REPO
from upi_lightning.data import SyntheticDataModule
from upi_lightning.module import Classifier

# Tiny tensors on a 2-core machine: one thread per process avoids OpenMP oversubscription (the DDP tests
# run two processes) and is faster than two threads waiting on each other. Child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


@pytest.fixture(autouse=True)
def fresh_distributed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the rendezvous variables an earlier DDP run left in this process.

    Lightning and Fabric keep ``MASTER_PORT`` in ``os.environ`` after a spawned run; the next run would
    reuse that port while the previous group may still be closing it.
    """
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)


def shared_data_dir() -> Path:
    """``$UPI_SHARED_DATA`` or ``../shared/data`` next to the repository."""
    return Path(os.environ.get("UPI_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_shared(relative: str) -> Path:
    """Path of a shared data file; skip when absent, fail instead when ``UPI_REQUIRE_SHARED_DATA=1`` (CI)."""
    path = shared_data_dir() / relative
    if not path.exists():
        message = f"{path} is absent (set UPI_SHARED_DATA to the folder holding MNIST/raw and cifar10-subset.npz)"
        if os.environ.get("UPI_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the shared MNIST raw files (torchvision unpacks them there, offline)."""
    raw = require_shared("MNIST/raw")
    root = tmp_path_factory.mktemp("mnist")
    shutil.copytree(raw, root / "MNIST" / "raw")
    return root


@pytest.fixture(scope="session")
def cifar_subset_npz() -> Path:
    """The shared 12,000-image CIFAR-10 subset (uint8 HWC arrays)."""
    return require_shared("cifar10-subset.npz")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN trained for a few steps on the synthetic data (well above chance).

    Module-scoped: each test module that asks for it trains its own (about a second), seeded the same.
    """
    pl.seed_everything(0)
    root = tmp_path_factory.mktemp("ckpt")
    dm = SyntheticDataModule(num_train=512, num_test=128, batch_size=32)
    model = Classifier(num_classes=dm.num_classes, input_shape=dm.input_shape, mean=dm.mean, std=dm.std, lr=3e-3)
    trainer = pl.Trainer(
        max_epochs=2, default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, dm)
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return path

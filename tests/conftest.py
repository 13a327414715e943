"""Shared fixtures: the offline datasets of ``../shared/data`` and small synthetic data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

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

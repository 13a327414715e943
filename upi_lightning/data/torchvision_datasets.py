"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision: read from ``root``, downloaded when missing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor

from upi_lightning.data.base import ImageDataModule
from upi_lightning.errors import DatasetNotFoundError, one_line


class TorchvisionDataModule(ImageDataModule):
    """A torchvision dataset class (``MNIST``-like) loaded once into memory.

    Args:
        root: folder that holds (or will receive) the dataset.
        download: download when missing (needs network).
        **kwargs: see :class:`ImageDataModule`.
    """

    dataset_name: str
    dataset_cls: type[torchvision.datasets.VisionDataset]
    files: str
    """Where torchvision reads the dataset under ``root`` (for the error when it is missing)."""

    def __init__(self, root: str | os.PathLike[str] = "data", download: bool = True, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.root = Path(root).expanduser()
        self.download = download

    def prepare_data(self) -> None:
        """Download (rank 0 only, as Lightning calls it) so that ``setup`` finds the files."""
        for train in (True, False):
            self.open_dataset(train)

    def open_dataset(self, train: bool) -> torchvision.datasets.VisionDataset:
        """Open the torchvision dataset, turning any failure into one actionable error."""
        try:
            return self.dataset_cls(str(self.root), train=train, download=self.download)
        except (RuntimeError, OSError) as err:
            how = "download=True needs network access" if self.download else "download is off"
            raise DatasetNotFoundError(  # torchvision's message lists every mirror tried: its first line only
                f"{self.dataset_name} not found under {self.root.resolve()} ({how}; {one_line(err).rstrip(':')}). "
                f"Put {self.files} in {self.root.resolve()}, or point data.root at a folder that has them."
            ) from None

    def load_arrays(self, train: bool) -> tuple[Tensor, Tensor]:
        """Images and labels as tensors (torchvision keeps them in ``.data``/``.targets``)."""
        dataset = self.open_dataset(train)
        images = torch.as_tensor(np.asarray(dataset.data))
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        return images.contiguous(), torch.as_tensor(dataset.targets)


class MNISTDataModule(TorchvisionDataModule):
    """MNIST, 60k/10k grayscale 28x28 digits (torchvision, ``download=True`` by default)."""

    dataset_name = "MNIST"
    dataset_cls = torchvision.datasets.MNIST
    files = "MNIST/raw/ (the four original .gz files)"
    num_classes = 10
    input_shape = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)


class FashionMNISTDataModule(TorchvisionDataModule):
    """FashionMNIST, 60k/10k grayscale 28x28 clothing images."""

    dataset_name = "FashionMNIST"
    dataset_cls = torchvision.datasets.FashionMNIST
    files = "FashionMNIST/raw/ (the four original .gz files)"
    num_classes = 10
    input_shape = (1, 28, 28)
    mean = (0.2860,)
    std = (0.3530,)


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10, 50k/10k colour 32x32 images (``augment`` enables crop + flip)."""

    dataset_name = "CIFAR-10"
    dataset_cls = torchvision.datasets.CIFAR10
    files = "cifar-10-batches-py/ (or cifar-10-python.tar.gz)"
    num_classes = 10
    input_shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

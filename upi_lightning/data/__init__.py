"""LightningDataModules that yield ``(image, label)`` batches with images in pixel space ``[0, 1]``.

:class:`ImageDataModule` (:mod:`~upi_lightning.data.base`) is the contract; the torchvision datasets,
the file-based modules and the synthetic one implement it. Configs name them as
``upi_lightning.data.<Class>``.
"""

from upi_lightning.data.base import ImageDataModule, UInt8ImageDataset, channel_stats, split_sizes
from upi_lightning.data.files import ImageFolderDataModule, NpzDataModule
from upi_lightning.data.synthetic import SyntheticDataModule
from upi_lightning.data.torchvision_datasets import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "NpzDataModule",
    "SyntheticDataModule",
    "TorchvisionDataModule",
    "UInt8ImageDataset",
    "channel_stats",
    "split_sizes",
]

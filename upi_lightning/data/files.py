"""Data modules over files you already have: one ``.npz`` of uint8 arrays, or an image folder tree."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor
from torchvision.transforms import v2

from upi_lightning.data.base import ImageDataModule, channel_stats
from upi_lightning.errors import DatasetNotFoundError, UPIError


class NpzDataModule(ImageDataModule):
    """Images from one ``.npz`` file: ``train_images``/``test_images`` uint8 ``(N, H, W[, C])`` + labels.

    The file is read with ``allow_pickle=False``. Statistics are computed from the training images
    unless ``mean``/``std`` are given.

    Args:
        path: the ``.npz`` file (for example ``../shared/data/cifar10-subset.npz``).
        num_classes: number of classes (default: ``max(label) + 1``).
        mean: per-channel mean override.
        std: per-channel std override.
        **kwargs: see :class:`ImageDataModule`.
    """

    KEYS = ("train_images", "train_labels", "test_images", "test_labels")

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DatasetNotFoundError(
                f"No .npz file at {self.path.resolve()}; set data.path to a file with arrays {', '.join(self.KEYS)}."
            )
        with np.load(self.path, allow_pickle=False) as archive:
            missing = [key for key in self.KEYS if key not in archive]
            if missing:
                raise UPIError(f"{self.path} lacks the arrays {missing}; it needs {', '.join(self.KEYS)}.")
            self.arrays = {key: torch.as_tensor(archive[key]) for key in self.KEYS}
        train_images = self.to_nchw(self.arrays["train_images"])
        self.input_shape = tuple(train_images.shape[1:])  # type: ignore[assignment]
        self.num_classes = num_classes or int(self.arrays["train_labels"].max()) + 1
        stats = channel_stats(train_images)
        self.mean = list(mean) if mean is not None else stats[0]
        self.std = list(std) if std is not None else stats[1]

    @staticmethod
    def to_nchw(images: Tensor) -> Tensor:
        """``(N, H, W)`` or ``(N, H, W, C)`` uint8 to ``(N, C, H, W)``."""
        if images.dtype != torch.uint8 or images.ndim not in (3, 4):
            raise UPIError(f"npz images must be uint8 (N, H, W[, C]), got {images.dtype} {tuple(images.shape)}.")
        return images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()

    def load_arrays(self, train: bool) -> tuple[Tensor, Tensor]:
        """The training or test arrays of the file."""
        prefix = "train" if train else "test"
        return self.to_nchw(self.arrays[f"{prefix}_images"]), self.arrays[f"{prefix}_labels"]


class ImageFolderDataModule(ImageDataModule):
    """Class-per-folder images (Tiny-ImageNet style): ``root/train/<class>/*.png`` and ``root/val/<class>/``.

    Images are resized to ``image_size`` and loaded into memory once (fine up to a few 100k small images).

    Args:
        root: folder with ``train`` and ``test_folder`` subfolders in torchvision ImageFolder layout.
        test_folder: name of the held-out subfolder.
        image_size: ``(H, W)`` after resizing.
        mean: per-channel mean (default ImageNet's).
        std: per-channel std (default ImageNet's).
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        test_folder: str = "val",
        image_size: Sequence[int] = (64, 64),
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.root = Path(root).expanduser()
        self.test_folder = test_folder
        for sub in ("train", test_folder):
            if not (self.root / sub).is_dir():
                raise DatasetNotFoundError(
                    f"No folder {(self.root / sub).resolve()}; ImageFolderDataModule needs "
                    f"{self.root}/train/<class>/ and {self.root}/{test_folder}/<class>/ image folders."
                )
        self.classes = sorted(entry.name for entry in (self.root / "train").iterdir() if entry.is_dir())
        self.num_classes = len(self.classes)
        self.input_shape = (len(mean), *image_size)  # type: ignore[assignment]
        self.mean, self.std = list(mean), list(std)

    def load_arrays(self, train: bool) -> tuple[Tensor, Tensor]:
        """Decode, resize and stack every image of the split as uint8."""
        folder = self.root / ("train" if train else self.test_folder)
        to_tensor = v2.Compose([v2.PILToTensor(), v2.Resize(self.input_shape[1:], antialias=True)])
        dataset = torchvision.datasets.ImageFolder(str(folder), transform=to_tensor)
        if dataset.classes != self.classes:
            raise UPIError(f"{folder} has classes {dataset.classes[:5]}... but train has {self.classes[:5]}...")
        mode = "RGB" if self.input_shape[0] == 3 else "L"
        dataset.loader = lambda path: torchvision.datasets.folder.pil_loader(path).convert(mode)
        images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
        return torch.stack(images), torch.tensor(labels)

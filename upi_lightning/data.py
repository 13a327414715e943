"""LightningDataModules that yield ``(image, label)`` batches with images in pixel space ``[0, 1]``.

Every module exposes what a model and an attack need before ``setup`` runs: ``num_classes``,
``input_shape`` ``(C, H, W)``, and the per-channel ``mean``/``std`` that the model's first layer
(:class:`~upi_lightning.models.Normalize`) uses. Splits:

* ``train`` / ``val``: the training set split with a fixed ``seed`` (``val_size`` samples or fraction);
* ``test``: the whole test set;
* ``attack_fit`` / ``attack_eval``: two disjoint halves of the test set (``attack_fit_size``), to fit a
  universal perturbation on one and evaluate it on unseen samples of the other.

Image datasets are held in memory as ``uint8`` tensors and converted to float per sample, which is
several times faster on CPU than PIL-based transforms.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from upi_lightning.errors import DatasetNotFoundError, UPIError, one_line


class UInt8ImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """In-memory images ``(N, C, H, W)`` uint8 and labels ``(N,)``, yielding float images in ``[0, 1]``.

    Args:
        images: ``uint8`` tensor ``(N, C, H, W)``.
        labels: integer tensor ``(N,)``.
        transform: optional tensor transform applied to each float image (augmentation).
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: v2.Transform | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise UPIError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}.")
        if len(images) != len(labels):
            raise UPIError(f"{len(images)} images but {len(labels)} labels.")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index].float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``uint8`` images ``(N, C, H, W)`` in ``[0, 1]`` units."""
    x = images.double().div(255.0).transpose(0, 1).flatten(1)
    return x.mean(1).tolist(), x.std(1).clamp_min(1e-6).tolist()


def split_sizes(total: int, size: float | int, name: str) -> int:
    """Resolve ``size`` (a fraction in ``(0, 1)`` or a whole count) against ``total`` samples.

    Whole numbers are counts even as floats (YAML/CLI parsers turn ``5000`` into ``5000.0``), so ``1.0`` is
    one sample, not "all": both parts of a split must be non-empty.

    Raises:
        UPIError: if ``total < 2`` (nothing to split), ``size`` is neither a fraction in ``(0, 1)`` nor a
            whole number, or either part would be empty.
    """
    if total < 2:
        raise UPIError(f"{name}: the dataset has {total} sample(s); splitting it needs at least 2.")
    fraction = 0 < size < 1
    if not fraction and float(size) != int(size):
        raise UPIError(f"{name}={size} must be a fraction in (0, 1) or a whole count between 1 and {total - 1}.")
    count = round(size * total) if fraction else int(size)
    if not 0 < count < total:
        raise UPIError(
            f"{name}={size} leaves an empty split of {total} samples; use a fraction in (0, 1) "
            f"or a count between 1 and {total - 1}."
        )
    return count


class ImageDataModule(LightningDataModule, ABC):
    """Base class: splits, loaders and dataset statistics for an in-memory image dataset.

    Subclasses implement :meth:`load_arrays` and set ``num_classes``, ``input_shape``, ``mean``
    and ``std`` in ``__init__`` (LightningCLI links them to the model before ``setup``).

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size of the val/test/attack loaders (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        val_size: validation split of the training set (fraction or count).
        attack_fit_size: part of the test set used to fit perturbations (fraction or count); the
            rest is the held-out ``attack_eval`` split.
        seed: seed of every split (the same seed gives the same splits on every run and rank).
        augment: random crop (padding 4) and horizontal flip on the training split (natural images).
    """

    num_classes: int
    input_shape: tuple[int, int, int]
    mean: Sequence[float]
    std: Sequence[float]

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: float | int = 0.1,
        attack_fit_size: float | int = 0.5,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UPIError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.attack_fit_size = attack_fit_size
        self.seed = seed
        self.augment = augment
        self.splits: dict[str, Dataset[tuple[Tensor, Tensor]]] = {}

    @abstractmethod
    def load_arrays(self, train: bool) -> tuple[Tensor, Tensor]:
        """Return ``(images uint8 (N, C, H, W), labels (N,))`` of the training or test set."""

    def train_transform(self) -> v2.Transform | None:
        """Augmentation of the training split (random crop + flip when ``augment``)."""
        if not self.augment:
            return None
        return v2.Compose([v2.RandomCrop(self.input_shape[1:], padding=4), v2.RandomHorizontalFlip()])

    def setup(self, stage: str | None = None) -> None:
        """Build every split (cheap: the arrays are in memory); the same on every rank."""
        if self.splits:
            return
        images, labels = self.load_arrays(train=True)
        n_val = split_sizes(len(images), self.val_size, "val_size")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[:n_val], order[n_val:]
        self.splits["train"] = UInt8ImageDataset(images[train_idx], labels[train_idx], self.train_transform())
        self.splits["val"] = UInt8ImageDataset(images[val_idx], labels[val_idx])
        test = UInt8ImageDataset(*self.load_arrays(train=False))
        n_fit = split_sizes(len(test), self.attack_fit_size, "attack_fit_size")
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(self.seed + 1))
        self.splits["test"] = test
        self.splits["attack_fit"] = Subset(test, order[:n_fit].tolist())
        self.splits["attack_eval"] = Subset(test, order[n_fit:].tolist())

    def dataloader(self, split: str, shuffle: bool = False) -> DataLoader[tuple[Tensor, Tensor]]:
        """A DataLoader over ``split`` (one of train, val, test, attack_fit, attack_eval)."""
        self.setup()
        if split not in self.splits:
            raise UPIError(f"Unknown split {split!r}; choose one of {sorted(self.splits)}.")
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """Shuffled training loader."""
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """Validation loader (part of the training set)."""
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """The whole test set."""
        return self.dataloader("test")

    def attack_fit_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """Test-set samples on which perturbations are fitted."""
        return self.dataloader("attack_fit")

    def attack_eval_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """Held-out test-set samples on which perturbations are evaluated."""
        return self.dataloader("attack_eval")


class TorchvisionDataModule(ImageDataModule):
    """A torchvision dataset class (``MNIST``-like) loaded once into memory.

    Args:
        root: folder that holds (or will receive) the dataset.
        download: download when missing (needs network).
        **kwargs: see :class:`ImageDataModule`.
    """

    dataset_name: str
    dataset_cls: type[torchvision.datasets.VisionDataset]

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
                f"Put the original files in {self.root.resolve() / self.dataset_name / 'raw'} "
                "(or the torchvision layout) or point data.root at a folder that has them."
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
    num_classes = 10
    input_shape = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)


class FashionMNISTDataModule(TorchvisionDataModule):
    """FashionMNIST, 60k/10k grayscale 28x28 clothing images."""

    dataset_name = "FashionMNIST"
    dataset_cls = torchvision.datasets.FashionMNIST
    num_classes = 10
    input_shape = (1, 28, 28)
    mean = (0.2860,)
    std = (0.3530,)


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10, 50k/10k colour 32x32 images (``augment`` enables crop + flip)."""

    dataset_name = "CIFAR-10"
    dataset_cls = torchvision.datasets.CIFAR10
    num_classes = 10
    input_shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


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


class SyntheticDataModule(ImageDataModule):
    """A learnable dataset generated in memory: needs nothing on disk and no network.

    Class ``c`` has a fixed smooth random template ``T_c``; a sample is
    ``clip(0.5 + s * a * (T_c - 0.5) + noise)`` with separation ``s``, a random contrast ``a`` in
    ``[0.5, 1]`` and Gaussian pixel noise, so a small CNN learns it in seconds without reaching 100%
    (the defaults give roughly 90% validation accuracy) and its saliency maps stay non-trivial.

    Args:
        num_train: training samples (before the validation split).
        num_test: test samples (split into attack fit/eval halves).
        num_classes: number of classes.
        input_shape: ``(C, H, W)``.
        separation: how far the class templates are from mid-grey (smaller is harder).
        noise: std of the pixel noise.
        **kwargs: see :class:`ImageDataModule` (``seed`` also seeds the generator).
    """

    def __init__(
        self,
        num_train: int = 2048,
        num_test: int = 512,
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 28, 28),
        separation: float = 0.3,
        noise: float = 0.3,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise UPIError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}.")
        self.num_train, self.num_test = num_train, num_test
        self.separation, self.noise = separation, noise
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)  # type: ignore[assignment]
        self.mean = [0.5] * input_shape[0]
        self.std = [0.25] * input_shape[0]

    def templates(self) -> Tensor:
        """One smooth template per class, ``(num_classes, C, H, W)`` in ``[0, 1]``."""
        generator = torch.Generator().manual_seed(self.seed)
        channels, height, width = self.input_shape
        coarse = torch.rand(self.num_classes, channels, max(height // 4, 1), max(width // 4, 1), generator=generator)
        return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)

    def load_arrays(self, train: bool) -> tuple[Tensor, Tensor]:
        """Draw the training or the test samples (different seeds, same templates)."""
        count = self.num_train if train else self.num_test
        generator = torch.Generator().manual_seed(self.seed * 2 + (0 if train else 1) + 1)
        labels = torch.randint(self.num_classes, (count,), generator=generator)
        contrast = torch.empty(count, 1, 1, 1).uniform_(0.5, 1.0, generator=generator)
        noise = torch.randn(count, *self.input_shape, generator=generator) * self.noise
        images = 0.5 + self.separation * contrast * (self.templates()[labels] - 0.5) + noise
        images = images.clamp(0, 1)
        return images.mul(255).round().to(torch.uint8), labels

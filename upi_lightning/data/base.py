"""The contract of every data module: ``ImageDataModule``, its splits, and the in-memory uint8 dataset.

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

import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from upi_lightning.errors import UPIError


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
        self.record_init_args()
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

    def record_init_args(self) -> None:
        """Keep the class path and init arguments in ``hparams``, which every checkpoint stores.

        So ``attack.py --ckpt`` rebuilds the data a model was trained on
        (:func:`~upi_lightning.checkpoints.stored_datamodule`). LightningCLI hands over its own config (with
        ``_class_path``); a module built in Python records the arguments of its ``__init__`` chain. Paths
        are kept as strings (checkpoints are read with ``weights_only``); nothing goes to the loggers.
        """
        self.save_hyperparameters(logger=False, frame=inspect.currentframe().f_back)  # type: ignore[union-attr]
        self.hparams.setdefault("_class_path", f"{type(self).__module__}.{type(self).__qualname__}")
        for key, value in self.hparams.items():
            if isinstance(value, os.PathLike):
                self.hparams[key] = os.fspath(value)

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

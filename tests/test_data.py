from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upi_lightning.data import (
    CIFAR10DataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    NpzDataModule,
    SyntheticDataModule,
    TorchvisionDataModule,
    UInt8ImageDataset,
    channel_stats,
    split_sizes,
)
from upi_lightning.errors import DatasetNotFoundError, UPIError


def test_synthetic_splits_are_deterministic_disjoint_and_in_unit_range() -> None:
    dm = SyntheticDataModule(num_train=200, num_test=100, val_size=0.25, attack_fit_size=40, seed=3)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape[1:] == dm.input_shape
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert y.max() < dm.num_classes
    assert [len(dm.splits[s]) for s in ("train", "val", "test", "attack_fit", "attack_eval")] == [150, 50, 100, 40, 60]
    fit, held_out = set(dm.splits["attack_fit"].indices), set(dm.splits["attack_eval"].indices)
    assert not fit & held_out and len(fit | held_out) == 100
    again = SyntheticDataModule(num_train=200, num_test=100, val_size=0.25, attack_fit_size=40, seed=3)
    again.setup()
    assert torch.equal(dm.splits["val"].images, again.splits["val"].images)
    assert dm.splits["attack_fit"].indices == again.splits["attack_fit"].indices


def test_channel_stats_match_numpy() -> None:
    images = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_stats(images)
    arr = images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, arr.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(std, arr.transpose(1, 0, 2, 3).reshape(3, -1).std(axis=1, ddof=1), rtol=1e-9)


def test_npz_module_reads_hwc_uint8(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8),
        train_labels=rng.integers(0, 4, 30),
        test_images=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8),
        test_labels=rng.integers(0, 4, 10),
    )
    dm = NpzDataModule(path, val_size=5, batch_size=4)
    assert dm.input_shape == (3, 8, 8) and len(dm.mean) == 3
    dm.setup()
    x, _ = dm.splits["test"][2]
    expected = torch.from_numpy(np.load(path)["test_images"][2]).permute(2, 0, 1).float() / 255
    assert torch.equal(x, expected)


def test_npz_module_refuses_missing_file_and_arrays(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"No \.npz file"):
        NpzDataModule(tmp_path / "absent.npz")
    np.savez(tmp_path / "partial.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(UPIError, match="lacks the arrays"):
        NpzDataModule(tmp_path / "partial.npz")


def test_cifar_subset_from_shared_data(cifar_subset_npz: Path) -> None:
    dm = NpzDataModule(cifar_subset_npz, val_size=1000, attack_fit_size=0.5)
    assert (dm.num_classes, dm.input_shape) == (10, (3, 32, 32))
    assert 0.4 < dm.mean[0] < 0.55 and 0.2 < dm.std[0] < 0.3
    dm.setup()
    assert len(dm.splits["train"]) == 9000 and len(dm.splits["test"]) == 2000


def test_mnist_from_shared_raw_files(mnist_root: Path) -> None:
    dm = MNISTDataModule(root=mnist_root, val_size=5000, eval_batch_size=256)
    dm.prepare_data()
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [55000, 5000, 10000]
    x, _ = next(iter(dm.attack_eval_dataloader()))
    assert x.shape == (256, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    mean = dm.splits["train"].images.float().mean() / 255
    assert abs(mean.item() - dm.mean[0]) < 0.005


@pytest.mark.parametrize(
    ("module", "files"),
    [
        (MNISTDataModule, "MNIST/raw/ (the four"),
        (CIFAR10DataModule, "cifar-10-batches-py/ (or cifar-10-python.tar.gz)"),
    ],
)
def test_a_missing_dataset_names_the_folder_and_the_files_torchvision_reads(
    tmp_path: Path, module: type[TorchvisionDataModule], files: str
) -> None:
    dm = module(root=tmp_path / "nowhere", download=False)
    message = rf"{dm.dataset_name} not found under .*nowhere.*Put {re.escape(files)}.* in .*nowhere, or point data.root"
    with pytest.raises(DatasetNotFoundError, match=message):
        dm.prepare_data()


def test_image_folder_module(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split, count in (("train", 6), ("val", 4)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    dm = ImageFolderDataModule(tmp_path, image_size=(8, 8), val_size=2, attack_fit_size=0.5)
    assert dm.num_classes == 2 and dm.input_shape == (3, 8, 8)
    dm.setup()
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 3, 8, 8) and set(y.tolist()) == {0, 1}
    with pytest.raises(DatasetNotFoundError, match="needs"):
        ImageFolderDataModule(tmp_path / "missing")


def test_bad_split_sizes_and_arrays_are_refused() -> None:
    with pytest.raises(UPIError, match="val_size"):
        SyntheticDataModule(num_train=10, val_size=10).setup()
    with pytest.raises(UPIError, match="uint8"):
        UInt8ImageDataset(torch.zeros(2, 1, 3, 3), torch.zeros(2))


def test_split_sizes_take_fractions_and_whole_counts_even_as_floats() -> None:
    assert split_sizes(10, 0.3, "val_size") == 3 and split_sizes(10, 3, "val_size") == 3
    assert split_sizes(10, 3.0, "val_size") == 3 and split_sizes(10, 1.0, "val_size") == 1  # YAML's 3 -> 3.0
    with pytest.raises(UPIError, match=r"val_size=1.5 must be a fraction in \(0, 1\) or a whole count between 1 and 9"):
        split_sizes(10, 1.5, "val_size")
    with pytest.raises(UPIError, match="leaves an empty split of 10 samples"):
        split_sizes(10, 10.0, "val_size")
    with pytest.raises(UPIError, match="has 1 sample"):
        split_sizes(1, 0.5, "attack_fit_size")

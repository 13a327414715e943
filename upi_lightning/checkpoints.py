"""Classifier checkpoints: safe loading, the data module they record, the checks that a model fits the data.

Every failure is one :class:`~upi_lightning.errors.UPIError` line: a missing file, a truncated one, one
holding pickled objects (refused, never run), weights of another architecture, a model trained on other
images or classes than the data's.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn

from upi_lightning.data import ImageDataModule
from upi_lightning.errors import CheckpointMismatchError, UPIError, one_line
from upi_lightning.model_modes import model_device
from upi_lightning.models import rebuilt_arch_kwargs
from upi_lightning.module import Classifier


def load_classifier(ckpt: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """Load a :class:`Classifier` checkpoint safely (``weights_only=True``) with clear errors.

    Raises:
        UPIError: if the file is missing.
        CheckpointMismatchError: if the file is not a readable Classifier checkpoint (corrupt, another
            architecture than its hyperparameters say, or holding pickled objects, which are refused).
    """
    path = checkpoint_file(ckpt, "--ckpt")
    hparams = read_checkpoint(path).get(LightningModule.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    # the checkpoint holds every weight: a fine-tuned pretrained model is rebuilt without a download
    rebuilt: dict[str, Any] = {"pretrained": False}
    if hparams.get("pretrained"):
        rebuilt["arch_kwargs"] = rebuilt_arch_kwargs(str(hparams["arch"]), hparams.get("arch_kwargs") or {})
    try:
        return Classifier.load_from_checkpoint(path, map_location=device, weights_only=True, **rebuilt)
    except CHECKPOINT_ERRORS as err:
        raise unreadable_checkpoint(path, err) from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded safely (``weights_only``; memory-mapped where its format allows).

    Raises:
        CheckpointMismatchError: if it is unreadable (pickled objects are refused), or not a checkpoint of a
            model (no ``state_dict``: e.g. a perturbation file).
    """
    try:  # files of the legacy (non-zip) format cannot be mapped
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except CHECKPOINT_ERRORS as err:
        raise unreadable_checkpoint(path, err) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointMismatchError(
            f"{path} is not a checkpoint of train.py (no state_dict); pass --ckpt path/to/last.ckpt."
        )
    return checkpoint


def stored_datamodule(ckpt: str | Path) -> dict[str, Any]:
    """The data module a checkpoint was trained on, as ``attack.py --data`` takes it: ``class_path``, ``init_args``.

    Read from the data module's hyperparameters, which Lightning stores in every checkpoint of a fit with
    a data module (:meth:`~upi_lightning.data.ImageDataModule.record_init_args`). Relative paths in them
    are relative to where the training ran.

    Raises:
        UPIError: if the file is missing, or records no data module (a fit without one, or a checkpoint
            written before this version): then give ``--data``.
        CheckpointMismatchError: if the file is not a readable checkpoint, or not one of a model.
    """
    path = checkpoint_file(ckpt, "--ckpt")
    hparams = dict(read_checkpoint(path).get(LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY) or {})
    class_path = hparams.pop("_class_path", None)
    if not isinstance(class_path, str):
        raise UPIError(
            f"{path} does not record the data module it was trained on (trained without one, or before this "
            "version); give --data (e.g. the data: section of the training config)."
        )
    init_args = {key: value for key, value in hparams.items() if not key.startswith("_")}
    return {"class_path": class_path, "init_args": init_args}


CHECKPOINT_ERRORS = (pickle.UnpicklingError, RuntimeError, KeyError, TypeError, ValueError, EOFError)
"""What loading a bad checkpoint raises (pickled objects, truncated file, weights of another model)."""


def checkpoint_file(ckpt: str | Path, flag: str) -> Path:
    """``ckpt`` as a path, checked to be a file (``flag``: the option that gave it, for the message).

    Raises:
        UPIError: if there is no file at ``ckpt``.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise UPIError(
            f"No checkpoint at {path}; pass {flag} path/to/last.ckpt (train.py writes runs/.../checkpoints)."
        )
    return path


def unreadable_checkpoint(path: Path, err: BaseException) -> CheckpointMismatchError:
    """The one-line error for a checkpoint whose loading raised ``err`` (one of :data:`CHECKPOINT_ERRORS`)."""
    if isinstance(err, pickle.UnpicklingError):
        return CheckpointMismatchError(
            f"{path} holds objects that safe (weights_only) loading refuses; only load checkpoints you trust "
            f"written by train.py. ({one_line(err)})"
        )
    return CheckpointMismatchError(
        f"{path} is not a Classifier checkpoint this version can rebuild (truncated, or weights of another "
        f"architecture): {one_line(err)}"
    )


def check_model_fits_data(model: Classifier, datamodule: ImageDataModule) -> None:
    """Refuse a classifier trained on images or classes other than the data's."""
    trained = (tuple(model.hparams["input_shape"]), int(model.hparams["num_classes"]))
    data = (tuple(datamodule.input_shape), int(datamodule.num_classes))
    if trained != data:
        raise CheckpointMismatchError(
            f"The checkpoint was trained on images {trained[0]} with {trained[1]} classes, but the data has "
            f"images {data[0]} with {data[1]} classes; attack it with the data it was trained on."
        )


def check_model_takes_images(model: nn.Module, name: str, datamodule: ImageDataModule) -> None:
    """Refuse a classifier that cannot take the data's images (e.g. a 3-channel torchvision net on MNIST).

    Runs it (in eval mode) on two black images of the data's shape.

    Raises:
        CheckpointMismatchError: with the model's own error, in one line.
    """
    images = torch.zeros(2, *datamodule.input_shape, device=model_device(model))
    try:
        with torch.no_grad():
            model(images)
    except RuntimeError as err:
        raise CheckpointMismatchError(
            f"{name} cannot classify the images of {type(datamodule).__name__} (shape "
            f"{tuple(datamodule.input_shape)}): {one_line(err)}"
        ) from None

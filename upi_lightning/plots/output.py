"""Figures to files (PNG, PDF, SVG; written atomically) and to TensorBoard images."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from upi_lightning.io import atomic_write

FILE_DPI = 200
"""Resolution of PNG files (and of the images inside PDFs)."""
SCREEN_DPI = 100
"""Resolution of TensorBoard images."""


def write_figure(figure: Figure, path: str | os.PathLike[str], dpi: int = FILE_DPI) -> Path:
    """Write ``figure`` in the format its suffix names (``.png``, ``.pdf``, ``.svg``), atomically.

    PDFs carry no creation date, so the same figure gives the same file.
    """
    path = Path(path)
    buffer = io.BytesIO()
    metadata = {"CreationDate": None} if path.suffix == ".pdf" else None
    figure.savefig(buffer, format=path.suffix.lstrip("."), dpi=dpi, metadata=metadata)
    return atomic_write(path, lambda stream: stream.write(buffer.getvalue()))


def save_figure(
    figure: Figure, stem: str | os.PathLike[str], formats: Sequence[str] = ("png", "pdf"), dpi: int = FILE_DPI
) -> list[Path]:
    """Write ``figure`` as ``<stem>.png`` and ``<stem>.pdf`` (or ``formats``); return the paths."""
    stem = Path(stem)
    return [write_figure(figure, stem.parent / f"{stem.name}.{suffix}", dpi) for suffix in formats]


def figure_image(figure: Figure, dpi: int = SCREEN_DPI) -> Tensor:
    """``figure`` as an RGB image ``(3, H, W)`` in ``[0, 1]``, for ``SummaryWriter.add_image``."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    with Image.open(buffer) as image:
        array = np.asarray(image.convert("RGB")).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255

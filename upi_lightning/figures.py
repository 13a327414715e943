"""Figures of saliency maps and perturbations: tensors for TensorBoard and labelled PNG files."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

from upi_lightning.io import atomic_write

LABEL_WIDTH = 120
MIN_TILE = 64


def heat_colormap(maps: Tensor) -> Tensor:
    """Maps ``(N, H, W)`` to RGB ``(N, 3, H, W)`` in ``[0, 1]`` (black-red-yellow-white, per-sample max = white).

    An all-zero map stays black.
    """
    peak = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(maps.dtype).tiny).view(-1, 1, 1)
    value = (maps / peak).clamp(0, 1)
    return torch.stack([(3 * value).clamp(0, 1), (3 * value - 1).clamp(0, 1), (3 * value - 2).clamp(0, 1)], dim=1)


def perturbation_image(delta: Tensor) -> Tensor:
    """A perturbation ``(C, H, W)`` as an RGB image: mid-grey is 0, the largest ``|delta|`` reaches 0 or 1."""
    scale = delta.abs().max().clamp_min(torch.finfo(delta.dtype).tiny)
    image = 0.5 + delta / (2 * scale)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


def to_rgb(images: Tensor) -> Tensor:
    """Grey or RGB images ``(N, C, H, W)`` in ``[0, 1]`` to ``(N, 3, H, W)``."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]


def figure_rows(rows: Sequence[tuple[str, Tensor]]) -> Tensor:
    """Stack labelled rows of RGB tiles ``(N_i, 3, H, W)`` into one labelled image ``(3, H', W')``.

    Tiles are upscaled (nearest) to at least ``MIN_TILE`` pixels so small images stay readable, and each
    row's label is drawn in a left margin.
    """
    height, width = rows[0][1].shape[-2:]
    factor = max(1, -(-MIN_TILE // min(height, width)))
    columns = max(len(tiles) for _, tiles in rows)
    strips = []
    for _, tiles in rows:
        tiles = F.interpolate(tiles.detach().float().cpu(), scale_factor=factor, mode="nearest")
        strips.append(make_grid(tiles, nrow=columns, padding=2, pad_value=1.0))
    strip_width = max(strip.shape[-1] for strip in strips)
    canvas = Image.new("RGB", (LABEL_WIDTH + strip_width, sum(s.shape[-2] for s in strips)), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for (label, _), strip in zip(rows, strips, strict=True):
        array = (strip.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(array), (LABEL_WIDTH, top))
        draw.text((4, top + strip.shape[-2] // 2 - 6), label, fill="black")
        top += strip.shape[-2]
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def saliency_figure(
    images: Tensor, clean_maps: Tensor, perturbed: Sequence[tuple[str, Tensor, Tensor | None]]
) -> Tensor:
    """Figure of clean images, their maps, and for each perturbation its maps (and itself, last tile).

    Args:
        images: ``(N, C, H, W)`` clean images in ``[0, 1]``.
        clean_maps: ``(N, H, W)`` their saliency maps.
        perturbed: ``(name, maps (N, H, W), delta (C, H, W) or None)`` per perturbation; a universal
            ``delta`` is drawn as one extra tile at the end of its row.

    Returns:
        An RGB image ``(3, H', W')`` in ``[0, 1]`` (for ``SummaryWriter.add_image`` or :func:`save_png`).
    """
    rows = [("image", to_rgb(images)), ("clean map", heat_colormap(clean_maps))]
    for name, maps, delta in perturbed:
        tiles = heat_colormap(maps)
        if delta is not None:
            tiles = torch.cat([tiles, perturbation_image(delta.cpu()).unsqueeze(0)])
        rows.append((f"{name} map", tiles))
    return figure_rows(rows)


def save_png(image: Tensor, path: str | os.PathLike[str]) -> Path:
    """Write an RGB image ``(3, H, W)`` in ``[0, 1]`` to a PNG file, atomically."""
    array = (image.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return atomic_write(path, lambda stream: stream.write(buffer.getvalue()))

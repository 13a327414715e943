from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from upi_lightning.figures import heat_colormap, perturbation_image, saliency_figure, save_png


def test_heat_colormap_scales_each_map_to_its_peak() -> None:
    maps = torch.zeros(2, 3, 3)
    maps[0, 1, 1] = 0.5
    rgb = heat_colormap(maps)
    assert rgb.shape == (2, 3, 3, 3)
    assert torch.equal(rgb[0, :, 1, 1], torch.ones(3))  # the peak is white
    assert rgb[0].sum() == 3 and rgb[1].abs().sum() == 0  # all-zero map stays black, no NaN


def test_perturbation_image_maps_zero_to_grey_and_extremes_to_bounds() -> None:
    delta = torch.tensor([[[0.0, 0.2, -0.1]]])
    image = perturbation_image(delta)
    assert image.shape == (3, 1, 3)
    torch.testing.assert_close(image[0, 0], torch.tensor([0.5, 1.0, 0.25]))


def test_saliency_figure_png_has_one_row_per_map_kind(tmp_path: Path) -> None:
    images, maps = torch.rand(4, 1, 28, 28), torch.rand(4, 28, 28)
    figure = saliency_figure(images, maps, [("upi", maps, torch.randn(1, 28, 28)), ("per-sample", maps, None)])
    path = save_png(figure, tmp_path / "figure.png")
    array = np.asarray(Image.open(path))
    assert array.shape[2] == 3 and array.shape[:2] == tuple(figure.shape[1:])
    # four rows (image, clean, upi, per-sample) of 84-pixel tiles (28 upscaled x3 to reach 64), make_grid
    # padding 2; the widest row has 5 tiles (4 maps + the perturbation) after a 120-pixel label margin
    assert array.shape[:2] == (4 * (84 + 2 + 2), 120 + 5 * (84 + 2) + 2)
    assert (array[:, :120] < 128).any()  # the labels are drawn

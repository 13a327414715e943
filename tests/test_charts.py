from __future__ import annotations

import math

import pytest
import torch

from upi_lightning.charts import PALETTE, chart_axes, heat_map, line_chart, nice_ticks


def rgb(color: str) -> list[int]:
    return [int(color[i : i + 2], 16) for i in (1, 3, 5)]


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.13, 0.87) == [0.2, 0.4, 0.6, 0.8]
    assert nice_ticks(-0.012, 0.031) == [-0.01, 0.0, 0.01, 0.02, 0.03]
    assert nice_ticks(0.0, 30.0, 4) == [0.0, 10.0, 20.0, 30.0]
    assert nice_ticks(3.0, 3.0) == [3.0]


def test_each_point_is_drawn_in_its_series_colour_where_the_axes_put_it() -> None:
    series = {"upi_grad": [(0.5, 0.2), (1.0, 0.4), (3.0, 0.9)], "random": [(0.5, 0.1), (1.0, 0.15), (3.0, math.nan)]}
    size = (480, 320)
    image = line_chart(series, "relative L2 vs eps", "eps", "relative_l2", size)
    assert image.shape == (3, 320, 480) and image.min() >= 0 and image.max() <= 1
    pixels = (image * 255).round().int()
    axes = chart_axes(series, size)
    for index, points in enumerate(series.values()):
        for x, y in points:
            if math.isfinite(y):
                column, row = axes.pixel(x, y)
                assert pixels[:, round(row), round(column)].tolist() == rgb(PALETTE[index]), (x, y)
    # the axes map the data range inside the plotting box: the lowest point is near the bottom edge
    left, top, right, bottom = axes.box
    assert axes.pixel(0.5, 0.1)[0] == left and top < axes.pixel(0.5, 0.1)[1] < bottom
    assert axes.pixel(3.0, 0.9)[0] == right


def test_a_chart_without_finite_points_is_refused() -> None:
    with pytest.raises(ValueError, match="finite point"):
        line_chart({"a": [(1.0, math.nan)]})


def test_heat_map_colours_the_minimum_black_and_the_maximum_white() -> None:
    matrix = torch.tensor([[0.1, 0.5], [0.3, 0.9]])
    image = heat_map(matrix, ["cnn", "resnet"], ["cnn", "resnet"], "transfer", cell=60)
    assert image.shape[0] == 3
    left, top = 12 + 6 * len("resnet"), 44
    corner = (image * 255).round().int()
    # sample a cell pixel away from the printed value: the cell's top-left corner
    assert corner[:, top + 2, left + 2].tolist() == [0, 0, 0]  # 0.1, the minimum
    assert corner[:, top + 60 + 2, left + 60 + 2].tolist() == [255, 255, 255]  # 0.9, the maximum
    with pytest.raises(ValueError, match="labels"):
        heat_map(matrix, ["a"], ["b", "c"])

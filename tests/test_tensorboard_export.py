from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from upi_lightning.charts import PALETTE, chart_axes
from upi_lightning.errors import UPIError
from upi_lightning.tensorboard_export import export_tensorboard, main

SCALARS = {
    "loss": [(0, 2.0), (10, 1.0), (20, 0.5), (30, 0.25)],
    "acc": [(0, 0.1), (10, 0.6), (20, 0.8), (30, 0.9)],
    "lr": [(0, 1e-3), (30, 5e-4)],
}
SOLID = (17, 201, 99)  # not a palette, grid or text colour


def rgb(color: str) -> list[int]:
    return [int(color[i : i + 2], 16) for i in (1, 3, 5)]


def write_run(folder: Path, scalars: dict[str, list[tuple[int, float]]], image: bool = True) -> None:
    with SummaryWriter(str(folder)) as writer:
        for tag, points in scalars.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
        if image:
            # an older image first: only the last one logged is exported
            writer.add_image("solid", torch.zeros(3, 8, 8, dtype=torch.uint8), 0)
            writer.add_image("solid", torch.tensor(SOLID, dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8), 30)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    folder = tmp_path / "logs" / "version_0"
    write_run(folder, SCALARS)
    return folder


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image).copy()


def test_png_follows_the_documented_grid_with_the_solid_image_below(run: Path, tmp_path: Path) -> None:
    out = export_tensorboard(run, tmp_path / "out" / "tb.png", columns=2)
    assert out == tmp_path / "out" / "tb.png" and out.is_file()
    pixels = read(out)
    # 3 scalar tags in 2 columns: a 2 x 2 grid of 480 x 320 charts (the last slot empty); below it an
    # 8-pixel gap, a 16-pixel label strip, the 8 x 8 image upscaled x14 to 112 x 112 and a last 8-pixel gap
    assert pixels.shape == (2 * 320 + 8 + 16 + 112 + 8, 2 * 480, 3)
    # each chart frames its plotting box in black: 64 px left margin, 28 top, 16 right, 40 bottom
    frames = []
    for row in range(2):
        for column in range(2):
            left, top = column * 480, row * 320
            edge = pixels[top + 100 : top + 200, left + 64]  # a stretch of the box's left side
            frames.append(bool((edge == 0).all()))
    assert frames == [True, True, True, False]
    assert (pixels[320:640, 480:960] == 255).all()  # the empty grid slot stays white
    # the last logged image, in its solid colour, where the layout puts it (the older black one is not shown)
    solid = (pixels == SOLID).all(axis=2)
    assert solid.sum() == 112 * 112
    assert solid[640 + 8 + 16 : 640 + 8 + 16 + 112, 0:112].all()


def test_images_only_make_a_png_as_wide_as_the_widest_image(run: Path, tmp_path: Path) -> None:
    pixels = read(export_tensorboard(run, tmp_path / "tb.png", scalar_tags=[]))
    assert pixels.shape[:2] == (8 + 16 + 112 + 8, 112)
    assert (pixels == SOLID).all(axis=2).sum() == 112 * 112


def test_each_scalar_is_drawn_where_the_chart_axes_put_it(run: Path, tmp_path: Path) -> None:
    pixels = read(export_tensorboard(run, tmp_path / "tb.png", columns=3))
    assert pixels.shape[:2] == (320 + 8 + 16 + 112 + 8, 3 * 480)
    for index, tag in enumerate(sorted(SCALARS)):  # default: every tag, sorted
        axes = chart_axes({"version_0": SCALARS[tag]}, (480, 320))
        for step, value in SCALARS[tag]:
            column, row = axes.pixel(step, value)
            assert pixels[round(row), 480 * index + round(column)].tolist() == rgb(PALETTE[0]), (tag, step)


def test_chosen_tags_keep_their_order_and_several_runs_get_one_series_each(tmp_path: Path) -> None:
    write_run(tmp_path / "a", {"loss": [(0, 1.0), (10, 0.5)]}, image=False)
    write_run(tmp_path / "b", {"loss": [(0, 0.8), (10, 0.2)], "acc": [(0, 0.5), (10, 0.7)]}, image=False)
    pixels = read(export_tensorboard(tmp_path, tmp_path / "tb.png", scalar_tags=["loss", "acc"], columns=1))
    assert pixels.shape[:2] == (2 * 320, 480)
    series = {"a": [(0, 1.0), (10, 0.5)], "b": [(0, 0.8), (10, 0.2)]}  # runs sorted by folder name
    axes = chart_axes(series, (480, 320))
    for index, points in enumerate(series.values()):
        for step, value in points:
            column, row = axes.pixel(step, value)
            assert pixels[round(row), round(column)].tolist() == rgb(PALETTE[index]), (index, step)
    acc = chart_axes({"b": [(0, 0.5), (10, 0.7)]}, (480, 320))
    column, row = acc.pixel(10, 0.7)
    assert pixels[320 + round(row), round(column)].tolist() == rgb(PALETTE[0])


def test_a_folder_without_event_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UPIError, match=r"No TensorBoard event file .* under .*empty: train first.*train\.py fit"):
        export_tensorboard(tmp_path / "empty", tmp_path / "tb.png")
    with pytest.raises(UPIError, match="No TensorBoard event file"):
        export_tensorboard(tmp_path / "missing", tmp_path / "tb.png")
    assert not (tmp_path / "tb.png").exists()


def test_unknown_tags_are_refused_with_the_available_ones(run: Path, tmp_path: Path) -> None:
    with pytest.raises(UPIError, match=r"Unknown scalar tag\(s\) nope in .*; available scalar tags: acc, loss, lr\."):
        export_tensorboard(run, tmp_path / "tb.png", scalar_tags=["loss", "nope"])
    with pytest.raises(UPIError, match=r"Unknown image tag\(s\) figure in .*; available image tags: solid\."):
        export_tensorboard(run, tmp_path / "tb.png", image_tags=["figure"])
    with pytest.raises(UPIError, match="Nothing to export"):
        export_tensorboard(run, tmp_path / "tb.png", scalar_tags=[], image_tags=[])
    assert not (tmp_path / "tb.png").exists()


def test_command_line(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = main([str(run), str(tmp_path / "tb.png"), "--scalars", "loss", "--images", "solid", "--columns", "2"])
    assert read(out).shape[:2] == (320 + 8 + 16 + 112 + 8, 480)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), str(tmp_path / "other.png"), "--scalars", "nope"])
    assert exit_info.value.code == 2
    assert "error: Unknown scalar tag(s) nope" in capsys.readouterr().err

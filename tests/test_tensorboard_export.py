from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from upi_lightning.errors import UPIError
from upi_lightning.plots.style import METHOD_STYLES
from upi_lightning.tensorboard_export import EXPORT_DPI, export_tensorboard, main, tensorboard_figure

SCALARS = {
    "loss": [(0, 2.0), (10, 1.0), (20, 0.5), (30, 0.25)],
    "upi/upi_grad/relative_l2": [(9, 0.4), (19, 0.5), (29, 0.55)],
    "upi/random/relative_l2": [(9, 0.3), (19, 0.35), (29, float("nan"))],
    "upi/upi_grad/n_seen": [(9, 64.0)],  # bookkeeping of an older run
    "epoch": [(0, 0.0), (30, 1.0)],
    "hp_metric": [(0, -1.0)],
}
SOLID = (17, 201, 99)


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


def charts(figure) -> dict:
    """``{title: {line colour: (x, y)}}`` of the figure's charts (the axes with lines)."""
    return {
        ax.get_title(): {line.get_color(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
        for ax in figure.axes
        if ax.get_lines()
    }


def legend_texts(figure) -> list[str]:
    """The entries of the one legend of the figure (drawn in the part that holds the charts)."""
    (legend,) = [legend for part in (figure, *figure.subfigs) for legend in part.legends]
    return [text.get_text() for text in legend.get_texts()]


def test_methods_share_one_chart_per_metric_and_bookkeeping_is_left_out(run: Path) -> None:
    figure = tensorboard_figure(run, columns=2)
    drawn = charts(figure)
    assert list(drawn) == ["loss", "upi/relative_l2"]  # not epoch, hp_metric or n_seen; one chart for both methods
    upi = sorted(drawn["upi/relative_l2"].values(), key=len)
    assert [x for x, _ in upi] == [[9, 19], [9, 19, 29]]  # random without its NaN, upi_grad
    assert [y for _, y in upi] == [pytest.approx([0.3, 0.35]), pytest.approx([0.4, 0.5, 0.55])]
    assert legend_texts(figure) == ["version_0", "random", "upi_grad"]
    assert set(drawn["upi/relative_l2"]) == {METHOD_STYLES["random"][0], METHOD_STYLES["upi_grad"][0]}
    (solid,) = [ax for ax in figure.axes if ax.get_title() == "solid"]  # the last image, below the charts
    np.testing.assert_array_equal(solid.images[0].get_array(), np.full((8, 8, 3), SOLID, dtype=np.uint8))
    figure.canvas.draw()
    assert solid.get_window_extent().y1 < min(ax.get_window_extent().y0 for ax in figure.axes if ax.get_lines())


def test_the_file_is_a_readable_png_pdf_or_svg(run: Path, tmp_path: Path) -> None:
    out = export_tensorboard(run, tmp_path / "out" / "tb.png", columns=2)
    assert out == tmp_path / "out" / "tb.png"
    width, height = tensorboard_figure(run, columns=2).get_size_inches() * EXPORT_DPI
    with Image.open(out) as image:
        assert image.format == "PNG" and abs(image.size[0] - width) < 1 and abs(image.size[1] - height) < 1
    assert 20_000 < out.stat().st_size < 2_000_000
    assert export_tensorboard(run, tmp_path / "tb.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in export_tensorboard(run, tmp_path / "tb.svg").read_bytes()[:1000]
    with pytest.raises(UPIError, match=r"must end in \.png, \.pdf or \.svg, got tb\.jpg"):
        export_tensorboard(run, tmp_path / "tb.jpg")


def test_chosen_tags_keep_their_order_even_bookkeeping(run: Path) -> None:
    figure = tensorboard_figure(run, scalar_tags=["upi/upi_grad/n_seen", "loss"], image_tags=[])
    assert list(charts(figure)) == ["upi/n_seen", "loss"]
    assert not any(ax.images for ax in figure.axes)
    images_only = tensorboard_figure(run, scalar_tags=[])
    assert [ax.get_title() for ax in images_only.axes] == ["solid"]


def test_several_runs_get_one_series_each(tmp_path: Path) -> None:
    a = {"loss": [(0, 1.0), (10, 0.5)], "upi/random/spearman": [(0, 0.9)], "upi/upi_grad/spearman": [(0, 0.8)]}
    write_run(tmp_path / "a", a, image=False)
    b = {"loss": [(0, 0.8), (10, 0.2)], "acc": [(0, 0.5), (10, 0.7)], "upi/random/spearman": [(0, 0.7)]}
    write_run(tmp_path / "b", b, image=True)
    figure = tensorboard_figure(tmp_path, columns=1)
    drawn = charts(figure)
    assert list(drawn) == ["acc", "loss", "upi/spearman"]
    assert sorted(y for _, y in drawn["loss"].values()) == [pytest.approx([0.8, 0.2]), pytest.approx([1.0, 0.5])]
    # a method drawn by two runs is named with its run; drawn by one, it keeps its name (and colour)
    assert legend_texts(figure) == ["b", "a", "random · a", "random · b", "upi_grad"]
    assert METHOD_STYLES["upi_grad"][0] in drawn["upi/spearman"]
    assert [ax.get_title() for ax in figure.axes if ax.images] == ["solid\n(b)"]
    (acc,) = [ax for ax in figure.axes if ax.get_title() == "upi/spearman"]
    assert list(acc.get_xticks()) == [0]  # one step: one tick


def test_a_folder_without_event_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UPIError, match=r"No TensorBoard event file .* under .*empty: train first.*train\.py fit"):
        export_tensorboard(tmp_path / "empty", tmp_path / "tb.png")
    with pytest.raises(UPIError, match="No TensorBoard event file"):
        export_tensorboard(tmp_path / "missing", tmp_path / "tb.png")
    assert not (tmp_path / "tb.png").exists()


def test_unknown_tags_are_refused_with_the_available_ones(run: Path, tmp_path: Path) -> None:
    available = "epoch, hp_metric, loss, upi/random/relative_l2, upi/upi_grad/n_seen, upi/upi_grad/relative_l2"
    with pytest.raises(UPIError, match=rf"Unknown scalar tag\(s\) nope in .*; available scalar tags: {available}\."):
        export_tensorboard(run, tmp_path / "tb.png", scalar_tags=["loss", "nope"])
    with pytest.raises(UPIError, match=r"Unknown image tag\(s\) figure in .*; available image tags: solid\."):
        export_tensorboard(run, tmp_path / "tb.png", image_tags=["figure"])
    with pytest.raises(UPIError, match="Nothing to export"):
        export_tensorboard(run, tmp_path / "tb.png", scalar_tags=[], image_tags=[])
    with pytest.raises(UPIError, match="columns must be at least 1"):
        export_tensorboard(run, tmp_path / "tb.png", columns=0)
    assert not (tmp_path / "tb.png").exists()


def test_command_line(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = main([str(run), str(tmp_path / "tb.png"), "--scalars", "loss", "--images", "solid", "--columns", "2"])
    assert out.is_file() and f"Wrote {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), str(tmp_path / "other.png"), "--scalars", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown scalar tag(s) nope") and err.count("\n") == 1

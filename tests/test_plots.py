"""The figures of upi_lightning.plots, inspected as matplotlib objects and as files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from PIL import Image

from tests.helpers import colorbar_images, grid_axes
from upi_lightning.plots import (
    Bar,
    Curve,
    budget_title,
    chart_grid,
    comparison_figure,
    dashboard_figure,
    eps_label,
    figure_image,
    perturbation_figure,
    ratio_heat_map,
    saliency_figure,
    save_figure,
    series_looks,
)
from upi_lightning.plots.output import FILE_DPI, SCREEN_DPI
from upi_lightning.plots.style import METHOD_STYLES, OKABE_ITO

N, SIDE = 3, 12


def normalized(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.sum(dim=(1, 2), keepdim=True)


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, torch.Tensor, torch.Tensor | None]]]:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(N, 1, SIDE, SIDE, generator=gen)
    clean = normalized(torch.rand(N, SIDE, SIDE, generator=gen))
    peaked = normalized(torch.rand(N, SIDE, SIDE, generator=gen) ** 8)  # the largest value of the figure
    perturbed = [
        ("upi_grad", peaked, 0.3 * torch.randn(1, SIDE, SIDE, generator=gen)),
        ("random", clean.flip(1), 0.1 * torch.randn(1, SIDE, SIDE, generator=gen)),
        ("per_sample", clean, None),
    ]
    return images, clean, perturbed


def test_eps_labels_and_titles_name_the_budget() -> None:
    assert [eps_label(eps) for eps in (1.0, 0.05, 0.031, 0.2, 8 / 255, 1 / 7)] == [
        "1",
        "0.05",
        "0.031",
        "0.2",
        "8/255",
        "0.1429",
    ]
    assert budget_title("small_cnn", "gradient", "l2", 8 / 255) == "small_cnn · gradient maps · L2 ε = 8/255"
    assert budget_title("mlp", "smoothgrad", "linf") == "mlp · smoothgrad maps · LINF"
    assert budget_title("mlp", "smoothgrad") == "mlp · smoothgrad maps"


def test_saliency_figure_puts_every_map_on_one_scale_with_headers_and_colour_bars(inputs, tmp_path: Path) -> None:
    images, clean, perturbed = inputs
    title = budget_title("small_cnn", "gradient", "l2", 1.0)
    figure = saliency_figure(images, clean, perturbed, title)
    assert figure.get_suptitle() == title and all(part in title for part in ("gradient", "L2", "ε = 1"))
    axes = grid_axes(figure, N + 1, 5)  # a row per image and the perturbations' row; image, clean, 3 methods
    assert [ax.get_title() for ax in axes[0]] == [
        "image",
        "clean\nmap",
        "upi_grad\nmap",
        "random\nmap",
        "per_sample\nmap",
    ]
    assert [ax.get_title() for ax in axes[N]] == ["", "", "upi_grad\nδ", "random\nδ", ""]
    assert [ax.axison for ax in axes[N]] == [False, False, True, True, False]  # nothing under image, clean, per-sample
    every_map = [clean, *(maps for _, maps, _ in perturbed)]
    peak = max(float(maps.max()) for maps in every_map)
    assert peak == pytest.approx(float(perturbed[0][1].max()))
    for i in range(N):
        np.testing.assert_array_equal(axes[i][0].images[0].get_array(), images[i, 0].numpy())
        for column, maps in enumerate(every_map, start=1):
            shown = axes[i][column].images[0]
            np.testing.assert_array_equal(shown.get_array(), maps[i].numpy())
            assert shown.get_clim() == pytest.approx((0.0, peak)) and shown.get_cmap().name == "inferno"
    delta_peak = max(float(delta.abs().max()) for _, _, delta in perturbed if delta is not None)
    for column, (_, _, delta) in zip((2, 3), perturbed[:2], strict=True):
        shown = axes[N][column].images[0]
        np.testing.assert_allclose(shown.get_array(), delta[0].numpy())
        assert shown.get_clim() == pytest.approx((-delta_peak, delta_peak)) and shown.get_cmap().name == "RdBu_r"
    bars = colorbar_images(figure)
    assert sorted(image.get_cmap().name for image in bars) == ["RdBu_r", "inferno"]
    assert "saliency" in next(image for image in bars if image.get_cmap().name == "inferno").colorbar.ax.get_ylabel()

    png, pdf = save_figure(figure, tmp_path / "figure_gradient_l2_eps1")
    assert (png.name, pdf.name) == ("figure_gradient_l2_eps1.png", "figure_gradient_l2_eps1.pdf")
    width, height = figure.get_size_inches() * FILE_DPI
    with Image.open(png) as image:
        assert image.size == (round(width), round(height)) and image.mode == "RGBA"
    assert 20_000 < png.stat().st_size < 2_000_000
    assert pdf.read_bytes().startswith(b"%PDF") and 10_000 < pdf.stat().st_size < 2_000_000
    again = save_figure(saliency_figure(images, clean, perturbed, title), tmp_path / "again")[1]
    assert again.read_bytes() == pdf.read_bytes()  # no creation date: the same figure gives the same file
    assert not list(tmp_path.glob(".*.tmp"))


def test_saliency_figure_with_samples_in_columns_and_colour_images(inputs) -> None:
    _, clean, _ = inputs
    images = torch.rand(N, 3, SIDE, SIDE)
    rgb_delta = torch.randn(3, SIDE, SIDE)
    figure = saliency_figure(images, clean, [("uap", clean, rgb_delta)], "monitor", samples_in_columns=True)
    axes = grid_axes(figure, 3, N + 1)  # image, clean map, uap map; a column per image and the perturbation's
    assert [axes[r][0].get_ylabel() for r in range(3)] == ["image", "clean map", "uap map"]
    np.testing.assert_allclose(axes[0][1].images[0].get_array(), images[1].permute(1, 2, 0).numpy())
    np.testing.assert_allclose(axes[2][N].images[0].get_array(), rgb_delta.mean(dim=0).numpy(), rtol=1e-6)
    assert axes[2][N].get_title() == "uap\nδ" and not axes[0][N].axison
    monitor = saliency_figure(images, clean, [], "maps only", samples_in_columns=True)
    assert [ax.get_ylabel() for ax in grid_axes(monitor, 2, N)[:, 0]] == ["image", "map"]
    assert [image.get_cmap().name for image in colorbar_images(monitor)] == ["inferno"]


def test_an_all_zero_map_still_gets_a_valid_scale() -> None:
    figure = saliency_figure(
        torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4), [("random", torch.zeros(1, 4, 4), None)], "t"
    )
    assert grid_axes(figure, 1, 3)[0][1].images[0].get_clim() == (0.0, 1.0)


def test_perturbation_figure_is_centred_at_zero() -> None:
    delta = torch.tensor([[[0.2, -0.5], [0.0, 0.1]]])
    figure = perturbation_figure(delta, "upi_grad · L2 ε = 1")
    (shown,) = colorbar_images(figure)
    assert shown.get_clim() == pytest.approx((-0.5, 0.5)) and shown.get_cmap().name == "RdBu_r"
    assert figure.axes[0].get_title() == "upi_grad · L2 ε = 1"
    image = figure_image(figure)
    width, height = figure.get_size_inches() * SCREEN_DPI
    assert image.shape == (3, round(height), round(width)) and image.min() >= 0 and image.max() <= 1


def test_chart_grid_overlays_the_series_with_bands_fixed_colours_and_an_outside_legend(tmp_path: Path) -> None:
    charts = {
        "relative L2": {
            "upi_grad": Curve([1.0, 0.5, 2.0], [0.4, 0.3, 0.6]),  # drawn sorted by x
            "random": Curve([0.5, 1.0, 2.0], [0.2, 0.25, 0.3], [0.01, 0.02, 0.03]),
            "mine": Curve([0.5, 1.0, 2.0], [0.1, math.nan, 0.2]),  # NaN points left out
        },
        "top-k": {"upi_grad": Curve([0.5, 1.0], [0.9, 0.8])},
    }
    ticks = {0.5: "0.5", 1.0: "1", 2.0: "2"}
    figure = chart_grid(charts, "sweep", "ε", columns=3, x_ticks=ticks, band_label="mean ± std over 5 draws")
    assert figure.get_suptitle() == "sweep"
    first, second = grid_axes(figure, 1, 2)[0]  # 2 charts: 2 columns, not 3
    assert (first.get_title(), second.get_title()) == ("relative L2", "top-k")
    lines = {line.get_color(): line for line in first.get_lines()}
    assert len(first.get_lines()) == 3 == len(lines)  # one line each, three colours
    upi = lines[METHOD_STYLES["upi_grad"][0]]
    assert list(upi.get_xdata()) == [0.5, 1.0, 2.0] and list(upi.get_ydata()) == [0.3, 0.4, 0.6]
    mine = next(line for color, line in lines.items() if color not in (c for c, _ in METHOD_STYLES.values()))
    assert list(mine.get_xdata()) == [0.5, 2.0] and mine.get_color() in OKABE_ITO
    (band,) = first.collections  # random's band only
    vertices = band.get_paths()[0].vertices
    assert vertices[:, 1].min() == pytest.approx(0.19) and vertices[:, 1].max() == pytest.approx(0.33)
    assert [label.get_text() for label in first.get_xticklabels()] == ["0.5", "1", "2"]
    assert first.get_xlabel() == "ε"
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["upi_grad", "random (mean ± std over 5 draws)", "mine"]
    figure.canvas.draw()  # the legend lies below every chart, outside the data
    assert legend.get_window_extent().y1 <= min(ax.get_window_extent().y0 for ax in (first, second))
    assert save_figure(figure, tmp_path / "sweep_gradient_l2")[0].stat().st_size > 20_000
    with pytest.raises(ValueError, match="at least one chart"):
        chart_grid({}, "empty", "x")


def test_red_and_green_are_never_paired() -> None:
    colours = {color for color, _ in METHOD_STYLES.values()}
    assert len(colours) == len(METHOD_STYLES) and colours <= set(OKABE_ITO)
    assert "#D55E00" not in colours  # vermillion (the palette's red) is not a method colour beside the green


def test_ratio_heat_map_is_white_at_one_and_symmetric_in_log_ratio(tmp_path: Path) -> None:
    ratios = torch.tensor([[1.2, 1.16], [0.5, 2.0]])
    texts = [["0.504\n1.20×", "0.123\n1.16×"], ["0.386\n0.50×", "0.282\n2.00×"]]
    title = "upi_grad · gradient maps · L2 ε = 1"
    figure = ratio_heat_map(ratios, ["small_cnn", "mlp"], ["small_cnn", "mlp"], title, "ratio", texts)
    ax = figure.axes[0]
    shown = ax.images[0]
    norm = shown.norm
    assert float(norm(1.0)) == pytest.approx(0.5) and shown.get_cmap().name == "RdBu_r"
    assert float(norm(2.0)) == pytest.approx(1.0) and float(norm(0.5)) == pytest.approx(0.0)
    assert float(norm(1.2)) - 0.5 == pytest.approx(0.5 - float(norm(1 / 1.2)))
    assert [text.get_text() for text in ax.texts] == [cell for row in texts for cell in row]
    assert {text.get_color() for text in ax.texts} == {"black", "white"}  # dark cells get white text
    assert [label.get_text() for label in ax.get_yticklabels()] == ["small_cnn", "mlp"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("evaluated on", "fitted on", title)
    assert colorbar_images(figure) == [shown]
    png = save_figure(figure, tmp_path / "transfer_upi_grad_l2_eps1")[0]
    with Image.open(png) as image:
        assert image.size[0] >= 1000 and image.size[1] >= 600  # readable: not a 282 x 236 thumbnail
    with pytest.raises(ValueError, match="labels"):
        ratio_heat_map(ratios, ["a"], ["b", "c"], "t", "r")
    with pytest.raises(ValueError, match="positive"):
        ratio_heat_map(torch.tensor([[0.0]]), ["a"], ["b"], "t", "r")


def test_dashboard_figure_puts_images_under_the_charts() -> None:
    solid = np.full((8, 8, 3), (17, 201, 99), dtype=np.uint8)
    figure = dashboard_figure({"loss": {"run": Curve([0, 1], [1.0, 0.5])}}, {"solid": solid}, "tb", "step")
    titled = {ax.get_title(): ax for ax in figure.axes}
    assert set(titled) == {"loss", "solid"}
    np.testing.assert_array_equal(titled["solid"].images[0].get_array(), solid)
    figure.canvas.draw()
    assert titled["solid"].get_window_extent().y1 < titled["loss"].get_window_extent().y0
    images_only = dashboard_figure({}, {"solid": solid}, "tb", "step")
    assert [ax.get_title() for ax in images_only.axes] == ["solid"]
    wide = np.zeros((300, 3000, 3), dtype=np.uint8)  # 20 in at 150 dpi: shrunk to the charts' width, a row alone
    charts = {name: {"run": Curve([0, 1], [1.0, 0.5])} for name in "abc"}
    flowing = dashboard_figure(charts, {"one": solid, "two": solid, "wide": wide, "three": solid}, "tb", "step")
    flowing.canvas.draw()
    boxes = {ax.get_title(): ax.get_window_extent() for ax in flowing.axes if ax.images}
    assert boxes["one"].y0 == boxes["two"].y0 and boxes["two"].x0 > boxes["one"].x1  # side by side
    assert boxes["wide"].y1 < boxes["one"].y0 and boxes["three"].y1 < boxes["wide"].y0  # rows of their own
    assert boxes["wide"].width <= flowing.bbox.width
    with pytest.raises(ValueError, match="at least one chart or image"):
        dashboard_figure({}, {}, "tb", "step")


def test_figures_are_built_without_pyplot() -> None:
    figure = chart_grid({"a": {"b": Curve([0], [1])}}, "t", "x")
    assert isinstance(figure, Figure) and type(figure.canvas).__name__ == "FigureCanvasBase"


def test_comparison_figure_draws_a_bar_per_model_in_each_method_group_and_random_errors() -> None:
    bars = [
        Bar(panel, method, model, value, 0.1 if method == "random" else None)
        for panel in ("cosine", "spearman", "kendall")
        for method, value in (("upi_grad", 0.5), ("random", 0.8))
        for model in ("a", "b")
    ]
    figure = comparison_figure(bars, columns=2)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["cosine", "spearman", "kendall"]
    for ax in visible:
        heights = sorted(patch.get_height() for patch in ax.patches)
        assert heights == [0.5, 0.5, 0.8, 0.8]
        assert [tick.get_text() for tick in ax.get_xticklabels()] == ["upi_grad", "random"]
        assert sum(isinstance(container, ErrorbarContainer) for container in ax.containers) == 2  # random's
    colors = {tuple(patch.get_facecolor()) for patch in visible[0].patches}
    assert len(colors) == 2  # one colour per model


def test_every_one_of_many_compared_models_keeps_its_own_look() -> None:
    models = [f"model{i}" for i in range(13)]
    looks = series_looks(models)
    assert len(set(looks.values())) == 13  # past the 8 colours, hatches tell them apart
    figure = comparison_figure([Bar("cosine", "random", model, 0.5) for model in models], columns=1)
    assert len({(tuple(p.get_facecolor()), p.get_hatch()) for p in figure.axes[0].patches}) == 13

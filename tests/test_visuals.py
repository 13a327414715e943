"""The sweeps and TensorBoard scalars of an attack run, from result rows (no attack needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from tests.helpers import custom_scalar_layout, grid_axes, scalar_points
from upi_lightning.attacks.report import TABLE_METRICS
from upi_lightning.attacks.visuals import METRIC_TITLES, log_metrics, sweep_figure, write_sweeps
from upi_lightning.plots import figure_image
from upi_lightning.plots.output import FILE_DPI
from upi_lightning.tensorboard_layout import DASHBOARD_METRICS

BOOKKEEPING = {"n_samples": 40.0, "n_seen": 50.0, "clean_accuracy": 0.8, "delta_l2": 1.0, "delta_linf": 0.1}


def row(method: str, norm: str, eps: float, value: float) -> dict:
    metrics = {name: value for name in DASHBOARD_METRICS} | BOOKKEEPING
    if method == "random":
        metrics |= {f"{name}_std": 0.01 for name in metrics} | {"n_draws": 3.0}
    return {"method": method, "norm": norm, "eps": eps, "metrics": metrics, "fit_seconds": 1.0}


RESULTS = [
    row(method, norm, eps, value * (1 + index))
    for norm, epsilons in (("linf", (8 / 255, 0.031)), ("l2", (1.0, 0.5, 2.0)))
    for index, eps in enumerate(epsilons)
    for method, value in (("upi_grad", 0.3), ("random", 0.2))
]


def test_scalars_sit_at_the_eps_index_and_only_the_metrics_reach_tensorboard(tmp_path: Path) -> None:
    with SummaryWriter(str(tmp_path)) as writer:
        log_metrics(writer, RESULTS)
    points = scalar_points(tmp_path)
    assert set(points) == {
        f"{norm}/{metric}/{method}"
        for norm in ("linf", "l2")
        for metric in DASHBOARD_METRICS
        for method in ("upi_grad", "random")
    }  # no count, spread, norm or clean accuracy
    # 0.031 and 8/255 (0.0314) round to the same thousandth: they keep steps of their own, in increasing eps
    assert points["linf/relative_l2/upi_grad"] == [1, 0] and points["l2/relative_l2/random"] == [1, 0, 2]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    by_step = {event.step: event.value for event in events.Scalars("l2/relative_l2/upi_grad")}
    assert by_step == pytest.approx({0: 0.6, 1: 0.3, 2: 0.9})  # eps 0.5, 1, 2
    layout = custom_scalar_layout(tmp_path)
    assert list(layout) == [
        "LINF: step 0 = ε 0.031, step 1 = ε 8/255",
        "L2: step 0 = ε 0.5, step 1 = ε 1, step 2 = ε 2",
    ]
    charts = layout["L2: step 0 = ε 0.5, step 1 = ε 1, step 2 = ε 2"]
    assert list(charts) == list(DASHBOARD_METRICS)
    assert charts["relative_l2"] == ["l2/relative_l2/upi_grad", "l2/relative_l2/random"]


def test_sweep_figure_draws_every_table_metric_with_random_as_a_band() -> None:
    rows = [r for r in RESULTS if r["norm"] == "l2"]
    figure = sweep_figure(rows, "small_cnn · gradient maps · L2")
    axes = grid_axes(figure, 2, 3)
    assert [ax.get_title() for ax in axes.flatten()] == [METRIC_TITLES[metric] for metric in TABLE_METRICS]
    for ax in axes.flatten():
        assert len(ax.get_lines()) == 2 and len(ax.collections) == 1  # upi_grad, random and random's band
        assert [label.get_text() for label in ax.get_xticklabels()] == ["0.5", "1", "2"]
        assert ax.get_xlabel() == "ε (L2 radius, pixels)"
    band = axes[0][0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.2 - 0.01) and band.max() == pytest.approx(0.6 + 0.01)  # eps 1 and 2
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["upi_grad", "random (mean ± std over 3 draws)"]


def test_write_sweeps_names_the_files_after_the_saliency_method_and_norm(tmp_path: Path) -> None:
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        write_sweeps(writer, tmp_path, RESULTS, "small_cnn", "gradient")
        write_sweeps(writer, tmp_path / "one", [r for r in RESULTS if r["eps"] == 1.0], "small_cnn", "gradient")
    assert not (tmp_path / "one").exists()  # one eps: no sweep
    files = sorted(path.name for path in tmp_path.glob("sweep_*"))
    assert files == [
        "sweep_gradient_l2.pdf",
        "sweep_gradient_l2.png",
        "sweep_gradient_linf.pdf",
        "sweep_gradient_linf.png",
    ]
    with Image.open(tmp_path / "sweep_gradient_l2.png") as image:  # 3 x 2 charts of 3.4 x 2.5 in, legend and title
        assert image.size == (round(3 * 3.4 * FILE_DPI), round((2 * 2.5 + 0.9) * FILE_DPI))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["sweep/l2", "sweep/linf"]
    title = "small_cnn · gradient maps · L2 · mean over 40 held-out images"  # names model, saliency, norm
    rows = [r for r in RESULTS if r["norm"] == "l2"]
    with Image.open(tmp_path / "sweep_gradient_l2.png") as image:  # the file is that figure
        drawn = figure_image(sweep_figure(rows, title), FILE_DPI).permute(1, 2, 0).mul(255).round().byte().numpy()
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), drawn)

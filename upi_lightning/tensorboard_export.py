"""Export TensorBoard scalars and images to one PNG, for places without a browser (reports, READMEs, CI logs).

``python -m upi_lightning.tensorboard_export runs/mnist/version_0 tensorboard.png --scalars train/loss_step val/acc``

Layout of the PNG (top to bottom):

* the scalar charts, one :func:`~upi_lightning.charts.line_chart` of :data:`CHART_SIZE` pixels per tag
  (x = step, y = value, title = tag, one series per run folder, named after it), in a grid of
  ``min(columns, number of tags)`` columns and ``ceil(number of tags / columns)`` rows, with no gap
  between the tiles (each chart has its own white margins; a tag without any finite value is left out);
* the images, the last one logged under each image tag (and run), each upscaled (nearest neighbour) by the
  smallest integer factor that makes its shorter side at least :data:`MIN_IMAGE_SIDE` pixels, with its tag
  written in a :data:`LABEL_HEIGHT` pixel strip above it. They flow left to right, :data:`GAP` pixels apart,
  and wrap to a new row when the next one would pass the right edge.

The PNG is as wide as the chart grid, or as the widest image when that is wider; it is as tall as the
chart grid plus the image rows, each row ``GAP`` plus its label strip plus its tallest image, plus a final
``GAP`` below the last row (no image: no image rows and no final gap).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tensorboard.backend.event_processing import event_accumulator

from upi_lightning.charts import CHAR_WIDTH, line_chart
from upi_lightning.errors import UPIError
from upi_lightning.figures import save_png

CHART_SIZE = (480, 320)
"""Width and height of each scalar chart, pixels."""
MIN_IMAGE_SIDE = 112
"""Images are upscaled by an integer factor until their shorter side is at least this many pixels."""
LABEL_HEIGHT = 16
"""Height of the strip above each image that holds its tag."""
GAP = 8
"""Pixels between two images of a row, and below each image row."""
EVENT_GLOB = "events.out.tfevents.*"
SIZE_GUIDANCE = {
    event_accumulator.SCALARS: 0,  # 0: keep every event
    event_accumulator.IMAGES: 0,
    event_accumulator.COMPRESSED_HISTOGRAMS: 1,
    event_accumulator.HISTOGRAMS: 1,
    event_accumulator.AUDIO: 1,
    event_accumulator.TENSORS: 1,
}


@dataclass(frozen=True)
class Run:
    """The scalars and last images of one folder of event files."""

    name: str
    scalars: dict[str, list[tuple[float, float]]]
    images: dict[str, Image.Image]


def find_runs(logdir: Path) -> list[Path]:
    """The folders under ``logdir`` (itself included) that hold event files, sorted."""
    return sorted({path.parent for path in logdir.rglob(EVENT_GLOB) if path.is_file()})


def load_run(folder: Path, name: str) -> Run:
    """Read every scalar and the last image of each image tag from the event files of ``folder``."""
    accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance=SIZE_GUIDANCE)
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {
        tag: [(float(event.step), float(event.value)) for event in accumulator.Scalars(tag)]
        for tag in tags.get(event_accumulator.SCALARS, [])
    }
    images = {}
    for tag in tags.get(event_accumulator.IMAGES, []):
        events = accumulator.Images(tag)
        if events:
            last = max(enumerate(events), key=lambda item: (item[1].wall_time, item[0]))[1]
            images[tag] = Image.open(io.BytesIO(last.encoded_image_string)).convert("RGB")
    return Run(name, scalars, images)


def _select(kind: str, requested: Sequence[str] | None, available: list[str], logdir: Path) -> list[str]:
    """The tags to draw: all ``available`` (sorted) by default, else ``requested`` in order, all of them known."""
    if requested is None:
        return available
    unknown = [tag for tag in requested if tag not in available]
    if unknown:
        known = ", ".join(available) if available else "none"
        raise UPIError(f"Unknown {kind} tag(s) {', '.join(unknown)} in {logdir}; available {kind} tags: {known}.")
    return list(dict.fromkeys(requested))


def _to_image(chart: torch.Tensor) -> Image.Image:
    array = (chart.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _upscale(image: Image.Image) -> Image.Image:
    factor = max(1, math.ceil(MIN_IMAGE_SIDE / min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def export_tensorboard(
    logdir: str | Path,
    path: str | Path,
    scalar_tags: Sequence[str] | None = None,
    image_tags: Sequence[str] | None = None,
    columns: int = 3,
) -> Path:
    """Draw the scalars and the last images of the TensorBoard logs under ``logdir`` into one PNG.

    Every folder under ``logdir`` (searched recursively, ``logdir`` included) that holds event files is a
    run; with several runs each chart has one curve per run that logged its tag, and each image is shown per
    run, labelled ``tag (run)``. The layout is described in the module docstring.

    Args:
        logdir: a run folder (``runs/<name>/version_N``) or a folder of runs.
        path: the PNG file to write (atomically; its folder is created).
        scalar_tags: scalar tags to chart, in this order; ``None``: every scalar tag, sorted; ``[]``: none.
        image_tags: image tags to show, in this order; ``None``: every image tag, sorted; ``[]``: none.
        columns: charts per row of the grid.

    Returns:
        The path of the PNG.

    Raises:
        UPIError: if ``logdir`` holds no event file, a tag given is not in the logs (the message lists the
            available ones), there is nothing to draw, or ``columns < 1``.
    """
    logdir = Path(logdir)
    if columns < 1:
        raise UPIError(f"columns must be at least 1, got {columns}.")
    folders = find_runs(logdir) if logdir.is_dir() else []
    if not folders:
        raise UPIError(
            f"No TensorBoard event file ({EVENT_GLOB}) under {logdir}: train first, e.g. "
            "`python train.py fit --config configs/mnist.yaml`, and pass its runs/<name>/version_N folder."
        )
    runs = [
        load_run(folder, logdir.name if folder == logdir else folder.relative_to(logdir).as_posix())
        for folder in folders
    ]
    scalars = _select("scalar", scalar_tags, sorted({tag for run in runs for tag in run.scalars}), logdir)
    images = _select("image", image_tags, sorted({tag for run in runs for tag in run.images}), logdir)
    charts = []
    for tag in scalars:
        series = {run.name: run.scalars[tag] for run in runs if run.scalars.get(tag)}
        if any(math.isfinite(value) for points in series.values() for _, value in points):
            charts.append(_to_image(line_chart(series, title=tag, x_label="step", size=CHART_SIZE)))
    several = len(runs) > 1
    tiles = [
        (f"{tag} ({run.name})" if several else tag, _upscale(run.images[tag]))
        for tag in images
        for run in runs
        if tag in run.images
    ]
    if not charts and not tiles:
        raise UPIError(
            f"Nothing to export from {logdir}: no finite scalar or image under the tags chosen. Run "
            f"`python -m upi_lightning.tensorboard_export {logdir} OUT.png` without --scalars/--images to draw "
            "every tag, or let the run log its first metrics (after its first validation) and run it again."
        )
    grid_columns = min(columns, len(charts))
    grid_rows = math.ceil(len(charts) / columns)
    chart_width, chart_height = CHART_SIZE
    labelled = [(label, image, max(image.width, CHAR_WIDTH * len(label) + 4)) for label, image in tiles]
    width = max([grid_columns * chart_width, *(tile_width for *_, tile_width in labelled)])
    placed: list[tuple[str, Image.Image, int, int]] = []  # label, image, left, top (below the grid)
    left, top, row_height = 0, GAP, 0
    for label, image, tile_width in labelled:
        if left > 0 and left + tile_width > width:
            left, top, row_height = 0, top + row_height + GAP, 0
        placed.append((label, image, left, top))
        left += tile_width + GAP
        row_height = max(row_height, LABEL_HEIGHT + image.height)
    images_height = top + row_height + GAP if placed else 0
    canvas = Image.new("RGB", (width, grid_rows * chart_height + images_height), "white")
    for index, chart in enumerate(charts):
        canvas.paste(chart, ((index % columns) * chart_width, (index // columns) * chart_height))
    draw = ImageDraw.Draw(canvas)
    below = grid_rows * chart_height
    for label, image, left, top in placed:
        draw.text((left + 2, below + top + 2), label, fill="black")
        canvas.paste(image, (left, below + top + LABEL_HEIGHT))
    array = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255
    return save_png(array, path)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``python -m upi_lightning.tensorboard_export LOGDIR OUT.png [--scalars TAG ...] ...``.

    A :class:`~upi_lightning.errors.UPIError` is printed as one line (``error: ...``), exit status 2.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The path of the PNG written.
    """
    parser = argparse.ArgumentParser(
        prog="python -m upi_lightning.tensorboard_export",
        description="Export TensorBoard scalars (as line charts) and the last logged images to one PNG.",
    )
    parser.add_argument("logdir", type=Path, help="a run folder (runs/<name>/version_N) or a folder of runs")
    parser.add_argument("output", type=Path, help="the PNG file to write")
    parser.add_argument("--scalars", nargs="*", metavar="TAG", help="scalar tags to chart (default: all, sorted)")
    parser.add_argument("--images", nargs="*", metavar="TAG", help="image tags to show (default: all, sorted)")
    parser.add_argument("--columns", type=int, default=3, help="charts per row (default: 3)")
    args = parser.parse_args(argv)
    try:
        written = export_tensorboard(args.logdir, args.output, args.scalars, args.images, args.columns)
    except UPIError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Wrote {written} ({written.stat().st_size / 1024:.0f} KiB)")
    return written


if __name__ == "__main__":
    main()

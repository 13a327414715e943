"""Export TensorBoard scalars and images to one figure, for places without a browser (reports, READMEs, CI logs).

``python -m upi_lightning.tensorboard_export runs/mnist/version_0 tensorboard.png --scalars train/loss_step val/acc``

The figure (PNG, PDF or SVG, by the output's suffix) holds one chart per metric, in a grid of
``columns`` columns: scalar tags that differ only in an attack method's name (a path segment among
:data:`~upi_lightning.attacks.settings.ALL_METHODS`, e.g. ``upi/upi_grad/relative_l2`` and
``upi/random/relative_l2``) share the chart of the tag without it (``upi/relative_l2``), one curve per
method (named ``method · run`` where two runs under the log folder drew it); any other tag gets a chart
of its own, one curve per run. By default every tag is drawn except bookkeeping (:func:`bookkeeping`:
Lightning's ``epoch`` and ``hp_metric``, the attacks' counts, spreads, norms and clean accuracy, which
report.json holds); ``--scalars`` chooses tags. Below the charts come the last image logged under each
image tag, titled by its tag (and its run, with several runs), flowing left to right in rows.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from upi_lightning.attacks.settings import ALL_METHODS
from upi_lightning.errors import UPIError
from upi_lightning.plots import Curve, dashboard_figure, write_figure

EVENT_GLOB = "events.out.tfevents.*"
SIZE_GUIDANCE = {
    event_accumulator.SCALARS: 0,  # 0: keep every event
    event_accumulator.IMAGES: 0,
    event_accumulator.COMPRESSED_HISTOGRAMS: 1,
    event_accumulator.HISTOGRAMS: 1,
    event_accumulator.AUDIO: 1,
    event_accumulator.TENSORS: 1,
}
BOOKKEEPING = {"epoch", "hp_metric", "n_seen", "n_samples", "n_correct", "n_draws", "clean_accuracy"}
"""Last tag segments that are not drawn by default (also ``delta_*`` norms and ``*_std`` spreads)."""
EXPORT_DPI = 150


@dataclass(frozen=True)
class Run:
    """The scalars and last images of one folder of event files."""

    name: str
    scalars: dict[str, list[tuple[float, float]]]
    images: dict[str, np.ndarray]


def find_runs(logdir: Path) -> list[Path]:
    """The folders under ``logdir`` (itself included) that hold event files, sorted."""
    return sorted({path.parent for path in logdir.rglob(EVENT_GLOB) if path.is_file()})


def load_run(folder: Path, name: str) -> Run:
    """Read every scalar and the last image of each image tag (as ``(H, W, 3)`` uint8) from ``folder``."""
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
            with Image.open(io.BytesIO(last.encoded_image_string)) as image:
                images[tag] = np.asarray(image.convert("RGB")).copy()
    return Run(name, scalars, images)


def bookkeeping(tag: str) -> bool:
    """Whether ``tag`` is bookkeeping, not a metric: last segment in :data:`BOOKKEEPING`, ``delta_*`` or ``*_std``."""
    last = tag.rsplit("/", 1)[-1]
    return last in BOOKKEEPING or last.startswith("delta_") or last.endswith("_std")


def chart_of(tag: str) -> tuple[str, str | None]:
    """The chart of ``tag`` and its method there: ``upi/upi_grad/relative_l2`` -> ``(upi/relative_l2, upi_grad)``."""
    parts = tag.split("/")
    method = next((part for part in parts if part in ALL_METHODS), None)
    return ("/".join(part for part in parts if part != method), method) if method else (tag, None)


def curve_names(drawn: list[tuple[str | None, str, Curve]]) -> dict[str, Curve]:
    """One chart's curves ``(method, run, curve)`` by name: the method, with its run where two runs drew it.

    A tag without a method is named after its run.
    """
    methods = [method for method, _, _ in drawn]
    return {
        method if method and methods.count(method) == 1 else " · ".join(filter(None, (method, run))): curve
        for method, run, curve in drawn
    }


def _select(kind: str, requested: Sequence[str] | None, available: list[str], logdir: Path) -> list[str]:
    """The tags to draw: ``requested`` in order, all of them known, else every ``available`` one."""
    if requested is None:
        return available
    unknown = [tag for tag in requested if tag not in available]
    if unknown:
        known = ", ".join(available) if available else "none"
        raise UPIError(f"Unknown {kind} tag(s) {', '.join(unknown)} in {logdir}; available {kind} tags: {known}.")
    return list(dict.fromkeys(requested))


def tensorboard_figure(
    logdir: str | Path,
    scalar_tags: Sequence[str] | None = None,
    image_tags: Sequence[str] | None = None,
    columns: int = 3,
) -> Figure:
    """The figure of the logs under ``logdir`` (module docstring); arguments as :func:`export_tensorboard`."""
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
    available = sorted({tag for run in runs for tag in run.scalars})
    scalars = _select("scalar", scalar_tags, available, logdir)
    if scalar_tags is None:
        scalars = [tag for tag in scalars if not bookkeeping(tag)]
    image_names = _select("image", image_tags, sorted({tag for run in runs for tag in run.images}), logdir)
    several = len(runs) > 1
    series: dict[str, list[tuple[str | None, str, Curve]]] = {}  # chart: (method, run, curve)
    for tag in scalars:
        chart, method = chart_of(tag)
        for run in runs:
            points = [(step, value) for step, value in run.scalars.get(tag, []) if np.isfinite(value)]
            if points:
                series.setdefault(chart, []).append((method, run.name, Curve(*zip(*points, strict=True))))
    charts = {chart: curve_names(drawn) for chart, drawn in series.items()}
    images = {
        f"{tag}\n({run.name})" if several else tag: run.images[tag]
        for tag in image_names
        for run in runs
        if tag in run.images
    }
    if not charts and not images:
        raise UPIError(
            f"Nothing to export from {logdir}: no finite scalar or image under the tags chosen. Run "
            f"`python -m upi_lightning.tensorboard_export {logdir} OUT.png` without --scalars/--images to draw "
            "every tag, or let the run log its first metrics (after its first validation) and run it again."
        )
    return dashboard_figure(charts, images, f"TensorBoard: {logdir}", "step", columns, EXPORT_DPI)


def export_tensorboard(
    logdir: str | Path,
    path: str | Path,
    scalar_tags: Sequence[str] | None = None,
    image_tags: Sequence[str] | None = None,
    columns: int = 3,
) -> Path:
    """Draw the scalars and the last images of the TensorBoard logs under ``logdir`` into one file.

    Every folder under ``logdir`` (searched recursively, ``logdir`` included) that holds event files is a
    run. The layout is described in the module docstring.

    Args:
        logdir: a run folder (``runs/<name>/version_N``) or a folder of runs.
        path: the file to write (atomically; its folder is created), PNG, PDF or SVG by its suffix.
        scalar_tags: scalar tags to chart, in this order; ``None``: every tag but bookkeeping; ``[]``: none.
        image_tags: image tags to show, in this order; ``None``: every image tag, sorted; ``[]``: none.
        columns: charts per row of the grid.

    Returns:
        The path written.

    Raises:
        UPIError: if ``logdir`` holds no event file, a tag given is not in the logs (the message lists the
            available ones), there is nothing to draw, ``columns < 1`` or the suffix is not a known format.
    """
    path = Path(path)
    if path.suffix not in (".png", ".pdf", ".svg"):
        raise UPIError(f"the output must end in .png, .pdf or .svg, got {path.name}.")
    return write_figure(tensorboard_figure(logdir, scalar_tags, image_tags, columns), path, EXPORT_DPI)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``python -m upi_lightning.tensorboard_export LOGDIR OUT.png [--scalars TAG ...] ...``.

    A :class:`~upi_lightning.errors.UPIError` is printed as one line (``error: ...``), exit status 2.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The path of the file written.
    """
    parser = argparse.ArgumentParser(
        prog="python -m upi_lightning.tensorboard_export",
        description="Export TensorBoard scalars (one chart per metric, methods overlaid) and the last logged "
        "images to one PNG, PDF or SVG.",
    )
    parser.add_argument("logdir", type=Path, help="a run folder (runs/<name>/version_N) or a folder of runs")
    parser.add_argument("output", type=Path, help="the file to write (.png, .pdf or .svg)")
    parser.add_argument("--scalars", nargs="*", metavar="TAG", help="scalar tags (default: all but bookkeeping)")
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

"""The look shared by every figure: fonts, colour maps, the methods' colours, titles that name the budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any, TypeVar

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.typing import RcKeyType

SALIENCY_CMAP = "inferno"
"""Saliency maps: perceptually uniform, black where there is no saliency."""
SIGNED_CMAP = "RdBu_r"
"""Signed quantities (perturbations, centred at 0; ratios, centred at 1): blue below, white at, red above."""
OKABE_ITO = ("#0072B2", "#E69F00", "#000000", "#CC79A7", "#009E73", "#56B4E9", "#D55E00", "#F0E442")
"""Blue, orange, black, reddish purple, bluish green, sky blue, vermillion, yellow (Okabe & Ito, 2008):
told apart under the common colour-vision deficiencies."""
METHOD_STYLES = {
    "upi_grad": (OKABE_ITO[0], "o"),
    "upi_pca": (OKABE_ITO[1], "s"),
    "random": (OKABE_ITO[2], "D"),
    "per_sample": (OKABE_ITO[3], "^"),
    "uap": (OKABE_ITO[4], "v"),
}
"""Colour and marker of each attack method, the same in every figure."""
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
STYLE: dict[RcKeyType, Any] = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "figure.titlesize": 11,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "pdf.fonttype": 42,  # TrueType in PDFs: text stays text
}

FigureMaker = TypeVar("FigureMaker", bound=Callable[..., Figure])


def styled(make: FigureMaker) -> FigureMaker:
    """Build the figure under :data:`STYLE` (fonts and grids are fixed when the artists are made)."""

    @wraps(make)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(STYLE):
            return make(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def series_styles(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Colour and marker per series name: the method's own (:data:`METHOD_STYLES`), else the next free one."""
    taken = {color for color, _ in METHOD_STYLES.values()}
    free = [color for color in OKABE_ITO if color not in taken] + list(OKABE_ITO)
    return {
        name: METHOD_STYLES.get(name) or (free[index % len(free)], MARKERS[index % len(MARKERS)])
        for index, name in enumerate(dict.fromkeys(names))
    }


def bare(ax: Axes) -> None:
    """No ticks, grid or frame around an image (its labels and title stay)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.spines[:].set_visible(False)


def eps_label(eps: float) -> str:
    """``eps`` as people write it: ``1``, ``0.05``, or ``8/255`` (a multiple of 1/255 with no short decimal)."""
    short = f"{eps:.4g}"
    if float(short) == eps:
        return short
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 else short


def budget_label(norm: str, eps: float | None = None) -> str:
    """``L2 ε = 1`` (``L2`` without ``eps``)."""
    return norm.upper() if eps is None else f"{norm.upper()} ε = {eps_label(eps)}"


def budget_title(model: str, saliency: str, norm: str | None = None, eps: float | None = None) -> str:
    """A figure title such as ``small_cnn · gradient maps · L2 ε = 1`` (norm and eps when given)."""
    return " · ".join([model, f"{saliency} maps", *([] if norm is None else [budget_label(norm, eps)])])

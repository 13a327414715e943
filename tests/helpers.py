"""Models, data and helpers shared by several test modules.

Test modules import from here (and get fixtures from ``conftest.py`` by injection), never from one
another. Everything here is small and deterministic:

* ``QuadraticScore`` and ``TinyCNN``, the tiny models of the attack tests, with ``make_batches`` and the
  ``snapshot`` / ``assert_untouched`` pair that checks an attack leaves its model alone;
* ``ThreadAllReduce``, ``run_ranks`` and ``split_batches``, which simulate the ranks of a DDP fit with
  threads, and ``count_clean_maps``, which counts the clean-map computations of an objective;
* ``HostReads``, which records the reads of tensor values by the host (a GPU's synchronizations);
* ``SMOOTH_OBJECTIVE``, ``abs_cosine`` and ``gradient_matrix`` of the UPI-PCA tests;
* ``example_perturbation``, ``write_payload`` and ``Payload`` for perturbation and checkpoint files;
* ``numbers``, ``scalar_points`` and ``custom_scalar_layout`` for reports and TensorBoard logs;
* ``grid_axes`` and ``colorbar_images`` to inspect matplotlib figures.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.upi_pca import per_sample_gradient_rows
from upi_lightning.noise import make_generator
from upi_lightning.perturbation import FORMAT_NAME, FORMAT_VERSION, UniversalPerturbation
from upi_lightning.threat import L2Ball

REPO = Path(__file__).resolve().parents[1]
"""The repository root (the scripts ``train.py`` and ``attack.py`` and ``configs/`` lie there)."""

Batch = tuple[Tensor, Tensor]
"""Images ``(N, C, H, W)`` in ``[0, 1]`` and their labels ``(N,)``."""

ModelState = tuple[dict[str, Tensor], list[bool]]
"""What :func:`snapshot` records: a copy of the state dict and the training flag of every module."""


# ------------------------------------------------------------------ tiny models and data


class QuadraticScore(nn.Module):
    r"""Logits :math:`f_c(x) = w_c^\top x + \tfrac12 a_c (u^\top x)^2` with a unit vector ``u``.

    The input gradient is :math:`w_c + a_c (u^\top x) u`, so the saliency map depends on ``x`` only
    through :math:`u^\top x`: the best universal perturbation of the map is :math:`\pm\varepsilon u`.
    The dropout on the logits is a trap: outside eval mode the maps would be random.
    """

    def __init__(self, shape: tuple[int, int, int] = (1, 8, 8), classes: int = 3, seed: int = 0) -> None:
        """Draw ``w``, ``u`` and set ``a`` from a generator seeded with ``seed``.

        Args:
            shape: ``(C, H, W)`` of the images.
            classes: Number of logits.
            seed: Seed of the parameter draws.
        """
        super().__init__()
        gen = make_generator(seed)
        dim = math.prod(shape)
        self.w = nn.Parameter(0.3 * torch.randn(classes, dim, generator=gen))
        direction = torch.randn(dim, generator=gen)
        self.u = nn.Parameter(direction / direction.norm())
        self.a = nn.Parameter(torch.linspace(1.0, 3.0, classes))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, classes)`` of images ``x`` of shape ``(N, *shape)``."""
        flat = x.flatten(1)
        return self.drop(flat @ self.w.T + 0.5 * (flat @ self.u)[:, None] ** 2 * self.a)


class TinyCNN(nn.Module):
    """Conv-BatchNorm-ReLU-linear net with non-trivial BatchNorm statistics (eval mode matters)."""

    def __init__(self, shape: tuple[int, int, int] = (1, 6, 6), classes: int = 3, seed: int = 0) -> None:
        """Initialize with ``torch.manual_seed(seed)``, run three random batches in train mode, then switch to eval.

        Args:
            shape: ``(C, H, W)`` of the images.
            classes: Number of logits.
            seed: Seed of the global generator, set before the layers are built.
        """
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(shape[0], 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * shape[1] * shape[2], classes)
        with torch.no_grad():
            for _ in range(3):
                self(torch.rand(16, *shape))
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, classes)`` of images ``x`` of shape ``(N, *shape)``."""
        return self.fc(self.act(self.norm(self.conv(x))).flatten(1))


def make_batches(
    n_batches: int,
    batch_size: int,
    shape: tuple[int, int, int] = (1, 8, 8),
    seed: int = 0,
    classes: int = 3,
    low: float = 0.3,
    high: float = 0.7,
) -> list[Batch]:
    """Uniform images in ``[low, high]`` (no clipping for small perturbations) with random labels.

    Args:
        n_batches: Number of batches.
        batch_size: Samples per batch.
        shape: ``(C, H, W)`` of the images.
        seed: Seed of the generator of images and labels.
        classes: Labels are drawn from ``range(classes)``.
        low: Smallest pixel value.
        high: Largest pixel value.

    Returns:
        ``n_batches`` pairs of images ``(batch_size, *shape)`` and labels ``(batch_size,)``.
    """
    gen = make_generator(seed)
    return [
        (
            low + (high - low) * torch.rand(batch_size, *shape, generator=gen),
            torch.randint(0, classes, (batch_size,), generator=gen),
        )
        for _ in range(n_batches)
    ]


def snapshot(model: nn.Module) -> ModelState:
    """Record what an attack must leave alone, for :func:`assert_untouched`.

    Args:
        model: The model an attack will run on.

    Returns:
        A copy of its state dict and the ``training`` flag of each of its modules.
    """
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def assert_untouched(model: nn.Module, before: ModelState) -> None:
    """Assert that ``model`` has the state and modes of ``before`` and no parameter holds a gradient.

    Args:
        model: The model after the attack.
        before: Its :func:`snapshot` from before the attack.
    """
    state, modes = before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ simulated DDP ranks


class ThreadAllReduce:
    """A sum all-reduce between threads: what a DDP ``reduce`` hook does between ranks."""

    def __init__(self, world_size: int) -> None:
        """Set up the barrier and one slot per rank.

        Args:
            world_size: Number of threads (simulated ranks) taking part in every reduction.
        """
        self.barrier = threading.Barrier(world_size)
        self.slots: list[Tensor | None] = [None] * world_size
        self.calls = [0] * world_size

    def hook(self, rank: int) -> Callable[[Tensor], Tensor]:
        """The ``reduce`` hook of ``rank``: it returns the sum of the tensors all ranks pass in.

        Args:
            rank: The rank (thread) that will call the hook.

        Returns:
            A function that blocks until every rank has called its hook, then returns the sum, summed in
            rank order on every rank (identical bits).
        """

        def reduce(tensor: Tensor) -> Tensor:
            self.calls[rank] += 1
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0])  # same order on every rank: identical bits
            self.barrier.wait()
            return total

        return reduce


def run_ranks(fit: Callable[[int, Callable[[Tensor], Tensor]], object], world_size: int = 2) -> list[object]:
    """Run ``fit(rank, reduce)`` in one thread per simulated rank; return the results in rank order.

    Args:
        fit: Called once per rank with the rank and its :meth:`ThreadAllReduce.hook`.
        world_size: Number of simulated ranks.

    Returns:
        What ``fit`` returned on each rank, in rank order.

    Raises:
        BaseException: The first error a rank raised (the other ranks are released from the barrier).
    """
    allreduce = ThreadAllReduce(world_size)
    results: list[object] = [None] * world_size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fit(rank, allreduce.hook(rank))
        except BaseException as err:
            errors.append(err)
            allreduce.barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def split_batches(batches: list[Batch], world_size: int = 2) -> list[list[Batch]]:
    """The shard of every rank: each batch cut into ``world_size`` equal parts.

    Args:
        batches: The batches of a single process; their sizes must be multiples of ``world_size``.
        world_size: Number of ranks.

    Returns:
        For each rank, its part of every batch.
    """
    return [[(x.chunk(world_size)[r], y.chunk(world_size)[r]) for x, y in batches] for r in range(world_size)]


def count_clean_maps(objective: UPIObjective, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the batch size of every map computation of clean images (no ``clean`` reference) of ``objective``.

    Args:
        objective: The objective whose ``saliency.maps`` is wrapped (undone by ``monkeypatch``).
        monkeypatch: The test's monkeypatch fixture.

    Returns:
        The list the wrapper appends to; clear it between fits.
    """
    sizes: list[int] = []
    original = objective.saliency.maps

    def counted(model: torch.nn.Module, x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        if kwargs.get("clean") is None:
            sizes.append(len(x))
        return original(model, x, y, **kwargs)

    monkeypatch.setattr(objective.saliency, "maps", counted)
    return sizes


class HostReads(TorchFunctionMode):
    """Record, in order, the reads of tensor values by Python (:data:`READS`): on a GPU each one waits for it.

    ``events`` holds the name of each read (``item``, ``tolist``, ``__bool__``, ...) and ``"forward"``
    for each call of a module given to :meth:`watch`, so a test can say how many reads a function makes
    and whether they come before the model runs. Use as a context manager. Not seen: copies made with
    ``.to(device)`` and blocking copies from the host, which look alike on a CPU.
    """

    READS = frozenset(
        {"__bool__", "__int__", "__float__", "__index__", "__format__", "item", "tolist", "numpy", "cpu"}
        | {"nonzero", "is_nonzero", "equal", "allclose"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def watch(self, module: nn.Module) -> HostReads:
        """Log ``"forward"`` each time ``module`` runs (a forward pre-hook; it stays registered)."""
        module.register_forward_pre_hook(lambda *_: self.events.append("forward"))
        return self

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", None) in self.READS:
            self.events.append(func.__name__)
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------ UPI-PCA


SMOOTH_OBJECTIVE = UPIObjective(k=5, sigma=0.05, surrogate_beta=5.0)
"""The smoothed (``sigma > 0``) surrogate objective of the UPI-PCA tests, shared so its surrogate cache is too."""


def abs_cosine(a: Tensor, b: Tensor) -> float:
    """``|cos(a, b)|`` of the flattened tensors, in float64 (an eigenvector's sign is arbitrary).

    Args:
        a: Any tensor.
        b: A tensor with as many elements as ``a``.

    Returns:
        The absolute cosine similarity.
    """
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).abs().item()


def gradient_matrix(model: torch.nn.Module, batches: list[Batch], objective: UPIObjective) -> Tensor:
    """``G`` stacked by the test, with the noise a fit pass uses (the generator seeded afresh for every batch).

    Args:
        model: The attacked model.
        batches: The fit data.
        objective: The objective whose per-sample gradients at ``delta = 0`` are the rows.

    Returns:
        The ``(N, C * H * W)`` matrix of per-sample gradient rows of all batches.
    """
    return torch.cat([per_sample_gradient_rows(model, x, y, objective, make_generator(0)) for x, y in batches])


# ------------------------------------------------------------------ perturbation and checkpoint files


def example_perturbation() -> UniversalPerturbation:
    """A ``(1, 5, 5)`` L2 perturbation on the sphere of radius 1.5, with nested metadata.

    Returns:
        The same perturbation at every call (a fixed seed).
    """
    delta = L2Ball(1.5).random_on_sphere((1, 5, 5), make_generator(7))
    return UniversalPerturbation(delta, "l2", 1.5, {"method": "upi_grad", "settings": {"epochs": 2, "lr": [0.1]}})


def write_payload(path: Path, **changes: object) -> Path:
    """Write a perturbation file by hand: a valid zero ``(1, 5, 5)`` Linf one, with ``changes`` applied.

    Args:
        path: Where to save.
        **changes: Entries of the saved dictionary to replace or add (``delta``, ``format_version``, ...).

    Returns:
        ``path``.
    """
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "delta": torch.zeros(1, 5, 5),
        "norm": "linf",
        "eps": 0.1,
        "metadata": {},
    }
    payload.update(changes)
    torch.save(payload, path)
    return path


class Payload:
    """A malicious pickle: unpickled unsafely, it writes ``'pwned'`` to ``marker`` and prints ``pwned``."""

    def __init__(self, marker: Path) -> None:
        """Remember the file the payload writes when it runs.

        Args:
            marker: The file whose existence shows the payload ran.
        """
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned'); print('pwned')",))


def numbers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Report rows without their timings (the only values two runs of the same settings may differ in)."""
    return [{key: value for key, value in row.items() if not key.endswith("seconds")} for row in rows]


def scalar_points(folder: Path) -> dict[str, list[int]]:
    """Steps logged under every scalar tag of a TensorBoard folder (all its event files)."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [event.step for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def custom_scalar_layout(folder: Path) -> dict[str, dict[str, list[str]]]:
    """The custom-scalars layout of a TensorBoard folder: ``{category: {chart title: [tags]}}`` (``{}``: none)."""
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    if "custom_scalars__config__" not in events.Tags()["tensors"]:
        return {}
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return {
        category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
        for category in layout.category
    }


def grid_axes(figure: Figure, rows: int, columns: int) -> Any:
    """The first ``rows x columns`` axes of ``figure`` (its subplots, before any colour bar), as a 2-D array."""
    return np.array(figure.axes[: rows * columns], dtype=object).reshape(rows, columns)


def colorbar_images(figure: Figure) -> list[AxesImage]:
    """The images of ``figure`` that have a colour bar."""
    return [image for ax in figure.axes for image in ax.images if image.colorbar is not None]

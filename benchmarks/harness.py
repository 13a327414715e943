"""Pieces shared by the benchmark scripts: the models measured, timing, and the machine line."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upi_lightning.models import build_classifier

MODELS = {
    "small_cnn": ((1, 28, 28), (0.1307,), (0.3081,)),
    "cifar_resnet18": ((3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
"""``name -> (input shape, mean, std)``: the MNIST small CNN and the CIFAR ResNet-18."""
Key = TypeVar("Key", bound=Hashable)


def benchmark_model(name: str, device: torch.device, side: int | None = None) -> tuple[nn.Module, tuple[int, int, int]]:
    """An untrained 10-class classifier ``name`` of :data:`MODELS` on ``device`` and its input shape.

    ``side`` replaces the height and width of the model's images (``None``: its own).
    """
    shape, mean, std = MODELS[name]
    if side is not None:
        shape = (shape[0], side, side)
    return build_classifier(name, 10, shape, mean, std).to(device), shape


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one ``fn()`` call (CUDA work synchronized on both sides)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def train_step_fn(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], float]:
    """Seconds of one plain training step (train mode, CE, backward, SGD step) on ``model``."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return lambda: timed(step, x.device)


def median_seconds(fn: Callable[[], Tensor], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def interleaved_seconds(fns: dict[Key, Callable[[], float]], repeats: int, warmup: int) -> dict[Key, list[float]]:
    """The seconds every ``fns[key]()`` returns, run in turn (round-robin) ``repeats`` times after ``warmup`` rounds.

    Interleaving makes a slowdown of a shared machine hit every candidate alike, so ratios stay fair.
    """
    times: dict[Key, list[float]] = {key: [] for key in fns}
    for round_index in range(warmup + repeats):
        for key, fn in fns.items():
            seconds = fn()
            if round_index >= warmup:
                times[key].append(seconds)
    return times


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """``--norm`` and ``--eps``; :func:`with_default_eps` fills the eps (1.0 for L2, 8/255 for Linf)."""
    parser.add_argument("--norm", choices=("l2", "linf"), default="l2")
    parser.add_argument("--eps", type=float, default=None, help="radius (default: 1.0 for l2, 8/255 for linf)")


def with_default_eps(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``eps`` set to its norm's default when ``--eps`` was not given."""
    if args.eps is None:
        args.eps = 1.0 if args.norm == "l2" else 8 / 255
    return args


def add_run_arguments(parser: argparse.ArgumentParser, threads: int = 2) -> None:
    """``--device``, ``--threads`` (default ``threads``; 0 = torch's default) and ``--json``: every script's."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=threads, help="torch.set_num_threads; 0 = torch's default")
    parser.add_argument("--json", help="also write the rows to this JSON file")


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)``; 0 keeps torch's default."""
    if threads:
        torch.set_num_threads(threads)


def machine_line(device: torch.device) -> str:
    """``device=..., threads=..., torch ..., load average ... on N CPUs`` for a table's header."""
    return (
        f"device={device}, threads={torch.get_num_threads()}, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )


def write_json(path: str | None, payload: dict[str, object]) -> None:
    """Write ``payload`` as JSON to ``path`` (the ``--json`` option of a script); ``None`` writes nothing."""
    if path is not None:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")

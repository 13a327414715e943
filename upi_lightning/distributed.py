"""Several processes: where this one stands, its share of every batch, the sums across them, a clean exit.

Multi-process code here never calls a collective itself: callers pass ``reduce`` (an all-reduce-sum,
e.g. ``fabric.all_reduce`` or ``trainer.strategy.reduce``), which is :func:`identity` on one process.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from upi_lightning.errors import UPIError

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over the processes (every process gets the sum)."""
Batch = tuple[Tensor, Tensor]
"""Images and their labels."""


def identity(tensor: Tensor) -> Tensor:
    """Return ``tensor``: the single-process ``reduce`` hook."""
    return tensor


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, while Python is still alive (once).

    Lightning does this for NCCL only. A gloo process that exits with its process group alive can abort
    during interpreter finalization (``terminate called without an active exception``): gloo's worker
    threads still hold tensors whose release needs the GIL (pytorch/pytorch#179291). Call it from any
    process once the group exists; it does nothing without one.
    """
    if dist.is_available() and dist.is_initialized():
        atexit.unregister(_destroy_process_group)  # registered once, however often this is called
        atexit.register(_destroy_process_group)


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a multi-process attack (one process: the defaults).

    Attributes:
        rank: this process's global rank.
        world_size: number of processes.
        reduce: sums a tensor over the processes (``fabric.all_reduce(t, reduce_op="sum")``).
    """

    rank: int = 0
    world_size: int = 1
    reduce: Reduce = identity

    @property
    def is_main(self) -> bool:
        """Whether this process writes the files (rank 0)."""
        return self.rank == 0


class ShardedBatches:
    """This process's part of every global batch of ``loader``: rows ``rank, rank + W, ...`` (``W`` processes).

    Every process iterates the same global batches (same order, same seed), so the processes together
    see each global batch exactly once per pass, and a sum over processes of per-batch sums equals the
    single-process sum. A last global batch of fewer than ``W`` samples is skipped (it cannot give every
    process a sample).

    Raises:
        UPIError: if the loader's batch size is smaller than ``W``.
    """

    def __init__(self, loader: DataLoader, rank: int, world_size: int) -> None:
        batch_size = loader.batch_size or 1
        if batch_size < world_size:
            raise UPIError(
                f"batch_size={batch_size} is the global batch, split over {world_size} processes; "
                f"use batch_size >= {world_size}."
            )
        self.loader, self.rank, self.world_size = loader, rank, world_size
        samples = len(loader.dataset)  # type: ignore[arg-type]
        self.length = samples // batch_size + (samples % batch_size >= world_size)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            if len(x) >= self.world_size:
                yield x[self.rank :: self.world_size], y[self.rank :: self.world_size]


def shard_batches(
    dataset: Dataset[Any],
    num_batches: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> list[Batch]:
    """This process's part of the first ``num_batches`` global batches of a map-style ``(image, label)`` dataset.

    Global batch ``b`` holds samples ``b * batch_size`` to ``(b + 1) * batch_size - 1`` in order; process
    ``rank`` takes its :class:`~upi_lightning.distributed.ShardedBatches` part of each (every
    ``world_size``-th sample from ``rank`` on; a last batch of fewer than ``world_size`` samples is
    dropped), moved to ``device``.

    Raises:
        UPIError: if ``dataset`` is not a sized map-style dataset or holds fewer than ``world_size`` samples.
    """
    if not isinstance(dataset, Sized) or not hasattr(dataset, "__getitem__"):
        raise UPIError(f"the attack needs a map-style dataset with a length, got {type(dataset).__name__}.")
    head = Subset(dataset, range(min(len(dataset), num_batches * batch_size)))
    shards = ShardedBatches(DataLoader(head, batch_size=batch_size), rank, world_size)
    batches = [(x.to(device), y.to(device)) for x, y in shards]
    if not batches:
        raise UPIError(f"the attack data has {len(dataset)} samples, fewer than the {world_size} processes.")
    return batches

"""Process-group hygiene for multi-process runs on the CPU (gloo)."""

from __future__ import annotations

import atexit

import torch.distributed as dist


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

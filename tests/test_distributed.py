from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist

from upi_lightning import distributed


def test_the_process_group_is_destroyed_at_exit_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[Callable[[], None]] = []
    monkeypatch.setattr(distributed.atexit, "register", registered.append)
    monkeypatch.setattr(distributed.atexit, "unregister", lambda fn: registered.remove(fn) if fn in registered else 0)
    distributed.destroy_process_group_at_exit()
    assert registered == []  # no process group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed.destroy_process_group_at_exit()
        distributed.destroy_process_group_at_exit()
        assert len(registered) == 1
        registered[0]()  # what the interpreter runs at exit
        assert not dist.is_initialized()
        registered[0]()  # and again, harmlessly
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

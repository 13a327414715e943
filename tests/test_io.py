from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import IO

import pytest

from upi_lightning.io import atomic_write, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "report.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "delta.pt"
    path.write_bytes(b"old")

    def interrupted(stream: IO[bytes]) -> None:
        stream.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["delta.pt"]


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "report.md", "x")
        plain = tmp_path / "plain.md"
        plain.write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o640

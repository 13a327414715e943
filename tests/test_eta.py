"""The run-level time-left line of long runs (``upi_lightning.eta.TimeLeft``): on a fake clock, and in an attack run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_runner import DATA, SMALL
from upi_lightning.attack_cli import attack_main
from upi_lightning.eta import TimeLeft


def test_time_left_is_the_mean_time_per_computed_item_times_the_items_left() -> None:
    now = iter([0.0, 60.0, 60.5, 240.0]).__next__
    time_left = TimeLeft(5, clock=now)
    assert time_left.step() == "done 1/5, ~4.0 min left"  # 60 s per item, 4 left
    assert time_left.step(computed=False) == "done 2/5, ~3.0 min left"  # resumed: not in the mean
    assert time_left.step() == "done 3/5, ~4.0 min left"  # (60 + 179.5) / 2 s per item, 2 left
    assert TimeLeft(1, clock=lambda: 0.0).step() == "done 1/1"


def test_time_left_is_unknown_until_an_item_is_computed() -> None:
    assert TimeLeft(3, clock=lambda: 0.0).step(computed=False) == "done 1/3"


def test_an_attack_run_prints_the_time_left_after_each_budget_and_method(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    attack_main(
        [
            f"--ckpt={checkpoint}",
            *DATA,
            *SMALL,
            "--attack.methods=[random]",
            "--attack.budgets=[{norm: l2, eps: 0.5}, {norm: l2, eps: 1.0}]",
            "--progress=true",
            f"--output={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    assert re.search(r"\[l2_eps0\.5\] random +done 1/2, ~[0-9.]+ min left", out), out
    assert "[l2_eps1] random     done 2/2\n" in out

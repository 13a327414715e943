"""``python -m upi_lightning`` (``upi_lightning.__main__``): the ``train`` and ``attack`` commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

SMALL = [
    "--attack.budgets=[{norm: l2, eps: 1.0}]",
    "--attack.methods=[upi_grad, random]",
    "--attack.fit_samples=32",
    "--attack.eval_samples=32",
    "--attack.batch_size=16",
    "--attack.k=20",
    "--attack.upi_grad.epochs=1",
    "--attack.baselines.random_draws=2",
    "--progress=false",
]


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "upi_lightning", *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_commands_and_usage() -> None:
    assert "--model.arch" in run_module("train", "fit", "--help").stdout
    assert "--eval_ckpt" in run_module("attack", "--help").stdout
    assert "--robust.budgets" in run_module("compare", "--help").stdout
    missing = run_module("nope")
    assert missing.returncode == 2
    assert missing.stderr.startswith("usage: python -m upi_lightning {train,attack,compare}")


def test_attack_with_only_a_checkpoint_uses_its_data(checkpoint: Path, tmp_path: Path) -> None:
    result = run_module("attack", f"--ckpt={checkpoint}", *SMALL, f"--output={tmp_path}")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["description"]["data"] == "SyntheticDataModule"
    assert [row["method"] for row in report["results"]] == ["upi_grad", "random"]

"""The scripts in ``benchmarks/`` run end to end and print their tables (tiny settings, marked slow).

Their figures are measured by ``make benchmarks``, never asserted here; this only keeps the scripts
from rotting while the package changes under them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

TINY_RUNS = {
    "upi_step_cost.py": ["--models", "small_cnn", "--batch-size", "8", "--repeats", "1", "--warmup", "0"],
    "upi_pca_rows.py": ["--models", "small_cnn", "--batch-size", "4", "--loop-samples", "2", "--repeats", "1"],
    "upi_pca_memory.py": ["--sizes", "64", "--batch-size", "32", "--n-iter", "2"],
    "upi_ddp.py": ["--samples", "32", "--batch-size", "16", "--n-iter", "2"],
    "saliency_throughput.py": ["--models", "small_cnn", "--batch-size", "4", "--loop-samples", "2", "--repeats", "1"],
    "training_modes.py": ["--modes", "input_grad", "upi_adv", "--batch-size", "8", "--steps", "1", "--warmup", "0"],
    "captum_peer.py": ["--models", "small_cnn", "--batch-size", "4", "--n-steps", "2", "--n-samples", "2"],
    "saliency_attack_cost.py": [
        "--batch-size",
        "4",
        "--n-steps",
        "2",
        "--n-samples",
        "2",
        "--repeats",
        "1",
        "--chunk-size",
        "2",
    ],
    "upi_epoch.py": ["--model", "small_cnn", "--samples", "32", "--batch-size", "16"],
}
"""Script -> arguments small enough for a few seconds of work each."""


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY_RUNS))
def test_benchmark_script_prints_its_table(script: str) -> None:
    if script == "captum_peer.py":
        pytest.importorskip("captum.attr", reason="Captum is the bench extra: pip install -e '.[bench]'")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, script, *TINY_RUNS[script], "--threads", "1"],
        cwd=BENCHMARKS,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) >= 3, result.stdout  # header, separator, at least one row
    assert not re.search(r"\bnan\b", result.stdout, re.IGNORECASE), result.stdout


@pytest.mark.slow
def test_gpu_script_writes_every_figure_to_one_json_file(tmp_path: Path) -> None:
    output = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "--output", str(output), "--device", "cpu", "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(output.read_text())
    captum = {"captum_peer"} if importlib.util.find_spec("captum") else set()  # run when the extra is installed
    assert (
        set(figures) == {"saliency_throughput", "upi_pca_rows", "upi_step_cost", "upi_epoch", "training_modes"} | captum
    )
    assert all(payload["rows"] and payload["machine"] for payload in figures.values())

"""The examples/ scripts run end to end (into tmp_path)."""

from __future__ import annotations

import runpy
from pathlib import Path

from tests.helpers import REPO
from upi_lightning.perturbation import UniversalPerturbation


def test_fit_and_evaluate_example(tmp_path: Path) -> None:
    main = runpy.run_path(str(REPO / "examples" / "fit_and_evaluate.py"))["main"]
    results = main(["--output", str(tmp_path)])
    assert set(results) == {"upi_grad", "upi_pca", "random"}
    assert all(0 < metrics["relative_l2"] < 1 for metrics in results.values())
    assert results["upi_grad"]["relative_l2"] > results["random"]["relative_l2"]
    assert UniversalPerturbation.load(tmp_path / "upi_grad_l2_eps1.pt").metadata["model"] == "example cnn"

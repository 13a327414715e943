"""The perturbation file format (``upi_lightning.perturbation``): save, load, and what loading refuses."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import BinaryIO

import pytest
import torch

from tests.helpers import Payload, example_perturbation, write_payload
from upi_lightning.errors import CheckpointMismatchError, UPIError
from upi_lightning.perturbation import FORMAT_NAME, FORMAT_VERSION, UniversalPerturbation


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    original = example_perturbation()
    path = original.save(tmp_path / "sub" / "delta.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["delta.pt"]  # no temporary file left
    loaded = UniversalPerturbation.load(path, expected_shape=(1, 5, 5))
    assert torch.equal(loaded.delta, original.delta)
    assert loaded.norm == "l2" and loaded.eps == 1.5
    assert loaded.metadata == original.metadata and "created" in loaded.metadata
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT_NAME and raw["format_version"] == FORMAT_VERSION
    original.save(path)  # overwriting works
    assert torch.equal(UniversalPerturbation.load(path).delta, original.delta)


def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = example_perturbation()
    path = original.save(tmp_path / "delta.pt")

    def crash(obj: object, stream: BinaryIO) -> None:
        stream.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        UniversalPerturbation(torch.zeros(1, 5, 5), "l2", 1.5).save(path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["delta.pt"]
    assert torch.equal(UniversalPerturbation.load(path).delta, original.delta)


def test_apply_and_project() -> None:
    pert = example_perturbation()
    x = torch.rand(2, 1, 5, 5)
    assert torch.equal(pert.apply(x), (x + pert.delta).clamp(0, 1))
    with pytest.raises(UPIError, match="shape"):
        pert.apply(torch.rand(2, 3, 5, 5))
    pert.delta = pert.delta * 3
    assert math.isclose(pert.project_().delta.norm().item(), 1.5, rel_tol=1e-6)


def test_constructor_refuses_bad_values() -> None:
    with pytest.raises(UPIError, match="norm 3"):
        UniversalPerturbation(torch.full((1, 3, 3), 1.0), "l2", 1.0)
    with pytest.raises(UPIError, match="NaN"):
        UniversalPerturbation(torch.full((1, 3, 3), float("nan")), "linf", 0.5)
    with pytest.raises(UPIError, match=r"\(C, H, W\)"):
        UniversalPerturbation(torch.zeros(2, 1, 3, 3), "linf", 0.5)
    with pytest.raises(UPIError, match="Path"):
        UniversalPerturbation(torch.zeros(1, 3, 3), "linf", 0.5, {"where": Path("x")})


def test_load_refuses_mismatches(tmp_path: Path) -> None:
    good = write_payload(tmp_path / "good.pt")
    assert UniversalPerturbation.load(good).shape == (1, 5, 5)
    with pytest.raises(CheckpointMismatchError, match=r"shape \(1, 5, 5\).*\(3, 5, 5\)"):
        UniversalPerturbation.load(good, expected_shape=(3, 5, 5))
    outside = write_payload(tmp_path / "outside.pt", delta=torch.full((1, 5, 5), 0.2))
    with pytest.raises(CheckpointMismatchError, match="eps"):
        UniversalPerturbation.load(outside)
    newer = write_payload(tmp_path / "newer.pt", format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointMismatchError, match="format_version"):
        UniversalPerturbation.load(newer)
    bad_norm = write_payload(tmp_path / "norm.pt", norm="l1")
    with pytest.raises(CheckpointMismatchError, match="norm"):
        UniversalPerturbation.load(bad_norm)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "model.pt")
    with pytest.raises(CheckpointMismatchError, match="not a universal perturbation"):
        UniversalPerturbation.load(tmp_path / "model.pt")
    with pytest.raises(UPIError, match="No perturbation file"):
        UniversalPerturbation.load(tmp_path / "missing.pt")


def test_load_refuses_truncated_file(tmp_path: Path) -> None:
    path = example_perturbation().save(tmp_path / "delta.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match="not a readable"):
        UniversalPerturbation.load(path)


def test_load_never_executes_a_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT_NAME, "delta": Payload(marker)}, path)
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload does run when unpickled unsafely
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointMismatchError, match="not a readable"):
        UniversalPerturbation.load(path)
    assert not marker.exists()

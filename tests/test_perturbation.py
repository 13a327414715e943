import math
import pickle
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch

from upi_lightning.errors import CheckpointMismatchError, UPIError
from upi_lightning.perturbation import (
    FORMAT_NAME,
    FORMAT_VERSION,
    UniversalPerturbation,
    apply_perturbation,
    ascent_direction,
    make_generator,
    project,
    projected_ascent_step,
    random_in_ball,
    random_on_sphere,
    sample_normal,
    straight_through_clip,
)


def _np_project(delta: np.ndarray, norm: str, eps: float) -> np.ndarray:
    """Closed-form projection in float64 numpy (the oracle)."""
    if norm == "linf":
        return np.clip(delta, -eps, eps)
    length = np.sqrt((delta.astype(np.float64) ** 2).sum())
    return delta if length <= eps else delta * (eps / length)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_project_matches_closed_form_and_is_idempotent(norm: str) -> None:
    gen = make_generator(0)
    eps = 0.7
    for scale in (0.01, 10.0):
        delta = scale * torch.randn(3, 5, 4, generator=gen)
        projected = project(delta, norm, eps)
        np.testing.assert_allclose(projected.numpy(), _np_project(delta.numpy(), norm, eps), rtol=1e-6, atol=1e-7)
        assert torch.equal(project(projected, norm, eps), projected)
    inside = 0.001 * torch.randn(3, 5, 4, generator=gen)
    assert torch.equal(project(inside, norm, eps), inside)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_is_the_nearest_point_of_the_ball(norm: str) -> None:
    gen = make_generator(1)
    eps = 0.5
    point = 3 * torch.randn(12, generator=gen, dtype=torch.float64)
    best = torch.linalg.vector_norm(point - project(point, norm, eps))
    candidates = random_in_ball((2000, 12), norm, eps, generator=gen, per_sample=True).double()
    distances = torch.linalg.vector_norm(point - candidates, dim=1)
    assert bool((distances >= best - 1e-9).all())


def test_per_sample_projection_projects_each_row_on_its_own() -> None:
    delta = torch.stack([torch.full((2, 3), 0.1), torch.full((2, 3), 5.0)])
    projected = project(delta, "l2", 1.0, per_sample=True)
    assert torch.equal(projected[0], delta[0])
    assert math.isclose(projected[1].norm().item(), 1.0, rel_tol=1e-6)
    np.testing.assert_allclose(projected[1].numpy(), _np_project(delta[1].numpy(), "l2", 1.0), rtol=1e-6)


def test_ascent_direction_l2_unit_linf_sign_zero_stays_zero() -> None:
    grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(ascent_direction(grad, "l2", per_sample=True), torch.tensor([[0.6, 0.8], [0, 0]]))
    assert torch.allclose(ascent_direction(grad, "l2"), grad / 5.0)
    assert torch.equal(ascent_direction(torch.tensor([-2.0, 0.0, 0.3]), "linf"), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(ascent_direction(torch.zeros(4), "l2"), torch.zeros(4))


def test_projected_ascent_step_closed_form() -> None:
    delta = torch.tensor([0.0, 0.5])
    grad = torch.tensor([2.0, 0.0])
    assert torch.allclose(projected_ascent_step(delta, grad, "l2", 1.0, 0.5), torch.tensor([0.5, 0.5]))
    stepped = projected_ascent_step(delta, grad, "l2", 0.6, 0.5)
    assert torch.allclose(stepped, torch.tensor([0.5, 0.5]) * 0.6 / math.sqrt(0.5))
    grad = torch.tensor([-1.0, 3.0])
    assert torch.allclose(projected_ascent_step(delta, grad, "linf", 0.6, 0.4), torch.tensor([-0.4, 0.6]))


def test_random_draws_norms_reproducibility_and_per_sample() -> None:
    shape = (6, 1, 4, 4)
    sphere = random_on_sphere(shape, "l2", 2.0, make_generator(3), per_sample=True)
    assert torch.allclose(sphere.flatten(1).norm(dim=1), torch.full((6,), 2.0))
    assert torch.equal(sphere, random_on_sphere(shape, "l2", 2.0, make_generator(3), per_sample=True))
    whole = random_on_sphere(shape, "l2", 2.0, make_generator(3))
    assert math.isclose(whole.norm().item(), 2.0, rel_tol=1e-6)
    signs = random_on_sphere(shape, "linf", 0.3, make_generator(4))
    assert torch.equal(signs.abs(), torch.full(shape, 0.3))
    assert 0.2 < (signs > 0).float().mean().item() < 0.8
    ball = random_in_ball(shape, "l2", 2.0, make_generator(5), per_sample=True)
    radii = ball.flatten(1).norm(dim=1)
    assert bool((radii <= 2.0 + 1e-6).all()) and len(set(radii.tolist())) == 6
    cube = random_in_ball(shape, "linf", 0.3, make_generator(6))
    assert cube.abs().max() <= 0.3 and cube.abs().max() > 0.25 and cube.dtype == torch.float32


def test_apply_perturbation_clips_to_pixel_range() -> None:
    x = torch.tensor([[[[0.0, 0.5, 1.0]]]])
    delta = torch.tensor([[[-0.2, 0.2, 0.2]]])
    assert torch.equal(apply_perturbation(x, delta), torch.tensor([[[[0.0, 0.7, 1.0]]]]))


def test_straight_through_clip_has_the_clamp_value_and_the_identity_gradient() -> None:
    # torch.clamp gives 0 and 1 themselves a zero gradient (issue 14); the straight-through clip passes
    # the gradient of the clipped point to every coordinate, inside, on or beyond the box
    x = torch.tensor([-0.3, 0.0, 1e-8, 0.5, 1.0, 1.0 + 1e-7, 3.7], requires_grad=True)
    weights = torch.arange(1.0, 8.0)
    clipped = straight_through_clip(x)
    assert torch.equal(clipped, x.detach().clamp(0, 1))
    (grad,) = torch.autograd.grad((weights * clipped).sum(), x)
    assert torch.equal(grad, weights)


@pytest.mark.parametrize(("norm", "eps"), [("l2", 0.0), ("l3", 1.0), ("l2", float("nan")), ("linf", -1.0)])
def test_bad_norm_or_eps_is_refused(norm: str, eps: float) -> None:
    with pytest.raises(UPIError, match=r"eps|norm"):
        project(torch.zeros(3), norm, eps)  # type: ignore[arg-type]


def _perturbation() -> UniversalPerturbation:
    delta = random_on_sphere((1, 5, 5), "l2", 1.5, make_generator(7))
    return UniversalPerturbation(delta, "l2", 1.5, {"method": "upi_grad", "settings": {"epochs": 2, "lr": [0.1]}})


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    original = _perturbation()
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
    original = _perturbation()
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
    pert = _perturbation()
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
        UniversalPerturbation(torch.full((1, 3, 3), float("nan")), "linf", 1.0)
    with pytest.raises(UPIError, match=r"\(C, H, W\)"):
        UniversalPerturbation(torch.zeros(2, 1, 3, 3), "linf", 1.0)
    with pytest.raises(UPIError, match="Path"):
        UniversalPerturbation(torch.zeros(1, 3, 3), "linf", 1.0, {"where": Path("x")})


def _write_payload(path: Path, **changes: object) -> Path:
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "delta": torch.zeros(1, 5, 5),
        "norm": "linf",
        "eps": 0.1,
        "metadata": {},
    }
    payload.update(changes)
    torch.save(payload, path)
    return path


def test_load_refuses_mismatches(tmp_path: Path) -> None:
    good = _write_payload(tmp_path / "good.pt")
    assert UniversalPerturbation.load(good).shape == (1, 5, 5)
    with pytest.raises(CheckpointMismatchError, match=r"shape \(1, 5, 5\).*\(3, 5, 5\)"):
        UniversalPerturbation.load(good, expected_shape=(3, 5, 5))
    outside = _write_payload(tmp_path / "outside.pt", delta=torch.full((1, 5, 5), 0.2))
    with pytest.raises(CheckpointMismatchError, match="eps"):
        UniversalPerturbation.load(outside)
    newer = _write_payload(tmp_path / "newer.pt", format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointMismatchError, match="format_version"):
        UniversalPerturbation.load(newer)
    bad_norm = _write_payload(tmp_path / "norm.pt", norm="l1")
    with pytest.raises(CheckpointMismatchError, match="norm"):
        UniversalPerturbation.load(bad_norm)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "model.pt")
    with pytest.raises(CheckpointMismatchError, match="not a universal perturbation"):
        UniversalPerturbation.load(tmp_path / "model.pt")
    with pytest.raises(UPIError, match="No perturbation file"):
        UniversalPerturbation.load(tmp_path / "missing.pt")


def test_load_refuses_truncated_file(tmp_path: Path) -> None:
    path = _perturbation().save(tmp_path / "delta.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match="not a readable"):
        UniversalPerturbation.load(path)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_load_never_executes_a_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT_NAME, "delta": _Payload(marker)}, path)
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload does run when unpickled unsafely
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointMismatchError, match="not a readable"):
        UniversalPerturbation.load(path)
    assert not marker.exists()


def test_sample_normal_is_keyed_by_sample_not_by_batch() -> None:
    x, y = torch.rand(6, 1, 4, 4, generator=make_generator(0)), torch.arange(6)
    whole = sample_normal(x, y, 3, make_generator(7))
    assert whole.shape == (3, 6, 1, 4, 4)
    # each half alone (what two processes see), and the batch reversed, give every sample the same noise
    first, second = sample_normal(x[:3], y[:3], 3, make_generator(7)), sample_normal(x[3:], y[3:], 3, make_generator(7))
    assert torch.equal(torch.cat([first, second], dim=1), whole)
    assert torch.equal(sample_normal(x.flip(0), y.flip(0), 3, make_generator(7)), whole.flip(1))
    # the next call (next step) and another seed draw new noise; a sample's draws are not all equal
    generator = make_generator(7)
    sample_normal(x, y, 3, generator)
    assert not torch.equal(sample_normal(x, y, 3, generator), whole)
    assert not torch.equal(sample_normal(x, y, 3, make_generator(8)), whole)
    assert not torch.equal(whole[0], whole[1])
    assert abs(whole.mean().item()) < 0.2 and abs(whole.std().item() - 1) < 0.2

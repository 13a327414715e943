"""Threat models (``upi_lightning.threat``): projection, ascent steps, random draws and pixel clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from upi_lightning.errors import UPIError
from upi_lightning.noise import make_generator
from upi_lightning.threat import L2Ball, LinfBall, apply_perturbation, straight_through_clip, threat_model


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
        projected = threat_model(norm, eps).project(delta)
        np.testing.assert_allclose(projected.numpy(), _np_project(delta.numpy(), norm, eps), rtol=1e-6, atol=1e-7)
        assert torch.equal(threat_model(norm, eps).project(projected), projected)
    inside = 0.001 * torch.randn(3, 5, 4, generator=gen)
    assert torch.equal(threat_model(norm, eps).project(inside), inside)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_is_the_nearest_point_of_the_ball(norm: str) -> None:
    gen = make_generator(1)
    eps = 0.5
    point = 3 * torch.randn(12, generator=gen, dtype=torch.float64)
    best = torch.linalg.vector_norm(point - threat_model(norm, eps).project(point))
    candidates = threat_model(norm, eps).random_start((2000, 12), generator=gen, per_sample=True).double()
    distances = torch.linalg.vector_norm(point - candidates, dim=1)
    assert bool((distances >= best - 1e-9).all())


def test_per_sample_projection_projects_each_row_on_its_own() -> None:
    delta = torch.stack([torch.full((2, 3), 0.1), torch.full((2, 3), 5.0)])
    projected = L2Ball(1.0).project(delta, per_sample=True)
    assert torch.equal(projected[0], delta[0])
    assert math.isclose(projected[1].norm().item(), 1.0, rel_tol=1e-6)
    np.testing.assert_allclose(projected[1].numpy(), _np_project(delta[1].numpy(), "l2", 1.0), rtol=1e-6)


def test_ascent_direction_l2_unit_linf_sign_zero_stays_zero() -> None:
    grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(L2Ball(1.0).direction(grad, per_sample=True), torch.tensor([[0.6, 0.8], [0, 0]]))
    assert torch.allclose(L2Ball(1.0).direction(grad), grad / 5.0)
    assert torch.equal(LinfBall(0.5).direction(torch.tensor([-2.0, 0.0, 0.3])), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(L2Ball(1.0).direction(torch.zeros(4)), torch.zeros(4))


def test_projected_ascent_step_closed_form() -> None:
    delta = torch.tensor([0.0, 0.5])
    grad = torch.tensor([2.0, 0.0])
    assert torch.allclose(L2Ball(1.0).step(delta, grad, 0.5), torch.tensor([0.5, 0.5]))
    stepped = L2Ball(0.6).step(delta, grad, 0.5)
    assert torch.allclose(stepped, torch.tensor([0.5, 0.5]) * 0.6 / math.sqrt(0.5))
    grad = torch.tensor([-1.0, 3.0])
    assert torch.allclose(LinfBall(0.6).step(delta, grad, 0.4), torch.tensor([-0.4, 0.6]))


def test_random_draws_norms_reproducibility_and_per_sample() -> None:
    shape = (6, 1, 4, 4)
    sphere = L2Ball(2.0).random_on_sphere(shape, make_generator(3), per_sample=True)
    assert torch.allclose(sphere.flatten(1).norm(dim=1), torch.full((6,), 2.0))
    assert torch.equal(sphere, L2Ball(2.0).random_on_sphere(shape, make_generator(3), per_sample=True))
    whole = L2Ball(2.0).random_on_sphere(shape, make_generator(3))
    assert math.isclose(whole.norm().item(), 2.0, rel_tol=1e-6)
    signs = LinfBall(0.3).random_on_sphere(shape, make_generator(4))
    assert torch.equal(signs.abs(), torch.full(shape, 0.3))
    assert 0.2 < (signs > 0).float().mean().item() < 0.8
    ball = L2Ball(2.0).random_start(shape, make_generator(5), per_sample=True)
    radii = ball.flatten(1).norm(dim=1)
    assert bool((radii <= 2.0 + 1e-6).all()) and len(set(radii.tolist())) == 6
    cube = LinfBall(0.3).random_start(shape, make_generator(6))
    assert cube.abs().max() <= 0.3 and cube.abs().max() > 0.25 and cube.dtype == torch.float32


def test_apply_perturbation_clips_to_pixel_range() -> None:
    x = torch.tensor([[[[0.0, 0.5, 1.0]]]])
    delta = torch.tensor([[[-0.2, 0.2, 0.2]]])
    assert torch.equal(apply_perturbation(x, delta), torch.tensor([[[[0.0, 0.7, 1.0]]]]))


@pytest.mark.parametrize(("norm", "eps"), [("l2", 0.0), ("l3", 1.0), ("l2", float("nan")), ("linf", -1.0)])
def test_bad_norm_or_eps_is_refused(norm: str, eps: float) -> None:
    with pytest.raises(UPIError, match=r"eps|norm"):
        threat_model(norm, eps).project(torch.zeros(3))


def test_straight_through_clip_has_the_clamp_value_and_the_identity_gradient() -> None:
    # torch.clamp gives 0 and 1 themselves a zero gradient (issue 14); the straight-through clip passes
    # the gradient of the clipped point to every coordinate, inside, on or beyond the box
    x = torch.tensor([-0.3, 0.0, 1e-8, 0.5, 1.0, 1.0 + 1e-7, 3.7], requires_grad=True)
    weights = torch.arange(1.0, 8.0)
    clipped = straight_through_clip(x)
    assert torch.equal(clipped, x.detach().clamp(0, 1))
    (grad,) = torch.autograd.grad((weights * clipped).sum(), x)
    assert torch.equal(grad, weights)


@pytest.mark.parametrize("eps", [1.0, 8.0])
def test_a_linf_eps_that_covers_the_whole_box_is_refused_with_the_likely_intent(eps: float) -> None:
    with pytest.raises(UPIError, match=rf"Linf eps of {eps:g} lets every pixel .* or {eps:g}/255 = {eps / 255:.6g}\."):
        threat_model("linf", eps)
    assert threat_model("l2", eps).eps == eps  # an L2 radius above 1 is a real budget

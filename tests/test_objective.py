"""Tests of the UPI objective (``upi_lightning.attacks.objective``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import QuadraticScore, TinyCNN, assert_untouched, make_batches, snapshot
from upi_lightning.attacks.objective import OBJECTIVE_NOISE_SEED, UPIObjective, map_dissimilarity
from upi_lightning.errors import UPIError
from upi_lightning.models import build_classifier
from upi_lightning.noise import make_generator, sample_normal
from upi_lightning.saliency import SaliencySettings, saliency_map, smoothgrad_noise
from upi_lightning.threat import L2Ball


def test_map_dissimilarity_closed_forms() -> None:
    clean = torch.tensor([[[0.4, 0.3], [0.2, 0.1]]])
    perturbed = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])
    l2 = map_dissimilarity(perturbed, clean, "l2")
    assert torch.allclose(l2, torch.tensor([math.sqrt(0.09 + 0.01 + 0.01 + 0.09)]))
    topk = map_dissimilarity(perturbed, clean, "topk_mass", k=2)
    assert torch.allclose(topk, torch.tensor([1 - 0.3 / 0.7]))
    cosine = map_dissimilarity(perturbed, clean, "cosine")
    assert torch.allclose(cosine, torch.tensor([1 - 0.2 / 0.3]))
    for kind in ("l2", "topk_mass", "cosine"):
        assert map_dissimilarity(clean, clean, kind, k=3).abs().item() < 1e-6
    zero = torch.zeros(1, 2, 2)
    assert torch.isfinite(map_dissimilarity(zero, zero, "topk_mass", k=1)).all()


@pytest.mark.parametrize("kind", ["l2", "topk_mass", "cosine"])
def test_map_dissimilarity_gradient_matches_finite_differences(kind: str) -> None:
    gen = make_generator(0)
    clean = torch.rand(3, 4, 4, generator=gen, dtype=torch.float64)
    perturbed = torch.rand(3, 4, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: map_dissimilarity(a, clean, kind, k=5), (perturbed,))


def test_map_dissimilarity_and_objective_refuse_bad_settings() -> None:
    maps = torch.rand(2, 3, 3)
    with pytest.raises(UPIError, match="Unknown dissimilarity"):
        map_dissimilarity(maps, maps, "l1")
    with pytest.raises(UPIError, match="top-k"):
        map_dissimilarity(maps, maps, "topk_mass", k=10)
    with pytest.raises(UPIError, match=r"\(N, H, W\)"):
        map_dissimilarity(maps, maps[:1], "l2")
    for bad in (
        {"sigma": -1.0},
        {"n_noise": 0},
        {"surrogate_beta": 0.0},
        {"keep_prediction": -1.0},
        {"saliency": "gradient"},
    ):
        with pytest.raises(UPIError, match="Invalid UPI objective"):
            UPIObjective(**bad)
    for unknown in ({"dissimilarity": "l2", "beta": 1.0}, {"saliency": {"method": "gradient", "steps": 3}}):
        with pytest.raises(UPIError, match="Invalid UPI objective"):
            UPIObjective.from_config(unknown)


def test_objective_from_config_reads_nested_and_flat_saliency_settings() -> None:
    nested = UPIObjective.from_config({"saliency": {"method": "smoothgrad", "n_samples": 3}, "surrogate_beta": 5.0})
    flat = UPIObjective.from_config({"method": "smoothgrad", "method_kwargs": {"n_samples": 3}, "surrogate_beta": 5.0})
    assert nested == flat == UPIObjective(saliency=SaliencySettings("smoothgrad", n_samples=3), surrogate_beta=5.0)


def test_objective_is_zero_with_zero_gradient_at_delta_zero() -> None:
    model = QuadraticScore()
    x, y = make_batches(1, 6)[0]
    delta = torch.zeros(1, 8, 8, requires_grad=True)
    values = UPIObjective(k=5).per_sample(model, x, y, delta, create_graph=True)
    (grad,) = torch.autograd.grad(values.sum(), delta)
    assert torch.equal(values.detach(), torch.zeros(6))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_objective_value_and_gradient_match_an_independent_computation() -> None:
    model = QuadraticScore().double()
    x, y = make_batches(1, 4)[0]
    x = x.double()
    objective = UPIObjective(dissimilarity="cosine")
    start = 0.2 * L2Ball(1.0).random_on_sphere((1, 8, 8), make_generator(1)).double()
    clean = saliency_map(model, x, y)
    expected = 1 - F.cosine_similarity(saliency_map(model, x + start, y).flatten(1), clean.flatten(1), dim=1)
    delta = start.clone().requires_grad_(True)
    values = objective.per_sample(model, x, y, delta, create_graph=True)
    assert torch.allclose(values.detach(), expected, atol=1e-12)
    (grad,) = torch.autograd.grad(values.sum(), delta)
    direction = L2Ball(1.0).random_on_sphere((1, 8, 8), make_generator(2)).double()
    h = 1e-5
    plus = objective.per_sample(model, x, y, start + h * direction).sum()
    minus = objective.per_sample(model, x, y, start - h * direction).sum()
    assert math.isclose(((plus - minus) / (2 * h)).item(), (grad * direction).sum().item(), rel_tol=1e-4)


def test_smoothing_averages_the_stacked_noise_draws() -> None:
    model = QuadraticScore()
    x, y = make_batches(1, 3)[0]
    delta = 0.1 * L2Ball(1.0).random_on_sphere((1, 8, 8), make_generator(3))
    objective = UPIObjective(sigma=0.05, n_noise=4)
    values = objective.per_sample(model, x, y, delta, generator=make_generator(5))
    noise = sample_normal(x, y, 4, make_generator(5))
    clean = saliency_map(model, x, y)
    draws = [(saliency_map(model, (x + delta + 0.05 * z).clamp(0, 1), y) - clean).flatten(1).norm(dim=1) for z in noise]
    assert torch.allclose(values, torch.stack(draws).mean(dim=0), atol=1e-6)


def test_smoothgrad_objective_shares_each_sample_s_map_noise_across_its_copies() -> None:
    model = QuadraticScore()
    x, y = make_batches(1, 3)[0]
    smoothgrad = SaliencySettings("smoothgrad", n_samples=3, sigma=0.2)
    assert torch.equal(UPIObjective(saliency=smoothgrad).per_sample(model, x, y, torch.zeros(1, 8, 8)), torch.zeros(3))
    delta = 0.1 * L2Ball(1.0).random_on_sphere((1, 8, 8), make_generator(3))
    objective = UPIObjective(sigma=0.05, n_noise=2, saliency=smoothgrad)
    values = objective.per_sample(model, x, y, delta, generator=make_generator(5))
    kwargs = {"n_samples": 3, "sigma": 0.2, "noise": smoothgrad_noise(x, y, 3, OBJECTIVE_NOISE_SEED)}  # per sample
    clean = saliency_map(model, x, y, "smoothgrad", **kwargs)
    draws = [
        (saliency_map(model, (x + delta + 0.05 * z).clamp(0, 1), y, "smoothgrad", **kwargs) - clean).flatten(1)
        for z in sample_normal(x, y, 2, make_generator(5))
    ]
    assert torch.allclose(values, torch.stack([d.norm(dim=1) for d in draws]).mean(dim=0), atol=1e-6)
    assert not torch.equal(kwargs["noise"], smoothgrad_noise(x, y, 3))  # not the evaluation's draws


def test_keep_prediction_subtracts_the_cross_entropy_increase() -> None:
    model = QuadraticScore()
    x, y = make_batches(1, 8)[0]
    delta = L2Ball(0.5).random_on_sphere((1, 8, 8), make_generator(4))
    plain = UPIObjective().per_sample(model, x, y, delta)
    kept = UPIObjective(keep_prediction=2.0).per_sample(model, x, y, delta)
    with torch.no_grad():
        model.eval()
        increase = F.cross_entropy(model(x + delta), y, reduction="none") - F.cross_entropy(
            model(x), y, reduction="none"
        )
    assert (increase > 0).any() and (increase < 0).any()
    assert torch.allclose(kept, plain - 2.0 * increase.clamp_min(0), atol=1e-5)


def test_relu_maps_have_no_second_order_signal_but_the_surrogate_does() -> None:
    model = TinyCNN()
    model.train()
    before = snapshot(model)
    x, y = make_batches(1, 5, shape=(1, 6, 6), low=0.0, high=1.0)[0]
    delta = L2Ball(0.5).random_on_sphere((1, 6, 6), make_generator(6)).requires_grad_(True)
    relu = UPIObjective(surrogate_beta=None)
    (relu_grad,) = torch.autograd.grad(relu.per_sample(model, x, y, delta, create_graph=True).sum(), delta)
    assert torch.equal(relu_grad, torch.zeros_like(relu_grad))
    smooth = UPIObjective(surrogate_beta=5.0)
    (smooth_grad,) = torch.autograd.grad(smooth.per_sample(model, x, y, delta, create_graph=True).sum(), delta)
    assert smooth_grad.abs().max() > 1e-4
    assert_untouched(model, before)
    surrogate = smooth.network(model)
    assert isinstance(surrogate.act, nn.Softplus) and isinstance(model.act, nn.ReLU)
    assert smooth.network(model) is surrogate  # cached
    with torch.no_grad():
        model.fc.weight.mul_(2.0)  # an optimizer step: the cache must follow
    assert smooth.network(model) is surrogate
    assert torch.equal(surrogate.fc.weight, model.fc.weight)
    other = TinyCNN(seed=1)
    assert smooth.network(other) is not surrogate


def test_objective_works_under_inference_mode() -> None:
    model = QuadraticScore()
    x, y = make_batches(1, 4)[0]
    delta = L2Ball(0.3).random_on_sphere((1, 8, 8), make_generator(7))
    expected = UPIObjective().per_sample(model, x, y, delta)
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()
        values = UPIObjective().per_sample(model, x_inf, y_inf, delta)
    assert torch.allclose(values, expected)


def test_straight_through_passes_the_gradient_of_the_clipped_image_to_clipped_pixels() -> None:
    # issue 14: through torch.clamp a pixel pushed onto or past 0 or 1 gets no gradient; the per-sample
    # attack differentiates through a straight-through clip instead: the gradient w.r.t. the clipped image
    model = QuadraticScore().double()
    x, y = make_batches(1, 4, low=0.0, high=1.0)[0]
    x = x.double()
    delta = 0.3 * torch.randn(4, 1, 8, 8, generator=make_generator(6), dtype=torch.float64)
    objective = UPIObjective(keep_prediction=0.5)
    clipped = (x + delta).clamp(0, 1)
    outside = (x + delta < 0) | (x + delta > 1)
    assert outside.any() and (~outside).any()
    model.eval()
    image = clipped.clone().requires_grad_(True)
    increase = F.cross_entropy(model(image), y, reduction="none") - F.cross_entropy(model(x), y, reduction="none")
    change = map_dissimilarity(saliency_map(model, image, y, create_graph=True), saliency_map(model, x, y))
    expected = change - 0.5 * increase.clamp_min(0)
    (expected_grad,) = torch.autograd.grad(expected.sum(), image)
    assert (increase > 0).any()
    grads = {}
    for straight_through in (False, True):
        variable = delta.clone().requires_grad_(True)
        values = objective.per_sample(model, x, y, variable, create_graph=True, straight_through=straight_through)
        assert torch.allclose(values.detach(), expected.detach(), atol=1e-12)
        (grads[straight_through],) = torch.autograd.grad(values.sum(), variable)
    torch.testing.assert_close(grads[True], expected_grad, rtol=1e-9, atol=1e-12)
    assert torch.equal(grads[False][outside], torch.zeros_like(grads[False][outside]))
    assert torch.equal(grads[False][~outside], grads[True][~outside])
    assert (grads[True][outside] != 0).all()


def test_a_model_without_relu_is_differentiated_as_it_is() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.GELU(), nn.Linear(8, 3)).eval()
    objective = UPIObjective()  # surrogate_beta=10 by default: nothing to replace here
    assert objective.network(model) is model
    assert objective.describe_network(model) == "the model itself (no ReLU to make smooth)"
    x, y = make_batches(1, 4, shape=(1, 6, 6), low=0.1, high=0.9)[0]
    delta = L2Ball(0.5).random_on_sphere((1, 6, 6), make_generator(1)).requires_grad_(True)
    (grad,) = torch.autograd.grad(objective.per_sample(model, x, y, delta, create_graph=True).sum(), delta)
    assert grad.abs().max() > 0  # GELU maps have a gradient of their own


def test_a_vision_transformer_s_maps_can_be_attacked() -> None:
    pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = build_classifier("timm.vit_tiny_patch16_224", 3, (1, 8, 8), [0.5], [0.25], arch_kwargs={"patch_size": 4})
    vit.eval()
    x, y = make_batches(1, 2, low=0.1, high=0.9)[0]
    delta = L2Ball(0.5).random_on_sphere((1, 8, 8), make_generator(1)).requires_grad_(True)
    values = UPIObjective().per_sample(vit, x, y, delta, create_graph=True)  # attention differentiated twice
    (grad,) = torch.autograd.grad(values.sum(), delta)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0

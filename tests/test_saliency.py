"""Saliency maps against closed forms, finite differences and brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from tests.helpers import HostReads
from upi_lightning.errors import UPIError
from upi_lightning.model_modes import evaluation_mode
from upi_lightning.models import SmallCNN
from upi_lightning.saliency import (
    SALIENCY_METHODS,
    SMOOTHGRAD_SAMPLES,
    SaliencySettings,
    attribution,
    input_gradient,
    normalize_map,
    saliency_map,
    smoothgrad_noise,
)
from upi_lightning.surrogate import softplus_surrogate

SHAPE = (2, 3, 4)  # (C, H, W) of the analytic models


class Linear(nn.Module):
    """logits = W vec(x) + b."""

    def __init__(self, num_classes: int = 5, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, *SHAPE, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(num_classes, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("kchw,nchw->nk", self.weight, x) + self.bias


class Quadratic(Linear):
    """logits_k = sum_i W_ki x_i^2 + b_k, gradient 2 W_k x."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x * x)


class Sine(Linear):
    """logits_k = sum_i W_ki sin(x_i) + b_k, gradient W_k cos(x)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(torch.sin(x))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _batch(n: int = 4, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.rand(n, *SHAPE, dtype=dtype)


def _batchnorm_net() -> nn.Module:
    """Conv-BN-ReLU-Dropout classifier of (3, 8, 8) images: BN and dropout make train mode per-batch."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 4),
    ).double()


def _softplus_cnn(shape: tuple[int, int, int] = (1, 8, 8)) -> nn.Module:
    return SmallCNN(shape, num_classes=4, activation="softplus", beta=3.0).double()


# ---------------------------------------------------------------- closed forms


def test_linear_gradient_map_is_normalized_weight() -> None:
    model, x = Linear(), _batch()
    target = torch.tensor([0, 3, 1, 3])
    expected_attr = model.weight.detach()[target]
    torch.testing.assert_close(input_gradient(model, x, target), expected_attr)
    heat = expected_attr.abs().sum(dim=1)
    expected_map = heat / heat.sum(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(saliency_map(model, x, target), expected_map)
    torch.testing.assert_close(saliency_map(model, x, target).sum(dim=(1, 2)), torch.ones(4, dtype=x.dtype))


def test_linear_grad_x_input_and_integrated_gradients_are_weight_times_input() -> None:
    model, x = Linear(), _batch()
    target = torch.tensor([2, 0, 4, 1])
    expected = model.weight.detach()[target] * x
    torch.testing.assert_close(attribution(model, x, target, "grad_x_input"), expected)
    torch.testing.assert_close(attribution(model, x, target, "integrated_gradients", n_steps=3), expected)
    baseline = torch.full(SHAPE, 0.5, dtype=x.dtype)
    torch.testing.assert_close(
        attribution(model, x, target, "integrated_gradients", n_steps=1, baseline=baseline),
        model.weight.detach()[target] * (x - baseline),
    )


def test_default_target_is_the_predicted_class() -> None:
    model, x = Linear(), _batch(6)
    predicted = model(x).argmax(dim=1)
    torch.testing.assert_close(input_gradient(model, x), model.weight.detach()[predicted])
    for method in ("integrated_gradients", "smoothgrad"):  # fixed on the clean x, not per path point
        generator = torch.Generator().manual_seed(1)
        torch.testing.assert_close(
            attribution(model, x, None, method, generator=generator),
            attribution(model, x, predicted, method, generator=torch.Generator().manual_seed(1)),
        )
    torch.testing.assert_close(input_gradient(model, x, 2), model.weight.detach()[[2] * 6])


def test_probability_score_gradients_match_softmax_jacobian() -> None:
    model, x = Linear(), _batch()
    target = torch.tensor([0, 1, 2, 3])
    prob = model(x).softmax(dim=1).detach()
    weight = model.weight.detach()
    mean_weight = torch.einsum("nk,kchw->nchw", prob, weight)
    expected = prob[torch.arange(4), target].view(-1, 1, 1, 1) * (weight[target] - mean_weight)
    torch.testing.assert_close(input_gradient(model, x, target, score="probability"), expected)
    # log p_t = -CE: grad = W_t - sum_k p_k W_k
    torch.testing.assert_close(input_gradient(model, x, target, score="log_probability"), weight[target] - mean_weight)


def test_quadratic_integrated_gradients_exact_with_midpoint_rule() -> None:
    model, x = Quadratic(), _batch()
    target = torch.tensor([1, 1, 0, 4])
    # the integrand 2 W (alpha x) is linear in alpha, so the midpoint rule is exact for any n_steps
    torch.testing.assert_close(
        attribution(model, x, target, "integrated_gradients", n_steps=2),
        model.weight.detach()[target] * x * x,
    )


def test_integrated_gradients_completeness_on_a_cnn() -> None:
    model = _softplus_cnn()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    baseline = torch.rand(1, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 2, 3])
    attr = attribution(model, x, target, "integrated_gradients", n_steps=64, baseline=baseline)
    with torch.no_grad():
        gap = model(x)[torch.arange(3), target] - model(baseline.expand_as(x))[torch.arange(3), target]
    torch.testing.assert_close(attr.sum(dim=(1, 2, 3)), gap, rtol=1e-3, atol=1e-4)


def test_smoothgrad_converges_to_expected_noisy_gradient() -> None:
    model, x = Sine(), _batch(2)
    target = torch.tensor([3, 0])
    sigma, n_samples = 0.4, 4000
    attr = attribution(model, x, target, "smoothgrad", n_samples=n_samples, sigma=sigma)
    # E[cos(x + z)] = cos(x) exp(-sigma^2 / 2) for z ~ N(0, sigma^2)
    weight = model.weight.detach()[target]
    expected = weight * torch.cos(x) * math.exp(-(sigma**2) / 2)
    std_error = weight.abs() / math.sqrt(n_samples)
    assert ((attr - expected).abs() <= 4 * std_error).all()
    assert not torch.allclose(attr, weight * torch.cos(x), atol=1e-2)  # the smoothing is visible


def test_smoothgrad_is_the_mean_of_base_attributions_at_the_noisy_points() -> None:
    model, x = Sine(), _batch(3)
    target = torch.tensor([1, 2, 0])
    sigma, n_samples = 0.2, 5
    for base_method in ("gradient", "grad_x_input", "integrated_gradients"):
        attr = attribution(
            model,
            x,
            target,
            "smoothgrad",
            n_samples=n_samples,
            sigma=sigma,
            base_method=base_method,
            n_steps=3,
            generator=torch.Generator().manual_seed(5),
        )
        noise = torch.randn((n_samples, *x.shape), generator=torch.Generator().manual_seed(5), dtype=x.dtype)
        loop = [attribution(model, x + sigma * z, target, base_method, n_steps=3) for z in noise]
        torch.testing.assert_close(attr, torch.stack(loop).mean(dim=0))
    torch.testing.assert_close(
        attribution(model, x, target, "smoothgrad", sigma=0.0, n_samples=2), input_gradient(model, x, target)
    )


# ------------------------------------------------------------ batched == per-sample


@pytest.mark.parametrize("method", SALIENCY_METHODS)
def test_batched_equals_per_sample_loop_with_batchnorm_in_train_mode(method: str) -> None:
    model = _batchnorm_net().train()
    model[1].running_mean.uniform_()  # eval-mode statistics differ from the batch's
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 1, 3])
    kwargs = {"n_steps": 4, "n_samples": 1, "sigma": 0.0}
    batched = attribution(model, x, target, method, **kwargs)
    loop = [attribution(model, x[i : i + 1], target[i : i + 1], method, **kwargs) for i in range(3)]
    torch.testing.assert_close(batched, torch.cat(loop))
    chunked = attribution(model, x, target, method, internal_batch_size=2, **kwargs)
    torch.testing.assert_close(chunked, batched)


@pytest.mark.parametrize(
    ("method", "forward_batches"),
    [
        ("gradient", [5]),
        ("grad_x_input", [5]),
        ("integrated_gradients", [5, 5 * 7]),  # target on the clean batch, then all steps at once
        ("smoothgrad", [5, 5 * 6]),
    ],
)
def test_one_forward_pass_for_the_whole_batch(method: str, forward_batches: list[int]) -> None:
    model, x = Linear(), _batch(5)
    seen: list[int] = []
    model.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[0]))
    attribution(model, x, None, method, n_steps=7, n_samples=6)
    assert seen == forward_batches


# ---------------------------------------------------------------- create_graph


def _finite_difference(fn, x: Tensor, direction: Tensor, eps: float = 1e-5) -> Tensor:
    return (fn(x + eps * direction) - fn(x - eps * direction)) / (2 * eps)


@pytest.mark.parametrize("method", ["gradient", "grad_x_input", "integrated_gradients"])
def test_create_graph_second_derivative_matches_finite_differences(method: str) -> None:
    model = _softplus_cnn()
    x_clean = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 0, 3])
    weights = torch.rand(3, 8, 8, dtype=torch.float64)
    direction = torch.randn_like(x_clean)

    def objective(x: Tensor, create_graph: bool = False) -> Tensor:
        maps = saliency_map(model, x, target, method, n_steps=4, create_graph=create_graph)
        return (weights * maps).sum()

    delta = torch.zeros_like(x_clean, requires_grad=True)
    (grad_delta,) = torch.autograd.grad(objective(x_clean + delta, create_graph=True), delta)
    directional = (grad_delta * direction).sum()
    fd = _finite_difference(objective, x_clean, direction)
    torch.testing.assert_close(directional, fd, rtol=1e-5, atol=1e-8)
    assert directional.abs() > 1e-6

    # w.r.t. a parameter too
    conv = model.features[0].weight
    param_direction = torch.randn_like(conv)
    (grad_param,) = torch.autograd.grad(objective(x_clean, create_graph=True), conv)

    def objective_of_param(value: Tensor) -> Tensor:
        with torch.no_grad():
            conv.copy_(value)
        return objective(x_clean)

    original = conv.detach().clone()
    fd = _finite_difference(objective_of_param, original, param_direction)
    objective_of_param(original)
    torch.testing.assert_close((grad_param * param_direction).sum(), fd, rtol=1e-5, atol=1e-8)


def test_create_graph_false_returns_a_detached_result() -> None:
    model = _softplus_cnn()
    delta = torch.zeros(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) + delta
    for method in SALIENCY_METHODS:
        assert not attribution(model, x, method=method, n_samples=2, n_steps=2).requires_grad
        assert saliency_map(model, x, method=method, n_samples=2, n_steps=2, create_graph=True).requires_grad
    baseline = torch.zeros(1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert not attribution(model, x, method="integrated_gradients", baseline=baseline, n_steps=2).requires_grad
    assert delta.grad is None
    assert all(p.grad is None for p in model.parameters())


def test_relu_network_has_zero_input_hessian_but_its_surrogate_does_not() -> None:
    relu = SmallCNN((1, 8, 8), num_classes=4).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    for model, nonzero in ((relu, False), (softplus_surrogate(relu, beta=5.0), True)):
        grad = input_gradient(model, x, torch.tensor([0, 1]), create_graph=True)
        (hvp,) = torch.autograd.grad((grad * torch.randn_like(grad)).sum(), x, allow_unused=True)
        assert (hvp is not None and bool(hvp.abs().sum() > 0)) is nonzero


# ----------------------------------------------------------- modes and contexts


def test_modes_are_restored_even_after_an_error() -> None:
    model = _batchnorm_net().train()
    model[1].eval()
    before = {name: module.training for name, module in model.named_modules()}
    saliency_map(model, torch.rand(2, 3, 8, 8, dtype=torch.float64))
    assert {name: module.training for name, module in model.named_modules()} == before
    with pytest.raises(UPIError):
        saliency_map(model, torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 9]))
    assert {name: module.training for name, module in model.named_modules()} == before
    with evaluation_mode(model) as same:
        assert same is model
        assert not any(module.training for module in model.modules())
    assert {name: module.training for name, module in model.named_modules()} == before


def test_dropout_is_off_during_saliency() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(24, 3)).double().train()
    x = _batch(4)
    expected = model[2].weight.detach()[0].view(SHAPE).expand_as(x)
    torch.testing.assert_close(input_gradient(model, x, 0), expected)


@pytest.mark.parametrize("method", SALIENCY_METHODS)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(method: str, context) -> None:
    model = _softplus_cnn()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    kwargs = {"n_steps": 3, "n_samples": 2}
    classes = torch.tensor([0, 1])
    expected = saliency_map(model, x, None, method, generator=torch.Generator().manual_seed(0), **kwargs)
    expected_given = saliency_map(model, x, classes, method, generator=torch.Generator().manual_seed(0), **kwargs)
    with context():
        x_in_context = x.clone()  # an inference tensor under inference_mode
        generator = torch.Generator().manual_seed(0)
        maps = saliency_map(model, x_in_context, None, method, generator=generator, **kwargs)
        given = saliency_map(model, x_in_context, classes.clone(), method, generator=generator.manual_seed(0), **kwargs)
        differentiable = saliency_map(model, x_in_context, None, method, create_graph=True, **kwargs)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(given, expected_given)
    assert differentiable.requires_grad
    (param_grad,) = torch.autograd.grad(differentiable.square().sum(), model.features[0].weight)
    assert param_grad.abs().sum() > 0


# ---------------------------------------------------------------- normalization


def test_normalize_map_sums_to_one_and_keeps_zero_maps_zero() -> None:
    attr = torch.randn(3, 2, 5, 4, requires_grad=True)
    scaled = attr * torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1, 1)
    maps = normalize_map(scaled)
    assert maps.shape == (3, 5, 4)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.tensor([1.0, 0.0, 1.0]))
    assert (maps >= 0).all()
    assert (maps[1] == 0).all()
    (grad,) = torch.autograd.grad(maps.square().sum(), attr)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(maps[0], scaled[0].detach().abs().sum(0) / scaled[0].detach().abs().sum())


def test_smoothgrad_takes_given_noise_and_its_shared_noise_is_keyed_by_sample() -> None:
    model, x = Sine(), _batch(3)
    target = torch.tensor([1, 2, 0])
    noise = torch.randn((4, *x.shape), generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    drawn = attribution(model, x, target, "smoothgrad", n_samples=4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(attribution(model, x, target, "smoothgrad", n_samples=4, noise=noise), drawn)
    shared = smoothgrad_noise(x, target, 4)
    assert shared.shape == (4, *x.shape)
    order = torch.tensor([2, 0, 1])  # another batch order: each sample keeps its own draws
    torch.testing.assert_close(smoothgrad_noise(x[order], target[order], 4), shared[:, order])
    settings = SaliencySettings("smoothgrad", n_samples=4, sigma=0.2)
    expected = saliency_map(model, x, target, "smoothgrad", n_samples=4, sigma=0.2, noise=shared)
    torch.testing.assert_close(settings.maps(model, x, target), expected)
    copies = settings.maps(model, torch.cat([x, x]), target, clean=x)  # copies of a sample share its draws
    torch.testing.assert_close(copies, expected.repeat(2, 1, 1))
    assert SaliencySettings("smoothgrad").n_samples == SMOOTHGRAD_SAMPLES  # the default
    assert SaliencySettings("integrated_gradients", n_steps=3).method_kwargs() == {"n_steps": 3}
    with pytest.raises(UPIError, match="one class per image"):
        smoothgrad_noise(x, 1, 2)
    half = smoothgrad_noise(x.bfloat16(), target, 2)  # float32 draws, bfloat16 maps
    half_attr = attribution(Sine().to(torch.bfloat16), x.bfloat16(), target, "smoothgrad", n_samples=2, noise=half)
    assert half_attr.dtype == torch.bfloat16


# --------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "smoothgrad", "sigma": -0.1}, "sigma"),
        ({"method": "smoothgrad", "n_samples": 0}, "n_samples"),
        ({"method": "smoothgrad", "base_method": "smoothgrad"}, "base_method"),
        ({"method": "smoothgrad", "n_samples": 2, "noise": torch.zeros(3, 4, *SHAPE)}, "noise of shape"),
        ({"method": "integrated_gradients", "n_steps": 0}, "n_steps"),
        ({"method": "integrated_gradients", "baseline": torch.zeros(5, 5)}, "baseline"),
        ({"method": "occlusion"}, "saliency method"),
        ({"score": "loss"}, "score"),
        ({"target": torch.tensor([0, 1, 2])}, "shape"),
        ({"target": torch.tensor([0, 1, 2, 7])}, r"\[0, 5\)"),
        ({"target": torch.tensor([0.0, 1.0, 2.0, 3.0])}, "integer"),
        ({"target": torch.tensor([True, False, True, True])}, "integer"),
        ({"target": True}, "integer"),
        ({"target": torch.tensor([0, -1, 2, 3])}, ">= 0, got -1"),
        ({"target": 5}, r"\[0, 5\), got 5"),
        ({"internal_batch_size": 0}, "internal_batch_size"),
    ],
)
def test_invalid_arguments_raise_upi_error(kwargs: dict, message: str) -> None:
    with pytest.raises(UPIError, match=message):
        attribution(Linear(), _batch(), **kwargs)


def test_invalid_inputs_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        attribution(Linear(), torch.zeros(2, *SHAPE, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        normalize_map(torch.zeros(2, 3, 4))


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_stacked_methods_run_the_clean_forward_pass_only_to_find_the_target(method: str) -> None:
    model = SmallCNN((1, 8, 8), num_classes=4)
    batches: list[int] = []
    model.register_forward_hook(lambda module, args, output: batches.append(len(args[0])))
    x, target = torch.rand(3, 1, 8, 8), torch.tensor([0, 3, 1])
    options = {"n_samples": 2, "n_steps": 2, "noise": torch.randn(2, 3, 1, 8, 8) if method == "smoothgrad" else None}
    attribution(model, x, target, method, **options)
    assert batches == [6]  # the 2 x 3 stacked images, nothing else
    batches.clear()
    predicted = attribution(model, x, None, method, **options)
    assert batches == [3, 6]
    with torch.no_grad():
        classes = model(x).argmax(dim=1)
    torch.testing.assert_close(predicted, attribution(model, x, classes, method, **options))
    with pytest.raises(UPIError, match=r"lie in \[0, 4\)"):
        attribution(model, x, torch.tensor([0, 4, 1]), method, **options)


@pytest.mark.parametrize("method", ["gradient", "integrated_gradients", "smoothgrad"])
@pytest.mark.parametrize("target", [torch.tensor([0, 3, 1]), 2, None], ids=["classes", "int", "predicted"])
def test_maps_read_the_device_once_before_the_model_runs(method: str, target: Tensor | int | None) -> None:
    # A read after the forward pass would make a GPU idle while the host queues the backward pass.
    model = SmallCNN((1, 8, 8), num_classes=4)
    with HostReads().watch(model) as reads:
        attribution(model, torch.rand(3, 1, 8, 8), target, method, n_steps=2, n_samples=2)
    forwards = 2 if method != "gradient" and target is None else 1  # the stacked batch, and the clean one
    assert reads.events == ["tolist"] + ["forward"] * forwards

"""Tests of the UPI objective; also home of the tiny models and helpers shared by the attack tests."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upi_lightning.attacks.objective import OBJECTIVE_NOISE_SEED, UPIObjective, map_dissimilarity
from upi_lightning.errors import UPIError
from upi_lightning.perturbation import make_generator, random_on_sphere, sample_normal
from upi_lightning.saliency import common_noise, saliency_map


class QuadraticScore(nn.Module):
    r"""Logits :math:`f_c(x) = w_c^\top x + \tfrac12 a_c (u^\top x)^2` with a unit vector ``u``.

    The input gradient is :math:`w_c + a_c (u^\top x) u`, so the saliency map depends on ``x`` only
    through :math:`u^\top x`: the best universal perturbation of the map is :math:`\pm\varepsilon u`.
    The dropout on the logits is a trap: outside eval mode the maps would be random.
    """

    def __init__(self, shape: tuple[int, int, int] = (1, 8, 8), classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen = make_generator(seed)
        dim = math.prod(shape)
        self.w = nn.Parameter(0.3 * torch.randn(classes, dim, generator=gen))
        direction = torch.randn(dim, generator=gen)
        self.u = nn.Parameter(direction / direction.norm())
        self.a = nn.Parameter(torch.linspace(1.0, 3.0, classes))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        return self.drop(flat @ self.w.T + 0.5 * (flat @ self.u)[:, None] ** 2 * self.a)


class TinyCNN(nn.Module):
    """Conv-BatchNorm-ReLU-linear net with non-trivial BatchNorm statistics (eval mode matters)."""

    def __init__(self, shape: tuple[int, int, int] = (1, 6, 6), classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(shape[0], 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * shape[1] * shape[2], classes)
        with torch.no_grad():
            for _ in range(3):
                self(torch.rand(16, *shape))
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.act(self.norm(self.conv(x))).flatten(1))


def make_batches(
    n_batches: int,
    batch_size: int,
    shape: tuple[int, int, int] = (1, 8, 8),
    seed: int = 0,
    classes: int = 3,
    low: float = 0.3,
    high: float = 0.7,
) -> list[tuple[Tensor, Tensor]]:
    """Uniform images in ``[low, high]`` (no clipping for small perturbations) with random labels."""
    gen = make_generator(seed)
    return [
        (
            low + (high - low) * torch.rand(batch_size, *shape, generator=gen),
            torch.randint(0, classes, (batch_size,), generator=gen),
        )
        for _ in range(n_batches)
    ]


def snapshot(model: nn.Module) -> tuple[dict[str, Tensor], list[bool]]:
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def assert_untouched(model: nn.Module, before: tuple[dict[str, Tensor], list[bool]]) -> None:
    state, modes = before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


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
        assert map_dissimilarity(clean, clean, kind, k=3).abs().item() < 1e-6  # type: ignore[arg-type]
    zero = torch.zeros(1, 2, 2)
    assert torch.isfinite(map_dissimilarity(zero, zero, "topk_mass", k=1)).all()


@pytest.mark.parametrize("kind", ["l2", "topk_mass", "cosine"])
def test_map_dissimilarity_gradient_matches_finite_differences(kind: str) -> None:
    gen = make_generator(0)
    clean = torch.rand(3, 4, 4, generator=gen, dtype=torch.float64)
    perturbed = torch.rand(3, 4, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: map_dissimilarity(a, clean, kind, k=5), (perturbed,))  # type: ignore[arg-type]


def test_map_dissimilarity_and_objective_refuse_bad_settings() -> None:
    maps = torch.rand(2, 3, 3)
    with pytest.raises(UPIError, match="Unknown dissimilarity"):
        map_dissimilarity(maps, maps, "l1")  # type: ignore[arg-type]
    with pytest.raises(UPIError, match="top-k"):
        map_dissimilarity(maps, maps, "topk_mass", k=10)
    with pytest.raises(UPIError, match=r"\(N, H, W\)"):
        map_dissimilarity(maps, maps[:1], "l2")
    for bad in (
        {"sigma": -1.0},
        {"n_noise": 0},
        {"surrogate_beta": 0.0},
        {"keep_prediction": -1.0},
        {"method": "x"},
    ):
        with pytest.raises(UPIError, match="Invalid UPI objective"):
            UPIObjective(**bad)  # type: ignore[arg-type]


def test_objective_is_zero_with_zero_gradient_at_delta_zero() -> None:
    model = QuadraticScore()
    x, y = make_batches(1, 6)[0]
    delta = torch.zeros(1, 8, 8, requires_grad=True)
    values = UPIObjective(k=5).per_sample(model, x, y, delta)
    (grad,) = torch.autograd.grad(values.sum(), delta)
    assert torch.equal(values.detach(), torch.zeros(6))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_objective_value_and_gradient_match_an_independent_computation() -> None:
    model = QuadraticScore().double()
    x, y = make_batches(1, 4)[0]
    x = x.double()
    objective = UPIObjective(dissimilarity="cosine")
    start = 0.2 * random_on_sphere((1, 8, 8), "l2", 1.0, make_generator(1)).double()
    clean = saliency_map(model, x, y)
    expected = 1 - F.cosine_similarity(saliency_map(model, x + start, y).flatten(1), clean.flatten(1), dim=1)
    delta = start.clone().requires_grad_(True)
    values = objective.per_sample(model, x, y, delta)
    assert torch.allclose(values.detach(), expected, atol=1e-12)
    (grad,) = torch.autograd.grad(values.sum(), delta)
    direction = random_on_sphere((1, 8, 8), "l2", 1.0, make_generator(2)).double()
    h = 1e-5
    plus = objective.per_sample(model, x, y, start + h * direction).sum()
    minus = objective.per_sample(model, x, y, start - h * direction).sum()
    assert math.isclose(((plus - minus) / (2 * h)).item(), (grad * direction).sum().item(), rel_tol=1e-4)


def test_smoothing_averages_the_stacked_noise_draws() -> None:
    model = QuadraticScore()
    x, y = make_batches(1, 3)[0]
    delta = 0.1 * random_on_sphere((1, 8, 8), "l2", 1.0, make_generator(3))
    objective = UPIObjective(sigma=0.05, n_noise=4)
    values = objective.per_sample(model, x, y, delta, generator=make_generator(5))
    noise = sample_normal(x, y, 4, make_generator(5))
    clean = saliency_map(model, x, y)
    draws = [(saliency_map(model, (x + delta + 0.05 * z).clamp(0, 1), y) - clean).flatten(1).norm(dim=1) for z in noise]
    assert torch.allclose(values, torch.stack(draws).mean(dim=0), atol=1e-6)


def test_smoothgrad_objective_shares_each_sample_s_map_noise_across_its_copies() -> None:
    model = QuadraticScore()
    x, y = make_batches(1, 3)[0]
    smoothgrad = {"method": "smoothgrad", "method_kwargs": {"n_samples": 3, "sigma": 0.2}}
    assert torch.equal(UPIObjective(**smoothgrad).per_sample(model, x, y, torch.zeros(1, 8, 8)), torch.zeros(3))
    delta = 0.1 * random_on_sphere((1, 8, 8), "l2", 1.0, make_generator(3))
    objective = UPIObjective(sigma=0.05, n_noise=2, **smoothgrad)
    values = objective.per_sample(model, x, y, delta, generator=make_generator(5))
    kwargs = common_noise(x, y, "smoothgrad", smoothgrad["method_kwargs"], OBJECTIVE_NOISE_SEED)  # per sample
    clean = saliency_map(model, x, y, "smoothgrad", **kwargs)
    draws = [
        (saliency_map(model, (x + delta + 0.05 * z).clamp(0, 1), y, "smoothgrad", **kwargs) - clean).flatten(1)
        for z in sample_normal(x, y, 2, make_generator(5))
    ]
    assert torch.allclose(values, torch.stack([d.norm(dim=1) for d in draws]).mean(dim=0), atol=1e-6)
    assert not torch.equal(kwargs["noise"], common_noise(x, y, "smoothgrad", {"n_samples": 3})["noise"])  # not eval's


def test_keep_prediction_subtracts_the_cross_entropy_increase() -> None:
    model = QuadraticScore()
    x, y = make_batches(1, 8)[0]
    delta = random_on_sphere((1, 8, 8), "l2", 0.5, make_generator(4))
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
    delta = random_on_sphere((1, 6, 6), "l2", 0.5, make_generator(6)).requires_grad_(True)
    (relu_grad,) = torch.autograd.grad(UPIObjective().per_sample(model, x, y, delta).sum(), delta)
    assert torch.equal(relu_grad, torch.zeros_like(relu_grad))
    smooth = UPIObjective(surrogate_beta=5.0)
    (smooth_grad,) = torch.autograd.grad(smooth.per_sample(model, x, y, delta).sum(), delta)
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
    delta = random_on_sphere((1, 8, 8), "l2", 0.3, make_generator(7))
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
        values = objective.per_sample(model, x, y, variable, straight_through=straight_through)
        assert torch.allclose(values.detach(), expected.detach(), atol=1e-12)
        (grads[straight_through],) = torch.autograd.grad(values.sum(), variable)
    torch.testing.assert_close(grads[True], expected_grad, rtol=1e-9, atol=1e-12)
    assert torch.equal(grads[False][outside], torch.zeros_like(grads[False][outside]))
    assert torch.equal(grads[False][~outside], grads[True][~outside])
    assert (grads[True][outside] != 0).all()

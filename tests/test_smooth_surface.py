"""SSR against a brute-force eigenvalue of the d x d input Fisher matrix, and finite differences."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.regularizer_helpers import (
    assert_config_rebuilds,
    assert_every_parameter_gets_a_gradient,
    assert_plain_cross_entropy,
    data,
    linear_model,
    loss_and_grads,
    softplus_model,
    training_batch,
)
from upi_lightning.errors import UPIError
from upi_lightning.regularizers import SSR_WEIGHT, SmoothSurfaceRegularization, input_fisher_top_eigenvalue


def brute_force_top_eigenvalues(model: nn.Module, x: Tensor) -> Tensor:
    """``lambda_max(J^T (diag p - p p^T) J)`` of each sample from its ``K x d`` Jacobian, as a ``d x d`` matrix."""
    tops = []
    for sample in x:
        jacobian = torch.autograd.functional.jacobian(lambda image: model(image[None])[0], sample, create_graph=True)
        jacobian = jacobian.flatten(1).double()  # (K, d)
        p = model(sample[None])[0].softmax(dim=0).double()
        fisher = jacobian.T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian
        tops.append(torch.linalg.eigvalsh(fisher)[-1])
    return torch.stack(tops).float()


@pytest.mark.parametrize("make_model", [linear_model, softplus_model])
def test_the_term_is_the_top_eigenvalue_of_the_input_fisher_matrix(make_model: Callable[[], nn.Module]) -> None:
    model, (x, y) = make_model(), data()
    regularizer = SmoothSurfaceRegularization(weight=0.7)
    loss, grads = loss_and_grads(model, training_batch(model, x, y), regularizer)
    expected = F.cross_entropy(model(x), y) + 0.7 * brute_force_top_eigenvalues(model, x).mean()
    torch.testing.assert_close(loss, expected)
    assert_every_parameter_gets_a_gradient(grads)
    for grad, reference in zip(grads, torch.autograd.grad(expected, list(model.parameters())), strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)
    term = (loss - F.cross_entropy(model(x), y)).item()
    assert float(regularizer.diagnostics()["lambda_max"]) == pytest.approx(term / 0.7, rel=1e-5)


def test_the_parameter_gradient_matches_finite_differences() -> None:
    # an oracle independent of autograd through eigvalsh: central differences in float64
    model, (x, _) = softplus_model(), data(n=3)
    model.double()
    weight = model[1].weight

    def term(first_layer: Tensor) -> Tensor:
        with torch.no_grad():
            weight.copy_(first_layer)
        image = x.double().requires_grad_(True)
        return input_fisher_top_eigenvalue(model(image).log_softmax(dim=1), image).sum()

    original = weight.detach().clone()
    analytic = torch.autograd.grad(term(original), weight)[0]
    index = [(0, 0), (3, 7), (7, 15)]
    for row, column in index:
        step = torch.zeros_like(original)
        step[row, column] = 1e-6
        numeric = (term(original + step) - term(original - step)) / 2e-6
        torch.testing.assert_close(analytic[row, column], numeric.detach(), rtol=1e-5, atol=1e-8)


def test_saturated_softmax_gives_finite_values_and_gradients() -> None:
    # logits 1e3 apart: p underflows to exactly 0 for the other classes, where sqrt(p)'s derivative is infinite
    model, (x, y) = linear_model(), data()
    with torch.no_grad():
        model[1].weight.mul_(1e4)
    batch = training_batch(model, x, y)
    assert bool((batch.logits.softmax(dim=1) == 0).any())
    loss, grads = loss_and_grads(model, batch, SmoothSurfaceRegularization())
    assert torch.isfinite(loss)
    assert_every_parameter_gets_a_gradient(grads)


def test_a_relu_network_gets_a_gradient_from_the_term() -> None:
    # first order in J: the term of a ReLU network moves its weights (unlike a second-order penalty)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = data()
    batch = training_batch(model, x, y)
    term = SmoothSurfaceRegularization(weight=1.0)(batch)
    grads = torch.autograd.grad(term, list(model.parameters()), allow_unused=True)
    assert all(grad is not None for grad in grads[:2]) and grads[0].abs().sum() > 0


def test_weight_zero_is_plain_cross_entropy() -> None:
    model, (x, y) = softplus_model(), data()
    assert_plain_cross_entropy(model, x, y, SmoothSurfaceRegularization(weight=0.0))


def test_the_default_is_the_authors_weighting_and_configs_rebuild_the_mode() -> None:
    assert SmoothSurfaceRegularization().weight == pytest.approx(0.3 * 0.3 / 0.7) == SSR_WEIGHT
    for candidate in (SmoothSurfaceRegularization(), SmoothSurfaceRegularization(2.5)):
        assert_config_rebuilds(candidate)
        assert candidate.state_dict() == {}


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf")])
def test_bad_weights_are_refused(weight: float) -> None:
    with pytest.raises(UPIError, match="SmoothSurfaceRegularization weight must be a finite number >= 0"):
        SmoothSurfaceRegularization(weight)

"""IG-NORM and IG-SUM-NORM against hand computations on a linear model (closed-form loss gradients)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.regularizer_helpers import (
    CLASSES,
    assert_config_rebuilds,
    assert_every_parameter_gets_a_gradient,
    data,
    linear_model,
    loss_and_grads,
    training_batch,
)
from upi_lightning.attribution import attribution
from upi_lightning.errors import UPIError
from upi_lightning.regularizers import IGNorm, IGSumNorm, ig_loss_l1
from upi_lightning.threat import threat_model


def linear_ig_l1(model: nn.Sequential, x: Tensor, x_adv: Tensor, y: Tensor, m: int) -> Tensor:
    """||IG_CE(x, x')||_1 per sample by hand: (x' - x) * mean_k W^T (softmax(W z_k + b) - onehot(y)), midpoints z_k."""
    weight, bias = model[1].weight, model[1].bias
    span = (x_adv - x).flatten(1)
    alphas = (torch.arange(m, dtype=x.dtype) + 0.5) / m
    points = x.flatten(1)[None] + alphas[:, None, None] * span[None]  # (m, N, 16)
    loss_gradients = ((points @ weight.T + bias).softmax(dim=-1) - F.one_hot(y, CLASSES)) @ weight
    return (span * loss_gradients.mean(dim=0)).abs().sum(dim=1)


def linear_ce(model: nn.Sequential, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(x.flatten(1) @ model[1].weight.T + model[1].bias, y, reduction="none")


def one_pgd_step(objective: Callable[[Tensor], Tensor], x: Tensor, start: Tensor, eps: float, step: float, norm: str):
    """PGD's single step from the random start, written out: sign step (Linf) or normalized step and rescale (L2)."""
    delta = start.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(x + delta).sum(), delta)
    if norm == "linf":
        delta = (start + step * grad.sign()).clamp(-eps, eps)
    else:
        moved = start + step * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = moved * (eps / moved.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
    return (x + delta).clamp(0, 1).detach()


def test_ig_of_the_loss_matches_the_riemann_sum_and_is_complete() -> None:
    model, (x, y) = linear_model(), data()
    x_adv = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = linear_ig_l1(model, x, x_adv, y, 6)
    torch.testing.assert_close(ig_loss_l1(model, x, x_adv, y, 6), expected)
    # completeness: IG of log p_y = -CE from x to x' sums to CE(x) - CE(x') (up to the Riemann error)
    ig = attribution(model, x_adv, y, "integrated_gradients", score="log_probability", n_steps=256, baseline=x)
    change = linear_ce(model, x, y) - linear_ce(model, x_adv, y)
    torch.testing.assert_close(ig.flatten(1).sum(dim=1), change.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("cls", [IGNorm, IGSumNorm])
def test_ig_modes_match_a_hand_computation(cls: type[IGNorm], norm: str) -> None:
    # one PGD step of 0.2 from a random start of the ball, 4 IG points in the attack, 8 in the term; the
    # images lie in [0.2, 0.8] and every coordinate of delta in [-0.15, 0.15]: the box [0, 1] is inactive
    model, (x, y) = linear_model(), data()
    eps = 0.1 if norm == "linf" else 0.15
    regularizer = cls(weight=0.7, norm=norm, eps=eps, steps=1, step_size=0.2, ig_steps=8, attack_ig_steps=4)
    torch.manual_seed(11)
    loss, grads = loss_and_grads(model, training_batch(model, x, y), regularizer)
    torch.manual_seed(11)
    start = threat_model(norm, eps).random_start(tuple(x.shape), per_sample=True)

    def objective(x_adv: Tensor) -> Tensor:
        value = linear_ig_l1(model, x, x_adv, y, 4)
        return linear_ce(model, x_adv, y) + 0.7 * value if cls is IGSumNorm else value

    x_adv = one_pgd_step(objective, x, start, eps, 0.2, norm)
    with torch.no_grad():
        clean = linear_ce(model, x, y).mean()
        adversarial = linear_ce(model, x_adv, y).mean() if cls is IGSumNorm else clean
        expected = adversarial + 0.7 * linear_ig_l1(model, x, x_adv, y, 8).mean()
    torch.testing.assert_close(loss, expected)
    assert_every_parameter_gets_a_gradient(grads)


def test_the_ig_term_has_the_parameter_gradient_of_finite_differences() -> None:
    model = linear_model().double()
    x, y = data()
    x = x.double()
    x_adv = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def term() -> Tensor:
        return ig_loss_l1(model, x, x_adv, y, 8).mean()

    analytic = torch.autograd.grad(term(), list(model.parameters()))
    step = 1e-6
    for parameter, gradient in zip(model.parameters(), analytic, strict=True):
        numeric = torch.zeros_like(parameter)
        with torch.no_grad():
            for index in range(parameter.numel()):
                entry = parameter.view(-1)[index : index + 1]
                entry += step
                plus = term()
                entry -= 2 * step
                minus = term()
                entry += step
                numeric.view(-1)[index] = (plus - minus) / (2 * step)
        torch.testing.assert_close(gradient, numeric, rtol=1e-6, atol=1e-8)


def test_the_paper_weights_are_the_defaults_and_configs_rebuild_the_modes() -> None:
    assert IGNorm().weight == 1.0 and IGSumNorm().weight == 0.1
    assert (IGNorm().ig_steps, IGNorm().attack_ig_steps, IGNorm().norm) == (50, 10, "linf")
    for regularizer in (IGNorm(), IGSumNorm(), IGNorm(0.5, norm="l2", eps=1.5, steps=7, step_size=0.5, ig_steps=9)):
        assert_config_rebuilds(regularizer)
        assert regularizer.state_dict() == {}


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: IGNorm(weight=-1.0), "IGNorm weight must be"),
        (lambda: IGSumNorm(weight=float("nan")), "IGSumNorm weight must be"),
        (lambda: IGNorm(ig_steps=0), "ig_steps must be"),
        (lambda: IGSumNorm(attack_ig_steps=2.5), "attack_ig_steps must be"),
        (lambda: IGNorm(steps=0), "steps must be"),
        (lambda: IGNorm(step_size=0.0), "step_size must be"),
        (lambda: IGNorm(norm="l1"), "Unknown norm"),
        (lambda: IGSumNorm(eps=0.0), "eps"),
    ],
)
def test_bad_settings_are_refused(factory: Callable[[], object], message: str) -> None:
    with pytest.raises(UPIError, match=message):
        factory()

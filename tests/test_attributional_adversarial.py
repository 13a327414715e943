"""Attributional adversarial training against the closed-form gradients and IG of a softplus network."""

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
    assert_plain_cross_entropy,
    data,
    loss_and_grads,
    softplus_input_gradient,
    softplus_model,
    training_batch,
)
from upi_lightning.errors import UPIError
from upi_lightning.regularizers import AttributionalAdversarial


def hand_map(model: nn.Sequential, x: Tensor, y: Tensor, method: str, n_steps: int) -> Tensor:
    """True-class logit gradient, or its IG from the black baseline: x * mean_k g((k - 1/2) / m * x)."""
    true_class = F.one_hot(y, CLASSES).float()
    if method == "gradient":
        return softplus_input_gradient(model, x, true_class)
    alphas = (torch.arange(n_steps) + 0.5) / n_steps
    return x * torch.stack([softplus_input_gradient(model, alpha * x, true_class) for alpha in alphas]).mean(dim=0)


@pytest.mark.parametrize("weight", [0.5, 1.0])
@pytest.mark.parametrize("method", ["gradient", "integrated_gradients"])
def test_attributional_adversarial_matches_a_hand_computation(method: str, weight: float) -> None:
    # one PGD step of 0.2 >= eps from x itself lands on x + eps * sign(grad_x CE); x in [0.2, 0.8] stays in the box
    model, (x, y) = softplus_model(), data()
    regularizer = AttributionalAdversarial(
        weight=weight, l_cos=0.6, method=method, n_steps=4, eps=0.1, steps=1, step_size=0.2, random_start=False
    )
    loss, grads = loss_and_grads(model, training_batch(model, x, y), regularizer)
    with torch.no_grad():
        ce_gradient = softplus_input_gradient(model, x, model(x).softmax(dim=1) - F.one_hot(y, CLASSES))
    x_adv = x + 0.1 * ce_gradient.sign()
    clean, adversarial = (hand_map(model, z, y, method, 4).flatten(1) for z in (x, x_adv))
    cosine = F.cosine_similarity(clean, adversarial, dim=1).mean()
    ce = F.cross_entropy(model(x), y)
    expected = ce + weight * (F.cross_entropy(model(x_adv), y) - ce) + 0.6 * (1 - cosine)
    torch.testing.assert_close(loss, expected)
    assert_every_parameter_gets_a_gradient(grads)
    for grad, reference in zip(grads, torch.autograd.grad(expected, list(model.parameters())), strict=True):
        torch.testing.assert_close(grad, reference)


def test_with_zero_weights_it_is_plain_cross_entropy() -> None:
    model, (x, y) = softplus_model(), data()
    regularizer = AttributionalAdversarial(weight=0.0, l_cos=0.0, eps=0.1, steps=2)
    assert_plain_cross_entropy(model, x, y, regularizer)


def test_configs_rebuild_the_mode() -> None:
    for regularizer in (
        AttributionalAdversarial(),
        AttributionalAdversarial(0.5, 2.0, "integrated_gradients", 8, "l2", 1.5, 7, 0.5, False),
    ):
        assert_config_rebuilds(regularizer)
        assert regularizer.state_dict() == {}


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: AttributionalAdversarial(weight=1.5), r"AttributionalAdversarial weight is .* in \[0, 1\]"),
        (lambda: AttributionalAdversarial(l_cos=-1.0), "l_cos must be"),
        (lambda: AttributionalAdversarial(method="smoothgrad"), "Unknown AttributionalAdversarial method"),
        (lambda: AttributionalAdversarial(n_steps=0), "n_steps must be"),
        (lambda: AttributionalAdversarial(steps=0), "steps must be"),
        (lambda: AttributionalAdversarial(norm="l1"), "Unknown norm"),
    ],
)
def test_bad_settings_are_refused(factory: Callable[[], object], message: str) -> None:
    with pytest.raises(UPIError, match=message):
        factory()

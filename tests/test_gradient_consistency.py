"""Gradient consistency against the closed-form input gradients of a softplus network and a linear model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from tests.regularizer_helpers import (
    CLASSES,
    assert_config_rebuilds,
    assert_every_parameter_gets_a_gradient,
    assert_plain_cross_entropy,
    data,
    linear_model,
    loss_and_grads,
    softplus_input_gradient,
    softplus_model,
    training_batch,
)
from upi_lightning.errors import UPIError
from upi_lightning.regularizers import GradientConsistency
from upi_lightning.threat import threat_model


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("detach_clean", [True, False])
def test_gradient_consistency_matches_a_hand_computation(detach_clean: bool, norm: str) -> None:
    model, (x, y) = softplus_model(), data()
    eps = 0.05 if norm == "linf" else 0.2  # x in [0.2, 0.8]: the noisy copies stay in the box
    regularizer = GradientConsistency(l_2=0.3, l_cos=0.4, norm=norm, eps=eps, detach_clean=detach_clean)
    torch.manual_seed(3)
    loss, grads = loss_and_grads(model, training_batch(model, x, y), regularizer)
    torch.manual_seed(3)
    noise = threat_model(norm, eps).random_start(tuple(x.shape), per_sample=True)
    # the closed form, differentiated w.r.t. the parameters by autograd: g = W1^T (sigmoid(beta(W1 x + b1)) * W2[y])
    true_class = F.one_hot(y, CLASSES).float()
    clean = softplus_input_gradient(model, x, true_class).flatten(1)
    clean = clean.detach() if detach_clean else clean
    noisy = softplus_input_gradient(model, x + noise, true_class).flatten(1)
    cosine = F.cosine_similarity(clean, noisy, dim=1).mean()
    term = 0.3 * (clean - noisy).pow(2).sum(dim=1).mean() + 0.4 * (1 - cosine) / 2
    expected = F.cross_entropy(model(x), y) + term
    torch.testing.assert_close(loss, expected)
    assert_every_parameter_gets_a_gradient(grads)
    for grad, reference in zip(grads, torch.autograd.grad(expected, list(model.parameters())), strict=True):
        torch.testing.assert_close(grad, reference)


def test_a_linear_model_has_consistent_gradients_and_pays_nothing() -> None:
    # g(x) = W_y everywhere: both distances vanish, and the loss and its gradient are the cross-entropy's
    model, (x, y) = linear_model(), data()
    assert_plain_cross_entropy(model, x, y, GradientConsistency(l_2=5.0, l_cos=5.0, eps=0.1))


def test_the_defaults_are_the_papers_and_configs_rebuild_the_mode() -> None:
    regularizer = GradientConsistency()
    assert (regularizer.l_2, regularizer.l_cos, regularizer.norm) == (0.01, 0.1, "linf")
    assert regularizer.eps == pytest.approx(4 / 255, abs=1e-7) and regularizer.detach_clean
    for candidate in (regularizer, GradientConsistency(0.5, 0.0, norm="l2", eps=0.3, detach_clean=False)):
        assert_config_rebuilds(candidate)
        assert candidate.state_dict() == {}


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: GradientConsistency(l_2=-0.1), "l_2 must be"),
        (lambda: GradientConsistency(l_cos=float("inf")), "l_cos must be"),
        (lambda: GradientConsistency(norm="l1"), "Unknown norm"),
        (lambda: GradientConsistency(eps=0.0), "eps"),
    ],
)
def test_bad_settings_are_refused(factory: Callable[[], object], message: str) -> None:
    with pytest.raises(UPIError, match=message):
        factory()


def test_the_noisy_copy_lies_in_the_ball_and_the_box() -> None:
    x = torch.rand(64, 1, 4, 4)
    noisy = GradientConsistency(eps=0.1).noisy_copy(x)
    assert noisy.requires_grad and noisy.is_leaf
    assert noisy.min() >= 0 and noisy.max() <= 1 and (noisy - x).abs().max() <= 0.1
    inside = (x > 0.1) & (x < 0.9)  # away from the box's faces the noise is uniform on [-0.1, 0.1]
    spread = (noisy - x)[inside]
    assert spread.min() < -0.08 and spread.max() > 0.08

"""Tiny models, data and checks shared by the training-mode tests (``upi_lightning.regularizers``).

Like ``helpers.py`` (which holds the attack tests' helpers), test modules import from here, never from
one another. The models have closed-form input gradients:

* ``linear_model``: logits ``W x + b``, input gradient of ``sum_c v_c z_c`` is ``W^T v``;
* ``softplus_model``: ``W2 softplus_beta(W1 x + b1) + b2``, gradient ``W1^T (sigmoid(beta (W1 x + b1)) * W2^T v)``
  (:func:`softplus_input_gradient`), which depends on ``x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upi_lightning.regularizers import Regularizer, TrainingBatch, build_regularizers, regularizer_from_config

SHAPE = (1, 4, 4)
"""``(C, H, W)`` of the tiny images."""

CLASSES = 3


def linear_model(seed: int = 0) -> nn.Sequential:
    """Logits ``W x + b`` of flattened 1 x 4 x 4 images."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, CLASSES))


def softplus_model(seed: int = 0, beta: float = 5.0) -> nn.Sequential:
    """``W2 softplus_beta(W1 x + b1) + b2``: its input gradient depends on ``x`` (unlike a linear model's)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Softplus(beta=beta), nn.Linear(8, CLASSES))


def softplus_input_gradient(model: nn.Sequential, x: Tensor, logit_weights: Tensor) -> Tensor:
    """Hand-derived ``grad_x sum_c v_c z_c(x)`` of :func:`softplus_model`, shaped like ``x``.

    ``logit_weights`` ``v`` is ``(N, CLASSES)``: ``one_hot(y)`` gives the true-class logit gradient,
    ``softmax(z) - one_hot(y)`` the cross-entropy gradient.
    """
    first, activation, last = model[1], model[2], model[3]
    pre = x.flatten(1) @ first.weight.T + first.bias
    return ((torch.sigmoid(activation.beta * pre) * (logit_weights @ last.weight)) @ first.weight).view_as(x)


def data(n: int = 6, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Images uniform in ``[0.2, 0.8]`` (small perturbations stay in the box) and random labels."""
    generator = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(n, *SHAPE, generator=generator)
    return x, torch.randint(CLASSES, (n,), generator=generator)


def training_batch(model: nn.Module, x: Tensor, y: Tensor) -> TrainingBatch:
    """What the classifier builds: the clean training-mode forward pass on images that require grad."""
    model.train()
    x = x.clone().requires_grad_(True)
    logits = model(x)
    return TrainingBatch(model, x, y, logits, F.cross_entropy(logits, y, reduction="none"))


def loss_and_grads(model: nn.Module, batch: TrainingBatch, regularizer: Regularizer) -> tuple[Tensor, list[Tensor]]:
    """Total loss ``CE + R`` and its gradient w.r.t. every parameter (None if a parameter is unused)."""
    loss = batch.ce.mean() + regularizer(batch)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return loss, list(grads)


def assert_plain_cross_entropy(model: nn.Module, x: Tensor, y: Tensor, regularizer: Regularizer) -> None:
    """``CE + R`` of the batch and its parameter gradients are the plain cross-entropy's: ``R`` pays nothing."""
    loss, grads = loss_and_grads(model, training_batch(model, x, y), regularizer)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    plain = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for grad, expected in zip(grads, plain, strict=True):
        torch.testing.assert_close(grad, expected)


def assert_every_parameter_gets_a_gradient(grads: list[Tensor | None]) -> None:
    """Every gradient exists and is finite (DDP fails on unused parameters)."""
    assert all(grad is not None and bool(torch.isfinite(grad).all()) for grad in grads)


def assert_config_rebuilds(regularizer: Regularizer) -> None:
    """``config()`` is the package path plus init args that rebuild an equal regularizer."""
    config = regularizer.config()
    # the package path configs name and checkpoints hold, not the path of the defining submodule
    assert config["class_path"] == f"upi_lightning.regularizers.{type(regularizer).__name__}"
    rebuilt = regularizer_from_config(config)
    assert type(rebuilt) is type(regularizer) and rebuilt.config() == config
    assert build_regularizers([regularizer, config])[0] is regularizer

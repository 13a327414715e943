r"""Gradient consistency under small noise (Joo et al., AAAI 2023): a geometric regularizer of the maps.

.. math::

    R = \frac{l_2}{N} \sum_i \|g(x_i) - g(\tilde x_i)\|_2^2
        + \frac{l_{cos}}{2} \Big(1 - \frac1N \sum_i \cos\big(g(x_i), g(\tilde x_i)\big)\Big),

with :math:`g(x) = \nabla_x z_y(x)` the true-class logit gradient and
:math:`\tilde x_i = \mathrm{clip}(x_i + u_i)`, :math:`u_i` uniform in a small ball (the box, in the paper).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from upi_lightning.regularizers.base import (
    BallRegularizer,
    TrainingBatch,
    check_weight,
    per_sample_squared_norm,
    true_class_input_gradient,
)
from upi_lightning.threat import Norm, apply_perturbation, threat_model


class GradientConsistency(BallRegularizer):
    r"""Gradient consistency (Joo et al. 2023): the maps of ``x`` and of a noisy copy must agree.

    .. math::

        R = \frac{l_2}{N} \sum_i \|g(x_i) - g(\tilde x_i)\|_2^2
            + \frac{l_{cos}}{2} \Big(1 - \frac1N \sum_i \cos\big(g(x_i), g(\tilde x_i)\big)\Big),
        \qquad g(x) = \nabla_x z_y(x),

    with :math:`\tilde x_i = \mathrm{clip}(x_i + u_i)` and :math:`u_i` drawn uniformly from the ``eps``-ball
    (``linf``: the paper's box; ``l2`` also works) by the global random generator. ``g(x)`` comes from the
    shared clean forward pass, ``g(x~)`` from a training-mode forward pass of the noisy copy, both with
    one ``autograd.grad``; with ``detach_clean`` (the authors' default) ``g(x)`` is a fixed target and only
    ``g(x~)`` is differentiated. The L2 term alone can be met by shrinking the gradients: the cosine term
    is scale-free.

    Why this geometric regularizer rather than SSR (Wang et al. 2020, the largest eigenvalue of
    :math:`J^\top (\mathrm{diag}\,p - p p^\top) J`): both are first order in the input gradient, so both
    train ReLU networks, but this one needs the true-class gradient at two points, one double backprop
    per batch whatever the number of classes, while SSR needs the logits' whole input Jacobian ``J``,
    one backward pass per class (10 on CIFAR-10, 200 on Tiny-ImageNet), and an eigenvalue on top.

    Args:
        l_2: weight of the squared L2 distance (CIFAR-10 ResNet-18 in the paper: 0.01).
        l_cos: weight of the cosine distance (paper: 0.1).
        norm: ball of the noise, ``"linf"`` (the paper's box) or ``"l2"``.
        eps: radius of the noise (pixel units; paper: 4/255).
        detach_clean: keep ``g(x)`` out of the parameter gradient (the authors' default).
    """

    name = "gradient_consistency"
    needs_input_grad = True

    def __init__(
        self,
        l_2: float = 0.01,
        l_cos: float = 0.1,
        norm: Norm = "linf",
        eps: float = 0.0156863,
        detach_clean: bool = True,
    ) -> None:
        self.l_2 = check_weight("GradientConsistency l_2", l_2)
        self.l_cos = check_weight("GradientConsistency l_cos", l_cos)
        self.threat = threat_model(norm, eps)
        self.detach_clean = detach_clean

    def noisy_copy(self, x: Tensor) -> Tensor:
        r""":math:`\mathrm{clip}(x + u)`, ``u`` uniform in the ball (one draw per sample), a leaf requiring grad."""
        noise = self.threat.random_start(tuple(x.shape), device=x.device, per_sample=True)
        return apply_perturbation(x.detach(), noise.to(x.dtype)).requires_grad_(True)

    def __call__(self, batch: TrainingBatch) -> Tensor:
        clean = true_class_input_gradient(batch.logits, batch.x, batch.y, create_graph=not self.detach_clean)
        x_noisy = self.noisy_copy(batch.x)
        noisy = true_class_input_gradient(batch.model(x_noisy), x_noisy, batch.y)
        distance = per_sample_squared_norm(clean - noisy).mean()
        cosine = F.cosine_similarity(clean.flatten(1), noisy.flatten(1), dim=1).mean()
        return self.l_2 * distance + self.l_cos * (1 - cosine) / 2

r"""Double backprop (Ross & Doshi-Velez 2018): penalize the input gradient of the cross-entropy.

.. math::

    R = \frac{\lambda}{2} \frac1N \sum_i \|\nabla_{x_i} \mathrm{CE}(f(x_i), y_i)\|_2^2
"""

from __future__ import annotations

import torch
from torch import Tensor

from upi_lightning.regularizers.base import Regularizer, TrainingBatch, check_weight, per_sample_squared_norm


class InputGradientNorm(Regularizer):
    r"""Double backprop (Ross & Doshi-Velez 2018): the squared input-gradient norm of the cross-entropy.

    :math:`R = \frac{\lambda}{2} \frac1N \sum_i \|\nabla_{x_i} \mathrm{CE}(f(x_i), y_i)\|_2^2`.

    The input gradients come from one ``autograd.grad`` of the summed cross-entropy of the clean
    forward pass, with ``create_graph=True`` so the term is differentiable w.r.t. the parameters.

    Args:
        weight: ``lambda >= 0`` (``0`` gives plain cross-entropy training).
    """

    name = "input_gradient_norm"
    needs_input_grad = True

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = check_weight("InputGradientNorm weight", weight)

    def __call__(self, batch: TrainingBatch) -> Tensor:
        (grad,) = torch.autograd.grad(batch.ce.sum(), batch.x, create_graph=True)
        return 0.5 * self.weight * per_sample_squared_norm(grad).mean()

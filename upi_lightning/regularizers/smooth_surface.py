r"""Smooth surface regularization (SSR, Wang et al. 2020): flatten the loss surface in input space.

.. math::

    R = \frac{w}{N} \sum_i \lambda_{\max}\big(J_i^\top (\mathrm{diag}\, p_i - p_i p_i^\top) J_i\big),

with :math:`J_i` the ``K x d`` input Jacobian of sample ``i``'s logits and :math:`p_i` its softmax: the
largest curvature of the cross-entropy's Gauss-Newton Hessian w.r.t. the input, which bounds how far
the input gradient (the saliency map) can turn within a small ball ("Smoothed Geometry for Robust
Attribution", NeurIPS 2020).
"""

from __future__ import annotations

import torch
from torch import Tensor

from upi_lightning.regularizers.base import Regularizer, TrainingBatch, check_weight

SSR_WEIGHT = 0.3 * 0.3 / (1 - 0.3)
"""The authors' ``(1 - a) CE + a s lambda`` with ``a = s = 0.3`` (their scripts), rescaled to ``CE + w lambda``."""


def input_fisher_top_eigenvalue(log_probs: Tensor, x: Tensor, create_graph: bool = True) -> Tensor:
    r"""Return :math:`\lambda_{\max}(J_i^\top (\mathrm{diag}\, p_i - p_i p_i^\top) J_i)` of every sample, ``(N,)``.

    With :math:`u_{ic} = \nabla_{x_i} \log p_{ic}` (``K`` backward passes of the summed class log-probabilities,
    so the per-sample identity needs eval-mode independence of the samples, or holds for the batch-level
    loss under training-mode BatchNorm), the matrix is the input Fisher information
    :math:`F_i = J_i^\top (\mathrm{diag}\, p_i - p_i p_i^\top) J_i = \sum_c p_{ic} u_{ic} u_{ic}^\top`
    (``d x d``). Its nonzero eigenvalues are those of the ``K x K`` matrix
    :math:`S_i = P_i^{1/2} U_i U_i^\top P_i^{1/2}` (``U_i`` the rows :math:`u_{ic}`,
    :math:`P_i = \mathrm{diag}\, p_i`), whose largest one comes from ``eigvalsh``: its gradient
    :math:`v v^\top` needs no eigenvalue gaps, so degenerate spectra stay finite. :math:`\sqrt{p}` is
    :math:`\exp(\tfrac12 \log p)`, finite where ``p`` underflows to 0.

    Args:
        log_probs: ``(N, K)`` log-softmax of logits computed from ``x``.
        x: the images ``(N, ...)`` (requiring grad) that ``log_probs`` was computed from.
        create_graph: keep the result differentiable w.r.t. the parameters (double backprop).
    """
    rows = [
        torch.autograd.grad(log_probs[:, c].sum(), x, create_graph=create_graph, retain_graph=True)[0].flatten(1)
        for c in range(log_probs.shape[1])
    ]
    u = torch.stack(rows, dim=1)  # (N, K, d)
    root_p = (0.5 * log_probs).exp()
    s = root_p[:, :, None] * (u @ u.transpose(1, 2)) * root_p[:, None, :]
    return torch.linalg.eigvalsh(s.double())[:, -1].to(log_probs.dtype)


class SmoothSurfaceRegularization(Regularizer):
    r"""SSR (Wang et al. 2020): the largest input curvature of the cross-entropy, averaged over the batch.

    :math:`R = \frac{w}{N} \sum_i \lambda_{\max}\big(J_i^\top (\mathrm{diag}\, p_i - p_i p_i^\top) J_i\big)`
    (:func:`input_fisher_top_eigenvalue`), from the shared clean training-mode forward pass: ``K`` input
    gradients with ``create_graph`` (one per class) and the backward through them, about ``1 + 2K``
    forward+backward units a step. First order in ``J``, so it trains ReLU networks. The authors'
    ``(1 - a) CE + a s lambda`` is ``CE + w lambda`` with ``w = a s / (1 - a)`` (their scripts:
    ``a = s = 0.3``, :data:`SSR_WEIGHT`); their ``J`` averages the gradient over color channels, this one
    is the full input Jacobian.

    Args:
        weight: ``w >= 0`` (``0`` gives plain cross-entropy training).
    """

    name = "ssr"
    needs_input_grad = True

    def __init__(self, weight: float = SSR_WEIGHT) -> None:
        self.weight = check_weight("SmoothSurfaceRegularization weight", weight)
        self.last: dict[str, float | Tensor] = {}

    def __call__(self, batch: TrainingBatch) -> Tensor:
        top = input_fisher_top_eigenvalue(batch.logits.log_softmax(dim=1), batch.x)
        self.last = {"lambda_max": top.detach().mean()}
        return self.weight * top.mean()

    def diagnostics(self) -> dict[str, float | Tensor]:
        """``lambda_max``: the batch mean of the largest eigenvalue, before the weight."""
        return self.last

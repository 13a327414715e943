r"""IG-NORM and IG-SUM-NORM (Chen et al., NeurIPS 2019): robust attribution regularization.

Both penalize the integrated gradients of the loss :math:`\ell = \mathrm{CE}` along the straight path
from a sample ``x`` to a point ``x'`` of its ball,

.. math::

    \mathrm{IG}_\ell(x, x') = (x' - x) \odot \frac1m \sum_{k=1}^{m}
        \nabla \ell\big(x + \tfrac{k - 1/2}{m}(x' - x), y\big),

which sums to :math:`\ell(x') - \ell(x)` as :math:`m \to \infty` (completeness), at the worst ``x'``:

* IG-NORM: :math:`R = \lambda \frac1N \sum_i \|\mathrm{IG}_\ell(x_i, x'_i)\|_1` with
  :math:`x'_i = \arg\max_{x' \in B(x_i)} \|\mathrm{IG}_\ell(x_i, x')\|_1`;
* IG-SUM-NORM: the loss :math:`\frac1N \sum_i \ell(x'_i) + \beta \|\mathrm{IG}_\ell(x_i, x'_i)\|_1` with
  :math:`x'_i = \arg\max_{x' \in B(x_i)} \ell(x') + \beta \|\mathrm{IG}_\ell(x_i, x')\|_1`.

``x'`` is found by PGD (:func:`~upi_lightning.attacks.pgd.pgd_attack` with the objective above) and
held fixed in the training term (Danskin). The IG is the shared one
(:func:`~upi_lightning.attribution.attribution` with the baseline ``x`` and the score
:math:`\log p_y = -\ell`; only its L1 norm enters, so the sign does not matter).
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from upi_lightning.attacks.pgd import cross_entropy_objective
from upi_lightning.attribution import attribution
from upi_lightning.errors import check_count
from upi_lightning.regularizers.adversarial import AdversarialExamples
from upi_lightning.regularizers.base import TrainingBatch, check_weight
from upi_lightning.threat import Norm


def ig_loss_l1(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, n_steps: int) -> Tensor:
    r"""Per-sample :math:`\|\mathrm{IG}_\ell(x_i, x'_i)\|_1` ``(N,)`` of ``x' = x_adv``.

    Differentiable w.r.t. ``x_adv`` and the model parameters. Midpoint rule over ``n_steps`` points (the
    authors use the right end points ``k / m``); the model runs in eval mode.
    """
    ig = attribution(
        model, x_adv, y, "integrated_gradients", score="log_probability", create_graph=True, n_steps=n_steps, baseline=x
    )
    return ig.flatten(1).abs().sum(dim=1)


class IGNorm(AdversarialExamples):
    r"""IG-NORM (Chen et al. 2019): :math:`R = \lambda \frac1N \sum_i \|\mathrm{IG}_\ell(x_i, x'_i)\|_1`.

    ``x'`` maximizes the IG norm in the ball of ``x`` (PGD with ``attack_ig_steps`` IG points per step,
    from a random start: at ``x' = x`` the IG and the gradient of its norm vanish); the term uses
    ``ig_steps`` points. Both are first order in the loss gradient, so they train a ReLU network itself:
    the parameter gradient of the term is the mixed derivative :math:`\partial^2 \ell / \partial\theta\,
    \partial x`, and the attack's gradient holds the mean path gradient times the sign of the IG.

    The paper's threat model is Linf (MNIST: eps 0.3, 40 steps of 0.01, 10 IG points in the attack and 50
    in the term, lambda 1); an L2 ball is also accepted: it only changes PGD's moves. Cost per batch:
    about ``steps * attack_ig_steps + ig_steps`` forward and double-backward passes of the batch (450
    with the paper's settings, against 40 single backward passes for PGD training: about 20x its time,
    measured on one CPU step of the small CNN). The attack and the IG run the eval-mode model, like the
    other attacks of the package.

    Args:
        weight: ``lambda >= 0`` (``None``: the paper's MNIST value, 1.0).
        norm: ``"linf"`` (the paper) or ``"l2"``.
        eps: radius of each sample's ball (pixel units).
        steps: PGD steps.
        step_size: PGD step (``None``: ``2.5 * eps / steps``; the paper: 0.01 on MNIST).
        random_start: start PGD from a random point of the ball.
        ig_steps: IG points of the training term (``m``).
        attack_ig_steps: IG points inside the attack.
        warmup_steps: the radius grows linearly over the first ``warmup_steps`` optimizer steps, from
            ``eps / warmup_steps`` to ``eps`` (the step size with it); ``0``: ``eps`` from the start.
    """

    name = "ig_norm"
    default_weight: ClassVar[float] = 1.0

    def __init__(
        self,
        weight: float | None = None,
        norm: Norm = "linf",
        eps: float = 0.3,
        steps: int = 40,
        step_size: float | None = None,
        random_start: bool = True,
        ig_steps: int = 50,
        attack_ig_steps: int = 10,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(norm, eps, steps, step_size, random_start, warmup_steps)
        label = type(self).__name__
        self.weight = check_weight(f"{label} weight", self.default_weight if weight is None else weight)
        self.ig_steps = check_count(f"{label} ig_steps", ig_steps)
        self.attack_ig_steps = check_count(f"{label} attack_ig_steps", attack_ig_steps)

    def attack_objective(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        r""":math:`\sum_i \|\mathrm{IG}_\ell(x_i, x'_i)\|_1` with ``attack_ig_steps`` points."""
        return ig_loss_l1(model, x, x_adv, y, self.attack_ig_steps).sum()

    def ig_term(self, batch: TrainingBatch, x_adv: Tensor) -> Tensor:
        r""":math:`\lambda \frac1N \sum_i \|\mathrm{IG}_\ell(x_i, x'_i)\|_1` with ``ig_steps`` points."""
        return self.weight * ig_loss_l1(batch.model, batch.x.detach(), x_adv, batch.y, self.ig_steps).mean()

    def __call__(self, batch: TrainingBatch) -> Tensor:
        return self.ig_term(batch, self.adversarial(batch))


class IGSumNorm(IGNorm):
    r"""IG-SUM-NORM (Chen et al. 2019): train on the maximum of :math:`\ell(x') + \beta \|\mathrm{IG}_\ell(x, x')\|_1`.

    The term added to the clean cross-entropy is
    :math:`R = \frac1N \sum_i \ell(x'_i) - \ell(x_i) + \beta \|\mathrm{IG}_\ell(x_i, x'_i)\|_1`, so the loss
    is the paper's (the clean cross-entropy stays in the graph, so every parameter gets a gradient under
    DDP); ``x'`` maximizes :math:`\ell(x') + \beta \|\mathrm{IG}_\ell(x, x')\|_1` (PGD, eval-mode model), and
    :math:`\ell(x')` is then computed in training mode, as in
    :class:`~upi_lightning.regularizers.PGDAdversarial`. ``beta = 0`` is
    Madry's PGD training. Arguments as :class:`IGNorm`; ``weight`` is ``beta`` (``None``: the paper's
    MNIST value, 0.1).
    """

    name = "ig_sum_norm"
    default_weight: ClassVar[float] = 0.1

    def attack_objective(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        r""":math:`\sum_i \ell(x'_i) + \beta \|\mathrm{IG}_\ell(x_i, x'_i)\|_1` with ``attack_ig_steps`` points."""
        return cross_entropy_objective(model, x, x_adv, y) + self.weight * super().attack_objective(model, x, x_adv, y)

    def __call__(self, batch: TrainingBatch) -> Tensor:
        x_adv = self.adversarial(batch)
        adversarial_ce = F.cross_entropy(batch.model(x_adv), batch.y)
        return adversarial_ce - batch.ce.mean() + self.ig_term(batch, x_adv)

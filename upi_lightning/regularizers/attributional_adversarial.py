r"""Attributional adversarial training (Wang & Kong, NeurIPS 2022): PGD examples with consistent maps.

.. math::

    R = w\,\big(\mathrm{CE}(x_{adv}) - \mathrm{CE}(x)\big)
        + \lambda \Big(1 - \frac1N \sum_i \cos\big(A(x_i), A(x_{adv,i})\big)\Big),

with :math:`x_{adv}` a PGD example, ``A`` the true-class input gradient or integrated gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from upi_lightning.attribution import SaliencyMethod, attribution, check_choice
from upi_lightning.errors import check_count
from upi_lightning.regularizers.adversarial import PGDAdversarial
from upi_lightning.regularizers.base import TrainingBatch, check_weight
from upi_lightning.threat import Norm

MAP_METHODS: tuple[str, ...] = ("gradient", "integrated_gradients")
"""The attributions whose cosine the mode aligns (Wang & Kong use integrated gradients)."""


class AttributionalAdversarial(PGDAdversarial):
    r"""Attributional adversarial training (Wang & Kong 2022): PGD training plus aligned attributions.

    .. math::

        R = w\,\big(\mathrm{CE}(x_{adv}) - \mathrm{CE}(x)\big)
            + \lambda \Big(1 - \frac1N \sum_i \cos\big(A(x_i), A(x_{adv,i})\big)\Big),

    the :class:`~upi_lightning.regularizers.PGDAdversarial` mix plus the cosine distance between the
    signed attributions of the true class (logit score) of ``x`` and of its PGD example, both
    differentiated w.r.t. the parameters (double backprop, eval-mode model, one attribution call for the
    stacked ``[x, x_adv]``). ``A`` is the input gradient or integrated gradients with the black baseline
    (``n_steps`` midpoint points). The cosine is scale-free: it cannot be met by shrinking the maps.

    Args:
        weight: share ``w`` in ``[0, 1]`` of the adversarial cross-entropy (1: Madry's training).
        l_cos: ``lambda >= 0``.
        method: ``"gradient"`` (the default: ``n_steps`` times cheaper) or ``"integrated_gradients"``
            (Wang & Kong's).
        n_steps: integrated-gradients points.
        norm: ``"l2"`` or ``"linf"``.
        eps: radius (pixel units).
        steps: PGD steps.
        step_size: PGD step (``None``: ``2.5 * eps / steps``).
        random_start: random start in the ball.
        warmup_steps: the radius grows linearly over the first ``warmup_steps`` optimizer steps, from
            ``eps / warmup_steps`` to ``eps`` (the step size with it); ``0``: ``eps`` from the start.
    """

    name = "attributional_adversarial"

    def __init__(
        self,
        weight: float = 1.0,
        l_cos: float = 1.0,
        method: SaliencyMethod = "gradient",
        n_steps: int = 16,
        norm: Norm = "linf",
        eps: float = 0.3,
        steps: int = 40,
        step_size: float | None = None,
        random_start: bool = True,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(weight, norm, eps, steps, step_size, random_start, warmup_steps)
        self.l_cos = check_weight("AttributionalAdversarial l_cos", l_cos)
        check_choice("AttributionalAdversarial method", method, MAP_METHODS)
        self.method = method
        self.n_steps = check_count("AttributionalAdversarial n_steps", n_steps)

    def __call__(self, batch: TrainingBatch) -> Tensor:
        x_adv = self.adversarial(batch)
        both = torch.cat([batch.x.detach(), x_adv])
        maps = attribution(batch.model, both, batch.y.repeat(2), self.method, create_graph=True, n_steps=self.n_steps)
        clean, adversarial = maps.flatten(1).chunk(2)
        cosine = F.cosine_similarity(clean, adversarial, dim=1).mean()
        return self.mixed_cross_entropy(batch, x_adv) + self.l_cos * (1 - cosine)

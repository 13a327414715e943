r"""PGD adversarial training (Madry et al. 2018), and the base of the modes trained on PGD examples.

:class:`PGDAdversarial` trains on :math:`(1 - w)\,\mathrm{CE}(x) + w\,\mathrm{CE}(x_{adv})`, with
:math:`x_{adv}` found by PGD (:func:`upi_lightning.attacks.pgd.pgd_attack`) in the ``eps``-ball of ``x``.
"""

from __future__ import annotations

import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from upi_lightning.attacks.engine import check_steps
from upi_lightning.attacks.pgd import cross_entropy_objective, pgd_attack
from upi_lightning.errors import UPIError, check_count
from upi_lightning.regularizers.base import BallRegularizer, TrainingBatch, check_weight
from upi_lightning.threat import Norm, threat_model


class AdversarialExamples(BallRegularizer):
    r"""Base of the regularizers trained on PGD examples (:func:`upi_lightning.attacks.pgd.pgd_attack`).

    PGD maximizes :meth:`attack_objective`, the cross-entropy unless a subclass says otherwise. With
    ``warmup_steps``, the ball's radius at optimizer step ``t`` (Lightning's ``global_step``, restored on
    resume) is :math:`\epsilon \min(1, (t + 1) / T)`: an untrained network first meets small
    perturbations (an eps ramp as in Gowal et al. 2018).

    Args:
        norm: ``"l2"`` or ``"linf"``.
        eps: radius of each sample's ball (pixel units).
        steps: PGD steps.
        step_size: PGD step (``None``: ``2.5 * eps / steps``).
        random_start: start PGD from a random point of the ball.
        warmup_steps: the radius grows linearly over the first ``warmup_steps`` optimizer steps, from
            ``eps / warmup_steps`` to ``eps`` (the step size with it); ``0``: ``eps`` from the start.
    """

    def __init__(
        self, norm: Norm, eps: float, steps: int, step_size: float | None, random_start: bool, warmup_steps: int = 0
    ) -> None:
        self.threat = threat_model(norm, eps)
        check_steps("constant", step_size, "steps", steps)
        self.steps = steps
        self.step_size = step_size
        self.random_start = random_start
        self.warmup_steps = check_count("warmup_steps (0: no ramp)", warmup_steps, minimum=0)
        self.global_step: int | None = None  # set by on_train_batch_start; None: the full radius

    def on_train_batch_start(self, module: LightningModule) -> None:
        """Read the optimizer step the radius ramps with (a plain module has none: then the full radius)."""
        self.global_step = getattr(module, "global_step", None)

    def ramp(self) -> float:
        """The share of ``eps`` used at the current step: ``min(1, (t + 1) / warmup_steps)``."""
        if not self.warmup_steps or self.global_step is None:
            return 1.0
        return min(1.0, (self.global_step + 1) / self.warmup_steps)

    def attack_objective(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        """The :data:`~upi_lightning.attacks.pgd.PGDObjective` PGD ascends: the summed cross-entropy."""
        return cross_entropy_objective(model, x, x_adv, y)

    def adversarial(self, batch: TrainingBatch) -> Tensor:
        """Return PGD examples of the batch (model in eval mode during the attack, detached result)."""
        share = self.ramp()
        return pgd_attack(
            batch.model,
            batch.x,
            batch.y,
            self.threat if share == 1.0 else threat_model(self.threat.norm, share * self.threat.eps),
            steps=self.steps,
            step_size=None if self.step_size is None else share * self.step_size,
            random_start=self.random_start,
            objective=self.attack_objective,
        )


class PGDAdversarial(AdversarialExamples):
    r"""PGD adversarial training (Madry et al. 2018), the classic baseline.

    The loss becomes :math:`(1 - w)\,\mathrm{CE}(x) + w\,\mathrm{CE}(x_{adv})`, written as the term
    :math:`R = w\,(\mathrm{CE}(x_{adv}) - \mathrm{CE}(x))` added to the clean cross-entropy: ``w = 1`` is
    Madry's min-max training, ``w = 0.5`` Goodfellow et al.'s mix, ``w = 0`` plain training. ``x_adv`` is
    computed by PGD on the eval-mode model, then forwarded in training mode.

    Args:
        weight: ``w`` in ``[0, 1]``.
        norm: ``"l2"`` or ``"linf"``.
        eps: radius (pixel units; Madry MNIST: Linf 0.3).
        steps: PGD steps (Madry MNIST: 40).
        step_size: PGD step (``None``: ``2.5 * eps / steps``; Madry MNIST: 0.01).
        random_start: random start in the ball.
        warmup_steps: the radius grows linearly over the first ``warmup_steps`` optimizer steps, from
            ``eps / warmup_steps`` to ``eps`` (the step size with it); ``0``: ``eps`` from the start.
    """

    name = "pgd_adversarial"

    def __init__(
        self,
        weight: float = 1.0,
        norm: Norm = "linf",
        eps: float = 0.3,
        steps: int = 40,
        step_size: float | None = None,
        random_start: bool = True,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(norm, eps, steps, step_size, random_start, warmup_steps)
        label = f"{type(self).__name__} weight"
        if not 0 <= check_weight(label, weight) <= 1:
            raise UPIError(f"{label} is the share of the adversarial loss, in [0, 1]; got {weight}.")
        self.weight = float(weight)

    def mixed_cross_entropy(self, batch: TrainingBatch, x_adv: Tensor) -> Tensor:
        r"""The term :math:`w\,(\mathrm{CE}(x_{adv}) - \mathrm{CE}(x))` of given examples ``x_adv``."""
        adversarial_ce = F.cross_entropy(batch.model(x_adv), batch.y)
        return self.weight * (adversarial_ce - batch.ce.mean())

    def __call__(self, batch: TrainingBatch) -> Tensor:
        return self.mixed_cross_entropy(batch, self.adversarial(batch))

r"""PGD (Madry et al. 2018): per-sample adversarial examples for robust accuracy and adversarial training.

:func:`pgd_attack` maximizes the cross-entropy of every sample inside its own ball
:math:`\|\delta_i\|_p \le \varepsilon` (``p`` in ``{2, inf}``, pixel units) with ``x_i + delta_i`` kept
in ``[0, 1]`` (or any other per-sample :data:`PGDObjective`, e.g. the IG norm of
:class:`~upi_lightning.regularizers.IGNorm`):

.. math::

    \delta_i \leftarrow \mathrm{clip}_{[0,1]}\big(x_i + \mathrm{Proj}_{B_\varepsilon}(\delta_i + \eta\,
    s(\nabla_{x'} \mathrm{CE}(f(x'), y_i)|_{x' = x_i + \delta_i}))\big) - x_i,

``s`` = normalized gradient (L2) or sign (Linf): the threat model's shared
:meth:`~upi_lightning.threat.ThreatModel.step`, one ball per sample. The start is a uniform random point
of the ball (``random_start``) or ``x`` itself. Clipping to the box after the projection can only
shrink each coordinate of ``delta``, so the result stays in the ball.

The gradient is taken w.r.t. the adversarial image :math:`x' = \mathrm{clip}(x_i + \delta_i)` (textbook
PGD), through :func:`upi_lightning.threat.straight_through_clip`: differentiating through
``torch.clamp`` instead gives a zero gradient to every pixel on the box's faces, and after the random
start about half of MNIST's pixels sit there and never move (issue 14).

:func:`robust_accuracy` evaluates a model on a data set; the callback
:class:`~upi_lightning.callbacks.RobustAccuracy` does it during validation and/or test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upi_lightning.attacks.engine import Batches, check_steps, prepare_batch
from upi_lightning.distributed import Reduce, identity
from upi_lightning.errors import UPIError
from upi_lightning.model_modes import attack_device, evaluation_mode, gradients_enabled, model_logits
from upi_lightning.noise import make_generator
from upi_lightning.threat import ThreatModel, apply_perturbation, straight_through_clip

Stage = Literal["val", "test"]

PGDObjective = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
"""``objective(model, x, x_adv, y)``: the sum over the batch of per-sample values that PGD ascends.

``x`` are the clean images, ``x_adv`` the current adversarial ones (differentiable); the model is in
eval mode, so the gradient of the sum w.r.t. ``x_adv`` holds every sample's own gradient.
"""


def cross_entropy_objective(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
    r"""The default :data:`PGDObjective`: :math:`\sum_i \mathrm{CE}(f(x_{adv,i}), y_i)`."""
    return F.cross_entropy(model_logits(model, x_adv), y, reduction="sum")


def default_pgd_step_size(eps: float, steps: int) -> float:
    r"""Madry et al.'s rule :math:`\eta = 2.5\,\varepsilon / \text{steps}`: the ball can be crossed, with slack."""
    return 2.5 * eps / steps


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    objective: PGDObjective = cross_entropy_objective,
) -> Tensor:
    """Return PGD adversarial examples ``x_adv`` ``(N, C, H, W)`` in ``[0, 1]`` (see the module docstring).

    The model runs in eval mode (its modes are restored) and its parameters get no gradient; works
    when the caller runs under ``torch.no_grad`` or ``torch.inference_mode``.

    Args:
        model: classifier of ``[0, 1]`` pixel images returning logits.
        x: clean images ``(N, C, H, W)`` in ``[0, 1]``.
        y: true classes ``(N,)``.
        threat: the ball of each sample's perturbation, in pixel units.
        steps: number of ascent steps, ``>= 1``.
        step_size: step ``eta`` (``None``: :func:`default_pgd_step_size`).
        random_start: start from a uniform random point of the ball instead of ``x``.
        generator: random generator of the start (any device).
        objective: what is maximized (default: the cross-entropy).

    Returns:
        The detached adversarial images, on the model's device.

    """
    check_steps("constant", step_size, "steps", steps)
    eta = default_pgd_step_size(threat.eps, steps) if step_size is None else float(step_size)
    device = attack_device(model)
    with evaluation_mode(model), gradients_enabled():
        x, y = prepare_batch((x.detach(), y.detach()), device)
        if random_start:
            start = threat.random_start(tuple(x.shape), generator, device, per_sample=True)
            delta = apply_perturbation(x, start) - x
        else:
            delta = torch.zeros_like(x)
        for _ in range(steps):
            variable = delta.requires_grad_(True)
            value = objective(model, x, straight_through_clip(x + variable), y)
            (grad,) = torch.autograd.grad(value, variable)
            delta = threat.step(delta.detach(), grad, eta, per_sample=True)
            delta = apply_perturbation(x, delta) - x
        return apply_perturbation(x, delta).detach()


def count_robust(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, **attack: Any) -> Tensor:
    """Return how many samples of the batch ``model`` still classifies correctly after :func:`pgd_attack`.

    ``attack`` holds the keyword options of :func:`pgd_attack`. Returns a 0-d float tensor on the model's
    device.
    """
    x_adv = pgd_attack(model, x, y, threat, **attack)
    with evaluation_mode(model), torch.no_grad():
        return (model_logits(model, x_adv).argmax(dim=1) == y.to(x_adv.device)).sum().float()


def robust_accuracy(
    model: nn.Module,
    batches: Batches,
    threat: ThreatModel,
    *,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    reduce: Reduce = identity,
) -> float:
    """Return the accuracy of ``model`` on PGD adversarial examples of ``batches`` (``(x, y)`` pairs).

    Args:
        model: the classifier (eval mode during the attack, modes restored, parameters untouched).
        batches: iterable of ``(x, y)`` batches of ``[0, 1]`` images.
        threat: the ball of each sample's perturbation, pixel units.
        steps: PGD steps.
        step_size: PGD step (``None``: :func:`default_pgd_step_size`).
        random_start: random start in the ball.
        seed: seeds the random starts.
        reduce: applied to ``[correct, count]`` (a DDP caller passes an all-reduce-sum).

    Raises:
        UPIError: if ``batches`` yields no sample.

    """
    device = attack_device(model)
    generator = make_generator(seed, device)
    totals = torch.zeros(2, device=device)
    for x, y in batches:
        totals[0] += count_robust(
            model,
            x,
            y,
            threat,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
            generator=generator,
        )
        totals[1] += len(x)
    correct, count = reduce(totals).tolist()
    if count == 0:
        raise UPIError("robust_accuracy: the data yielded no sample.")
    return correct / count

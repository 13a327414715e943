r"""PGD (Madry et al. 2018): per-sample adversarial examples for robust accuracy and adversarial training.

:func:`pgd_attack` maximizes the cross-entropy of every sample inside its own ball
:math:`\|\delta_i\|_p \le \varepsilon` (``p`` in ``{2, inf}``, pixel units) with ``x_i + delta_i`` kept
in ``[0, 1]``:

.. math::

    \delta_i \leftarrow \mathrm{clip}_{[0,1]}\big(x_i + \mathrm{Proj}_{B_\varepsilon}(\delta_i + \eta\,
    s(\nabla_{x'} \mathrm{CE}(f(x'), y_i)|_{x' = x_i + \delta_i}))\big) - x_i,

``s`` = normalized gradient (L2) or sign (Linf): the shared step
:func:`upi_lightning.perturbation.projected_ascent_step`, one ball per sample. The start is a uniform
random point of the ball (``random_start``) or ``x`` itself. Clipping to the box after the projection
can only shrink each coordinate of ``delta``, so the result stays in the ball.

The gradient is taken w.r.t. the adversarial image :math:`x' = \mathrm{clip}(x_i + \delta_i)` (textbook
PGD), through :func:`upi_lightning.perturbation.straight_through_clip`: differentiating through
``torch.clamp`` instead gives a zero gradient to every pixel on the box's faces, and after the random
start about half of MNIST's pixels sit there and never move (issue 14).

:func:`robust_accuracy` evaluates a model on a data set and :class:`RobustAccuracy` does it as a
Lightning callback during validation and/or test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from upi_lightning.attacks.upi_grad import Batches, Reduce, check_steps, identity, model_device, prepare_batch
from upi_lightning.errors import UPIError
from upi_lightning.perturbation import (
    Norm,
    apply_perturbation,
    check_eps,
    check_norm,
    make_generator,
    projected_ascent_step,
    random_in_ball,
    straight_through_clip,
)
from upi_lightning.saliency import evaluation_mode, gradients_enabled

Stage = Literal["val", "test"]


def default_pgd_step_size(eps: float, steps: int) -> float:
    r"""Madry et al.'s rule :math:`\eta = 2.5\,\varepsilon / \text{steps}`: the ball can be crossed, with slack."""
    return 2.5 * eps / steps


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: Norm,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Return PGD adversarial examples ``x_adv`` ``(N, C, H, W)`` in ``[0, 1]`` (see the module docstring).

    The model runs in eval mode (its modes are restored) and its parameters get no gradient; works
    when the caller runs under ``torch.no_grad`` or ``torch.inference_mode``.

    Args:
        model: classifier of ``[0, 1]`` pixel images returning logits.
        x: clean images ``(N, C, H, W)`` in ``[0, 1]``.
        y: true classes ``(N,)``.
        norm: ``"l2"`` or ``"linf"``.
        eps: radius of each sample's ball, in pixel units.
        steps: number of ascent steps, ``>= 1``.
        step_size: step ``eta`` (``None``: :func:`default_pgd_step_size`).
        random_start: start from a uniform random point of the ball instead of ``x``.
        generator: random generator of the start (any device).

    Returns:
        The detached adversarial images, on the model's device.

    """
    norm, eps = check_norm(norm), check_eps(eps)
    check_steps("constant", step_size, "steps", steps)
    eta = default_pgd_step_size(eps, steps) if step_size is None else float(step_size)
    device = model_device(model)
    with evaluation_mode(model), gradients_enabled():
        x, y = prepare_batch((x.detach(), y.detach()), device)
        if random_start:
            start = random_in_ball(tuple(x.shape), norm, eps, generator, device, per_sample=True)
            delta = apply_perturbation(x, start) - x
        else:
            delta = torch.zeros_like(x)
        for _ in range(steps):
            variable = delta.requires_grad_(True)
            loss = F.cross_entropy(model(straight_through_clip(x + variable)), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, variable)
            delta = projected_ascent_step(delta.detach(), grad, norm, eps, eta, per_sample=True)
            delta = apply_perturbation(x, delta) - x
        return apply_perturbation(x, delta).detach()


def count_robust(model: nn.Module, x: Tensor, y: Tensor, **attack: Any) -> Tensor:
    """Return how many samples of the batch ``model`` still classifies correctly after :func:`pgd_attack`.

    ``attack`` holds the keyword arguments of :func:`pgd_attack`. Returns a 0-d float tensor on the
    model's device.
    """
    x_adv = pgd_attack(model, x, y, **attack)
    with evaluation_mode(model), torch.no_grad():
        return (model(x_adv).argmax(dim=1) == y.to(x_adv.device)).sum().float()


def robust_accuracy(
    model: nn.Module,
    batches: Batches,
    *,
    norm: Norm,
    eps: float,
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
        norm: ``"l2"`` or ``"linf"``.
        eps: radius of each ball, pixel units.
        steps: PGD steps.
        step_size: PGD step (``None``: :func:`default_pgd_step_size`).
        random_start: random start in the ball.
        seed: seeds the random starts.
        reduce: applied to ``[correct, count]`` (a DDP caller passes an all-reduce-sum).

    Raises:
        UPIError: if ``batches`` yields no sample.

    """
    device = model_device(model)
    generator = make_generator(seed, device)
    totals = torch.zeros(2, device=device)
    for x, y in batches:
        totals[0] += count_robust(
            model,
            x,
            y,
            norm=norm,
            eps=eps,
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


class RobustAccuracy(Callback):
    """Log the PGD robust accuracy of the validation and/or test data as ``{stage}/robust_acc_{norm}_{eps}``.

    Every batch of the chosen stages (the first ``max_batches`` per process, when set) is attacked with
    :func:`pgd_attack` on the LightningModule (its forward must return logits); correct and total counts
    are summed over processes with ``trainer.strategy.reduce`` at the end of the epoch (exact under DDP,
    not a mean of means). Skipped during the sanity check. Works under ``torch.inference_mode``
    (``trainer.test``) and ``torch.no_grad`` (validation during fit).

    Args:
        norm: ``"l2"`` or ``"linf"``.
        eps: radius of each ball, pixel units.
        steps: PGD steps.
        step_size: PGD step (``None``: :func:`default_pgd_step_size`).
        random_start: random start in the ball.
        stages: ``val`` and/or ``test``.
        max_batches: attack at most this many batches per epoch and process (``None``: all).
        seed: seeds the random starts (the same at every epoch).

    """

    def __init__(
        self,
        norm: Norm = "linf",
        eps: float = 0.1,
        steps: int = 40,
        step_size: float | None = None,
        random_start: bool = True,
        stages: Sequence[Stage] = ("test",),
        max_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_steps("constant", step_size, "steps", steps)
        unknown = set(stages) - {"val", "test"}
        if unknown or not stages:
            raise UPIError(f"RobustAccuracy stages must be a non-empty subset of ['val', 'test'], got {list(stages)}.")
        if max_batches is not None and max_batches < 1:
            raise UPIError(f"max_batches must be None or >= 1, got {max_batches}.")
        self.attack: dict[str, Any] = {
            "norm": check_norm(norm),
            "eps": check_eps(eps),
            "steps": steps,
            "step_size": step_size,
            "random_start": random_start,
        }
        self.stages = tuple(stages)
        self.max_batches = max_batches
        self.seed = seed
        self.key = f"robust_acc_{norm}_{eps:g}"
        self.totals: Tensor | None = None
        self.generator: torch.Generator | None = None

    def start(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        """Reset the counts and the random starts at the beginning of an epoch of ``stage``."""
        if stage in self.stages and not trainer.sanity_checking:
            self.totals = torch.zeros(2, device=pl_module.device)
            self.generator = make_generator(self.seed, pl_module.device)

    def update(self, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Attack one batch (when counting and below ``max_batches``) and add its counts."""
        if self.totals is None or (self.max_batches is not None and batch_idx >= self.max_batches):
            return
        x, y = batch[0], batch[1]
        self.totals[0] += count_robust(pl_module, x, y, generator=self.generator, **self.attack)
        self.totals[1] += len(x)

    def finish(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        """Reduce the counts over processes and log the robust accuracy of the epoch."""
        if self.totals is None:
            return
        correct, count = trainer.strategy.reduce(self.totals, reduce_op="sum").tolist()
        self.totals = None
        if count > 0:
            pl_module.log(f"{stage}/{self.key}", correct / count, sync_dist=True)  # identical on every rank

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start(trainer, pl_module, "val")

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.update(pl_module, batch, batch_idx)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.finish(trainer, pl_module, "val")

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start(trainer, pl_module, "test")

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.update(pl_module, batch, batch_idx)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.finish(trainer, pl_module, "test")

r"""UPI-adversarial training (this project's mode): stable saliency maps under a running universal ``delta``.

.. math::

    R = \frac{\lambda}{(1 + m) N} \sum_i \Big[D\big(I(\mathrm{clip}(x_i + \delta)), I(x_i)\big)
        + \sum_{j=1}^{m} D\big(I(\mathrm{clip}(x_i + r_j)), I(x_i)\big)\Big]
        + \mu \frac1N \sum_i \mathrm{CE}(f(\mathrm{clip}(x_i + \delta)), y_i),

with ``delta`` refreshed every ``k`` training steps by a few UPI-Grad ascent steps on the current batch,
its gradient summed over processes so every rank trains against the same ``delta`` (universal
adversarial training, Shafahi et al. 2020), ``r_j`` fresh random points of the sphere of the same ball
(``m = random_draws``) and ``mu = adversarial_ce``. The sums may run over the first ``term_batch_size``
images of each batch only (an unbiased estimate of the whole batch's term, at that fraction of its cost).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from upi_lightning.attacks.engine import check_steps
from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.upi_grad import fit_upi_grad
from upi_lightning.distributed import Reduce
from upi_lightning.errors import UPIError, check_count
from upi_lightning.model_modes import evaluation_mode
from upi_lightning.noise import make_generator
from upi_lightning.regularizers.base import BallRegularizer, TrainingBatch, check_weight
from upi_lightning.threat import Norm, apply_perturbation, threat_model


class UPIAdversarial(BallRegularizer):
    r"""Training against a running universal perturbation for interpretation (this project's mode).

    .. math::

        R = \frac{\lambda}{1 + m} \Big[\bar D(\delta) + \sum_{j=1}^{m} \bar D(r_j)\Big]
            + \mu\, \overline{\mathrm{CE}}(\delta), \qquad
        \bar D(v) = \frac1N \sum_i D\big(I(\mathrm{clip}(x_i + v)), I(x_i)\big)

    with ``I`` and ``D`` the saliency map and dissimilarity of the :class:`UPIObjective` built from
    ``objective``; the perturbed maps are differentiated w.r.t. the parameters (double backprop), the
    clean maps are the (detached) reference, as in the attack. ``r_j`` are ``random_draws`` fresh random
    points of the sphere of the ball at every step (the maps must not move under noise of the same size
    either), and ``mu`` weighs the cross-entropy on ``clip(x + delta)`` (universal adversarial training of
    the predictions). All perturbed copies go through the network as one batch. With ``term_batch_size``,
    the term and ``delta``'s updates use only the first ``term_batch_size`` images ``x_1..x_N`` of each
    (shuffled) training batch: an unbiased estimate of the whole batch's term whose cost, which dominates
    the step, shrinks in proportion; the clean cross-entropy still sees the whole batch.
    Every ``every_n_steps`` training steps, ``delta`` takes ``ascent_steps`` UPI-Grad steps
    (:func:`upi_lightning.attacks.upi_grad.fit_upi_grad`, constant step size, warm-started from the current
    ``delta``; the first update starts from a random point of the ball) on the current batch. The gradient
    w.r.t. ``delta`` is summed over processes through ``TrainingBatch.reduce``, so every rank trains
    against the same ``delta`` (universal adversarial training, Shafahi et al. 2020).

    ``objective`` may set a softplus surrogate (``surrogate_beta``) for a ReLU network: it is used to fit
    ``delta`` only; the training term always differentiates the model itself, and ignores the
    objective's ``keep_prediction`` penalty. ``delta``, the step and update counters and the last
    objective value are saved in checkpoints; at every training epoch end ``delta`` is logged to
    TensorBoard as the image ``train/upi_delta`` (grey = 0, scaled to the largest absolute entry), with
    its norm and the last objective value as scalars. At every step :meth:`diagnostics` gives the L2 norm
    of the mean gradient w.r.t. ``delta`` and how far ``delta`` moved in the last update, ``delta``'s norm,
    the fit's objective and the parts of the term (logged as ``train/upi_adversarial/<key>``).

    Args:
        weight: ``lambda >= 0``.
        norm: ``"l2"`` or ``"linf"``.
        eps: radius of the ball of ``delta`` (pixel units).
        every_n_steps: update ``delta`` at training steps ``0, k, 2k, ...``.
        ascent_steps: UPI-Grad steps per update.
        step_size: UPI-Grad step (``None``: the UPI-Grad default, ``eps / 4`` for L2, ``eps / 10`` for Linf).
        objective: the fields of :class:`UPIObjective` (:meth:`UPIObjective.from_config`: ``saliency``,
            ``dissimilarity``, ``surrogate_beta``, ``sigma``, ...).
        random_draws: ``m >= 0``, random perturbations of the same ball penalized beside ``delta``.
        adversarial_ce: ``mu >= 0``, weight of the cross-entropy on ``clip(x + delta)``.
        seed: seeds the random start and the smoothing noise of the updates, and the random draws.
        term_batch_size: images of each batch (per process) that the term and the updates use (``None``: all).
    """

    name = "upi_adversarial"

    def __init__(
        self,
        weight: float = 1.0,
        norm: Norm = "l2",
        eps: float = 1.0,
        every_n_steps: int = 1,
        ascent_steps: int = 1,
        step_size: float | None = None,
        objective: dict[str, Any] | None = None,
        random_draws: int = 0,
        adversarial_ce: float = 0.0,
        seed: int = 0,
        term_batch_size: int | None = None,
    ) -> None:
        self.weight = check_weight("UPIAdversarial weight", weight)
        self.threat = threat_model(norm, eps)
        check_count("every_n_steps", every_n_steps)
        check_steps("constant", step_size, "ascent_steps", ascent_steps)
        self.every_n_steps = every_n_steps
        self.ascent_steps = ascent_steps
        self.step_size = step_size
        self.objective = dict(objective or {})
        try:
            self.attack_objective = UPIObjective.from_config(self.objective)
        except TypeError as err:
            raise UPIError(f"Invalid UPIAdversarial objective {self.objective}: {err}") from err
        self.train_objective = replace(self.attack_objective, surrogate_beta=None, keep_prediction=0.0)
        self.random_draws = check_count("random_draws", random_draws, minimum=0)
        self.adversarial_ce = check_weight("UPIAdversarial adversarial_ce", adversarial_ce)
        self.seed = seed
        self.term_batch_size = None if term_batch_size is None else check_count("term_batch_size", term_batch_size)
        self.delta: Tensor | None = None
        self.train_steps = 0
        self.updates = 0
        self.last_objective = math.nan
        self.last: dict[str, float | Tensor] = {}

    def update(self, model: nn.Module, x: Tensor, y: Tensor, reduce: Reduce) -> None:
        """Take ``ascent_steps`` UPI-Grad steps of ``delta`` on the batch ``(x, y)``."""
        previous = self.delta
        result = fit_upi_grad(
            model,
            [(x, y)] * self.ascent_steps,
            self.threat,
            objective=self.attack_objective,
            epochs=1,
            step_size=self.step_size,
            schedule="constant",
            init="random" if previous is None else previous,
            reduce=reduce,
            seed=self.seed + self.updates,
        )
        self.delta = result.delta
        self.updates += 1
        self.last_objective = result.history[-1]
        moved = math.nan if previous is None else self.threat.norm_of(self.delta - previous.to(self.delta)).item()
        self.last.update(
            objective=self.last_objective,
            delta_grad_norm=sum(result.grad_norms) / len(result.grad_norms),
            delta_step=moved,
            delta_norm=self.threat.norm_of(self.delta).item(),
        )

    def perturbations(self, x: Tensor) -> Tensor:
        """``delta`` and this step's ``random_draws`` random points of the sphere, ``(1 + m, C, H, W)`` like ``x``."""
        assert self.delta is not None  # set by the first update
        delta = self.delta.detach().to(x)[None]
        if not self.random_draws:
            return delta
        shape = tuple(x.shape[1:])
        generator = make_generator(self.seed + 1_000_003 * (1 + self.train_steps))
        draws = torch.stack([self.threat.random_on_sphere(shape, generator) for _ in range(self.random_draws)])
        return torch.cat([delta, draws.to(x)])

    def __call__(self, batch: TrainingBatch) -> Tensor:
        x, y = batch.x.detach()[: self.term_batch_size], batch.y[: self.term_batch_size]
        if self.train_steps % self.every_n_steps == 0:
            self.update(batch.model, x, y, batch.reduce)
        perturbations = self.perturbations(x)
        self.train_steps += 1
        copies = len(perturbations)
        # every perturbed copy in one batch; maps built with their graph: the term is differentiable
        # w.r.t. the parameters (double backprop)
        with evaluation_mode(batch.model):  # as the perturbed maps of dissimilarity_term
            clean = self.train_objective.clean_maps(batch.model, x, y)
        values = self.train_objective.dissimilarity_term(
            batch.model,
            x.repeat(copies, 1, 1, 1),
            y.repeat(copies),
            perturbations.repeat_interleave(len(x), dim=0),
            clean.repeat(copies, 1, 1),
            create_graph=True,
        ).view(copies, len(x))
        term = self.weight * values.mean()
        # diagnostics stay tensors: no device sync in the training step (the logger reads them)
        self.last.update(term_delta=values[0].mean().detach())
        if copies > 1:
            self.last.update(term_random=values[1:].mean().detach())
        if self.adversarial_ce > 0:
            ce = F.cross_entropy(batch.model(apply_perturbation(x, perturbations[0])), y)
            self.last.update(adversarial_ce=ce.detach())
            term = term + self.adversarial_ce * ce
        return term

    def diagnostics(self) -> dict[str, float | Tensor]:
        """The last update's ``delta`` figures and this step's parts of the term (see the class docstring)."""
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        """Return ``delta`` (CPU, or ``None`` before the first update) and the counters."""
        delta = None if self.delta is None else self.delta.detach().cpu()
        return {
            "delta": delta,
            "train_steps": self.train_steps,
            "updates": self.updates,
            "last_objective": self.last_objective,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``delta`` and the counters."""
        self.delta = state["delta"]
        self.train_steps = int(state["train_steps"])
        self.updates = int(state["updates"])
        self.last_objective = float(state["last_objective"])

    def on_train_epoch_end(self, module: LightningModule) -> None:
        """Log ``delta`` as an image and its norm and last objective value as scalars."""
        if self.delta is None:
            return
        delta = self.delta.detach().float().cpu()
        # identical on every rank: sync_dist only silences Lightning's epoch-level DDP warning
        module.log("train/upi_delta_norm", self.threat.norm_of(delta).item(), sync_dist=True)
        module.log("train/upi_objective", self.last_objective, sync_dist=True)
        image = 0.5 + delta / (2 * delta.abs().max().clamp_min(1e-12))
        for logger in module.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("train/upi_delta", image, module.global_step)

r"""Baselines every UPI is compared with.

* :func:`random_universal`: random perturbations on the sphere of radius ``eps`` (same norm as the UPI);
  evaluating several draws gives a mean and a spread.
* :func:`fit_per_sample_attack`: one perturbation per sample, iterative projected ascent on the same
  UPI objective (the upper bound a universal perturbation cannot beat).
* :func:`fit_classification_uap`: SGD-UAP (Shafahi et al. 2020), projected stochastic ascent of the
  clamped cross-entropy :math:`\min(\mathrm{CE}(f(\mathrm{clip}(x + \delta)), y), \beta)`: a perturbation
  aimed at the predictions, to show it is not what moves the maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from upi_lightning.attacks.engine import (
    AscentOptions,
    Batches,
    Schedule,
    UPIFitResult,
    check_steps,
    fit_universal,
    prepare_batch,
    step_size_at,
)
from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.errors import UPIError
from upi_lightning.model_modes import attack_device, evaluation_mode, gradients_enabled, model_logits
from upi_lightning.noise import make_generator, sample_generators
from upi_lightning.threat import ThreatModel, apply_perturbation


def random_universal(shape: tuple[int, ...], threat: ThreatModel, n_draws: int = 5, seed: int = 0) -> list[Tensor]:
    """Return ``n_draws`` random ``(C, H, W)`` perturbations on the sphere of radius ``eps`` (CPU, float32).

    L2: uniform random directions scaled to ``eps``; Linf: random signs times ``eps``
    (:func:`upi_lightning.perturbation.random_on_sphere`). Reproducible from ``seed``.
    """
    if n_draws < 1:
        raise UPIError(f"n_draws must be >= 1, got {n_draws}.")
    generator = make_generator(seed)
    return [threat.random_on_sphere(shape, generator) for _ in range(n_draws)]


RESTART_SEED_STRIDE = 1_000_003
"""Restart ``r`` of the per-sample attack is seeded with ``seed + r * RESTART_SEED_STRIDE`` (restart 0: ``seed``)."""


def fit_per_sample_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    objective: UPIObjective | None = None,
    steps: int = 20,
    step_size: float | None = None,
    schedule: Schedule = "cosine",
    seed: int = 0,
    restarts: int = 1,
    hold_label: bool = False,
) -> Tensor:
    r"""Per-sample attack on the UPI objective: one ``delta_i`` per sample, all optimized in one batch.

    Projected ascent :math:`\delta_i \leftarrow \mathrm{Proj}(\delta_i + \eta_t s(\nabla_{\delta_i}
    J_i))` from a random point of each ball, ``steps`` steps; returns, per sample, the iterate with the
    best objective seen (the final one included) over ``restarts`` runs from different random starts
    (Ghorbani et al. 2019's protocol: the worst case of several restarts). As in
    :func:`upi_lightning.attacks.pgd.pgd_attack`, every iterate is brought back into the box
    (:math:`\delta_i \leftarrow \mathrm{clip}(x_i + \delta_i) - x_i`, which keeps it in the ball) and the
    gradient is the one w.r.t. the clipped image (:meth:`UPIObjective.per_sample` with
    ``straight_through=True``), so pixels on 0 or 1 still move (issue 14; measured in docs/RESULTS.md).

    Args:
        model: the classifier (eval mode, modes restored, parameters untouched).
        x: images ``(N, C, H, W)`` in ``[0, 1]``.
        y: classes ``(N,)`` whose maps are attacked.
        threat: the ball of every ``delta_i``.
        objective: the UPI objective (default :class:`UPIObjective`).
        steps: number of ascent steps (``>= 1``).
        step_size: base step (``None``: ``default_step_size``).
        schedule: ``constant``, ``cosine`` or ``step``.
        seed: seeds the random starts and the smoothing noise (restart ``r``: ``seed + r *``
            :data:`RESTART_SEED_STRIDE`, so one restart is the attack of ``seed`` alone).
        restarts: runs from different random starts (``>= 1``); the best iterate of all is kept.
        hold_label: an iterate counts only if ``model`` predicts the same class on
            :math:`\mathrm{clip}(x_i + \delta_i)` as on :math:`x_i`; a sample none of whose iterates
            keeps its label gets a zero perturbation.

    Returns:
        ``(N, C, H, W)`` perturbations on the device of ``model``, each in its ball.

    Raises:
        UPIError: if ``restarts < 1`` or on invalid steps.

    """
    check_steps(schedule, step_size, "steps", steps)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise UPIError(f"restarts must be an integer >= 1 (1 = a single random start), got {restarts!r}.")
    objective = UPIObjective() if objective is None else objective
    base_step = threat.default_step_size() if step_size is None else float(step_size)
    device = attack_device(model)
    with evaluation_mode(model), gradients_enabled():
        x, y = prepare_batch((x, y), device)
        clean = objective.clean_maps(model, x, y)
        label = predictions(model, x) if hold_label else None
        runs = (
            _per_sample_ascent(
                model,
                x,
                y,
                threat,
                objective,
                clean,
                make_generator(seed + restart * RESTART_SEED_STRIDE, device),
                label,
                steps,
                base_step,
                schedule,
            )
            for restart in range(restarts)
        )
        best_value, best_delta = next(runs)
        for value, delta in runs:
            improved = value > best_value
            best_value = torch.where(improved, value, best_value)
            best_delta[improved] = delta[improved]
    return best_delta.detach()


def predictions(model: nn.Module, x: Tensor) -> Tensor:
    """The classes ``model`` predicts for images ``x`` ``(N,)`` (no graph)."""
    with torch.no_grad():
        return model_logits(model, x).argmax(dim=1)


def _per_sample_ascent(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    objective: UPIObjective,
    clean: Tensor,
    generator: torch.Generator,
    label: Tensor | None,
    steps: int,
    base_step: float,
    schedule: Schedule,
) -> tuple[Tensor, Tensor]:
    """One run of :func:`fit_per_sample_attack` from the random start ``generator`` gives.

    Returns, per sample, the best objective of the iterates that count (``-inf`` if none does: with a
    ``label`` to hold, only iterates whose prediction equals it count) and that iterate (zero if none).
    """
    starts = sample_generators(x, y, generator)  # keyed by sample: the same start on any number of processes
    delta = torch.stack([threat.random_start(tuple(x.shape[1:]), g, x.device) for g in starts])
    delta = apply_perturbation(x, delta) - x
    best_value = torch.full((len(x),), -torch.inf, device=x.device)
    best_delta = delta.clone() if label is None else torch.zeros_like(delta)
    for step in range(steps + 1):
        variable = delta.clone().requires_grad_(step < steps)
        values = objective.per_sample(
            model, x, y, variable, clean, generator, create_graph=step < steps, straight_through=True
        )
        improved = values.detach() > best_value
        if label is not None:
            improved &= predictions(model, apply_perturbation(x, delta)) == label
        best_value = torch.where(improved, values.detach(), best_value)
        best_delta[improved] = delta[improved]
        if step == steps:
            break
        (grad,) = torch.autograd.grad(values.sum(), variable, allow_unused=True, materialize_grads=True)
        eta = step_size_at(schedule, base_step, step, steps)
        delta = threat.step(delta, grad, eta, per_sample=True)
        delta = apply_perturbation(x, delta) - x
    return best_value, best_delta


def fit_classification_uap(
    model: nn.Module,
    batches: Batches,
    threat: ThreatModel,
    *,
    clamp: float = 10.0,
    **options: Unpack[AscentOptions],
) -> UPIFitResult:
    r"""Fit SGD-UAP, a universal perturbation aimed at the predictions.

    Projected stochastic ascent of :math:`\frac1n\sum_i \min(\mathrm{CE}(f(\mathrm{clip}(x_i + \delta)),
    y_i), \beta)` with :math:`\beta` = ``clamp``.
    The clamp stops samples that are already misclassified from dominating the gradient. Differentiates
    the model itself (no surrogate: the cross-entropy gradient does not vanish on ReLU networks).
    ``options`` are the ascent options of :func:`upi_lightning.attacks.upi_grad.fit_universal`
    (:class:`~upi_lightning.attacks.upi_grad.AscentOptions`).
    """
    if not clamp > 0:
        raise UPIError(f"clamp is the cap beta of the clamped cross-entropy and must be > 0, got {clamp}.")

    def clamped_cross_entropy(x: Tensor, y: Tensor, delta: Tensor, generator: torch.Generator) -> Tensor:
        return F.cross_entropy(model_logits(model, apply_perturbation(x, delta)), y, reduction="none").clamp(max=clamp)

    result = fit_universal(model, batches, clamped_cross_entropy, threat, name="classification_uap", **options)
    result.info["clamp"] = clamp
    return result

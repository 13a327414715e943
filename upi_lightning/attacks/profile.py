"""A model's profile beside its attack results: accuracy, PGD robustness and what its clean maps look like.

Stability numbers alone do not rank models: a map can be "stable" because it is flat, peaked on a few
pixels, or a copy of the image, and a defense can buy map stability with accuracy. The profile puts
beside them, on the attack's held-out samples:

* ``clean_accuracy``;
* ``robust_accuracy`` under PGD for each budget of :class:`RobustSettings` (a sample counts only if it
  is classified correctly under every restart), on the first ``samples`` held-out samples;
* ``topk_mass_share``: mean share of a clean map's L1 mass in its top-k pixels
  (:func:`~upi_lightning.stability.topk_mass_share`, the attack's ``k``), over the correctly classified
  samples, as the attack evaluates them;
* ``map_image_cosine``: mean cosine between those maps and their images
  (:func:`~upi_lightning.stability.map_image_cosine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from upi_lightning.attacks.baselines import RESTART_SEED_STRIDE, predictions
from upi_lightning.attacks.engine import Batches, prepare_batch
from upi_lightning.attacks.pgd import pgd_attack
from upi_lightning.attacks.runner import first_samples
from upi_lightning.attacks.settings import AttackSettings, Budget
from upi_lightning.errors import UPIError
from upi_lightning.model_modes import attack_device, evaluation_mode, gradients_enabled
from upi_lightning.noise import make_generator
from upi_lightning.stability import map_image_cosine, topk_mass_share
from upi_lightning.threat import ThreatModel


@dataclass
class RobustSettings:
    """How the profile measures robust accuracy: PGD on the cross-entropy.

    Attributes:
        budgets: the balls of the PGD attacks, e.g. ``[{norm: linf, eps: 0.1}, {norm: l2, eps: 1.5}]``.
        steps: PGD steps.
        samples: the first this many held-out samples are attacked.
        restarts: random starts per sample; a sample is robust only if it survives all of them.
    """

    budgets: list[Budget] = field(default_factory=lambda: [Budget("linf", 0.1), Budget("l2", 1.5)])
    steps: int = 40
    samples: int = 500
    restarts: int = 1

    def __post_init__(self) -> None:
        checks = [
            (bool(self.budgets), "budgets: give at least one {norm, eps}"),
            (self.steps >= 1, f"steps={self.steps}: at least 1"),
            (self.samples >= 1, f"samples={self.samples}: at least 1"),
            (self.restarts >= 1, f"restarts={self.restarts}: at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UPIError(f"Invalid robust setting {message}.")


def pgd_robust_accuracy(
    model: nn.Module, batches: Batches, threat: ThreatModel, *, steps: int, restarts: int = 1, seed: int = 0
) -> float:
    """Share of the samples of ``batches`` classified correctly under PGD from each of ``restarts`` starts.

    Restart ``r`` draws its starts from ``seed + r *`` :data:`RESTART_SEED_STRIDE`.

    Raises:
        UPIError: if ``batches`` yields no sample.
    """
    device = attack_device(model)
    generators = [make_generator(seed + restart * RESTART_SEED_STRIDE, device) for restart in range(restarts)]
    robust = seen = 0
    for batch in batches:
        x, y = prepare_batch(batch, device)
        survives = predictions(model, x) == y
        for generator in generators:
            adversarial = pgd_attack(model, x, y, threat, steps=steps, generator=generator)
            survives &= predictions(model, adversarial) == y
        robust += int(survives.sum())
        seen += len(x)
    if seen == 0:
        raise UPIError("pgd_robust_accuracy: the data yielded no sample.")
    return robust / seen


def clean_map_profile(model: nn.Module, batches: Batches, settings: AttackSettings) -> dict[str, float]:
    """Clean accuracy and the mean top-k mass share and map-image cosine of the correct samples' maps.

    The maps are the evaluation's (``settings.evaluation_maps()``, the attack's ``k``), of the original
    model for the true class, as :func:`~upi_lightning.attacks.evaluate.evaluate_perturbation` computes them.

    Raises:
        UPIError: if no sample is classified correctly.
    """
    device, maker = attack_device(model), settings.evaluation_maps()
    seen, shares, cosines = 0, [], []
    with evaluation_mode(model), gradients_enabled():
        for batch in batches:
            x, y = prepare_batch(batch, device)
            seen += len(x)
            right = predictions(model, x) == y
            x, y = x[right], y[right]
            if len(x) == 0:
                continue
            maps = maker.maps(model, x, y).detach()
            shares.append(topk_mass_share(maps, settings.k))
            cosines.append(map_image_cosine(maps, x))
    if not shares:
        raise UPIError("No held-out sample is classified correctly: the model has no clean maps to profile.")
    share, cosine = torch.cat(shares), torch.cat(cosines)
    return {
        "clean_accuracy": len(share) / seen,
        "topk_mass_share": share.mean().item(),
        "map_image_cosine": cosine.mean().item(),
        "n_seen": float(seen),
        "n_samples": float(len(share)),
    }


def model_profile(
    model: nn.Module, eval_loader: DataLoader[Any], settings: AttackSettings, robust: RobustSettings
) -> dict[str, Any]:
    """The profile of the module docstring on ``eval_loader`` (the attack's held-out samples).

    Returns:
        :func:`clean_map_profile`'s numbers and ``robust_accuracy``, a list of
        ``{"norm", "eps", "accuracy"}`` (one per robust budget), with ``robust_samples``.
    """
    profile: dict[str, Any] = clean_map_profile(model, eval_loader, settings)
    attacked = first_samples(eval_loader.dataset, robust.samples)
    batches = DataLoader(attacked, batch_size=settings.batch_size)
    profile["robust_samples"] = float(len(attacked))  # type: ignore[arg-type]
    profile["robust_accuracy"] = [
        {
            "norm": budget.norm,
            "eps": budget.eps,
            "accuracy": pgd_robust_accuracy(
                model, batches, budget.threat, steps=robust.steps, restarts=robust.restarts, seed=settings.seed
            ),
        }
        for budget in robust.budgets
    ]
    return profile


def robust_key(row: dict[str, Any]) -> str:
    """``"pgd_<norm>_eps<eps>"`` of a ``robust_accuracy`` row (its budget's tag)."""
    return f"pgd_{Budget(row['norm'], row['eps']).tag}"

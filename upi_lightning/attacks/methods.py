"""The attack methods by name: fit one universal method, or run the per-sample attack on a batch.

``attack.py`` (:class:`~upi_lightning.attacks.runner.AttackRun`) and the ``UPIAttack`` callback both fit
through :func:`fit_method`, from the same :class:`~upi_lightning.attacks.settings.MethodSettings`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from dataclasses import replace

import torch
from torch import Tensor, nn

from upi_lightning.attacks.baselines import fit_classification_uap, fit_per_sample_attack
from upi_lightning.attacks.engine import Batches, Init, UPIFitResult, prepare_batch
from upi_lightning.attacks.settings import FITTED_METHODS, Budget, MethodName, MethodSettings, Target
from upi_lightning.attacks.upi_grad import fit_upi_grad
from upi_lightning.attacks.upi_pca import fit_upi_pca
from upi_lightning.distributed import Reduce, identity
from upi_lightning.errors import UPIError
from upi_lightning.model_modes import evaluation_mode, model_device, model_logits


class PredictedClassBatches:
    """``batches`` with each label replaced by the class ``model`` predicts for the clean image.

    Re-iterable as ``batches`` is (the predictions are made again at every pass, in eval mode, without a
    graph), with its length; used by :func:`fit_method` for ``target: predicted``.

    Raises:
        UPIError: if ``batches`` is a one-shot iterator or has no length (a fit makes several passes).
    """

    def __init__(self, model: nn.Module, batches: Batches) -> None:
        if isinstance(batches, Iterator) or not isinstance(batches, Sized):
            raise UPIError(
                "target 'predicted' relabels the fit batches at every pass: pass a re-iterable with a length "
                f"(a DataLoader or a list of (x, y) batches), not a {type(batches).__name__}."
            )
        self.model, self.batches = model, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = model_device(self.model)
        for batch in self.batches:
            x, _ = prepare_batch(batch, device)
            with torch.no_grad(), evaluation_mode(self.model):
                classes = model_logits(self.model, x).argmax(dim=1)
            yield x, classes  # outside the contexts: the consumer runs between two yields


def attacked_batches(model: nn.Module, batches: Batches, target: Target) -> Batches:
    """The ``(x, classes)`` batches whose maps are attacked: ``batches`` for ``label``, else relabelled."""
    return batches if target == "label" else PredictedClassBatches(model, batches)


def fit_method(
    method: MethodName,
    model: nn.Module,
    batches: Batches,
    budget: Budget,
    settings: MethodSettings,
    *,
    progress: bool = False,
    reduce: Reduce = identity,
    init: Init | Tensor = "random",
) -> UPIFitResult:
    """Fit one universal method (``upi_grad``, ``upi_pca`` or ``uap``) in ``budget``.

    ``reduce`` sums the per-process contributions under DDP (identity on one process); ``init`` warm-starts
    UPI-Grad and the UAP from a previous perturbation. With ``settings.target == "predicted"`` every method
    fits the model's predicted classes (:class:`PredictedClassBatches`).
    """
    batches = attacked_batches(model, batches, settings.target)
    if method == "upi_grad":
        grad = settings.upi_grad
        return fit_upi_grad(
            model,
            batches,
            budget.threat,
            objective=grad.objective(settings.saliency, settings.k),
            epochs=grad.epochs,
            step_size=grad.base_step(budget.eps),
            schedule=grad.schedule,
            init=init,
            cache_clean_maps=grad.cache_clean_maps,
            seed=settings.seed,
            progress=progress,
            reduce=reduce,
            chunk_size=grad.chunk_size,
        )
    if method == "upi_pca":
        pca = settings.upi_pca
        return fit_upi_pca(
            model,
            batches,
            budget.threat,
            objective=pca.objective(settings.saliency, settings.k),
            solver=pca.solver,
            n_iter=pca.n_iter,
            cache_clean_maps=pca.cache_clean_maps,
            seed=settings.seed,
            progress=progress,
            reduce=reduce,
        )
    if method == "uap":
        base = settings.baselines
        return fit_classification_uap(
            model,
            batches,
            budget.threat,
            epochs=base.uap_epochs,
            clamp=base.uap_clamp,
            init=init,
            seed=settings.seed,
            progress=progress,
            reduce=reduce,
        )
    raise UPIError(f"{method!r} is not a fitted universal method: use one of {list(FITTED_METHODS)}.")


def per_sample_deltas(model: nn.Module, budget: Budget, settings: MethodSettings) -> Callable[[Tensor, Tensor], Tensor]:
    """``fn(x, classes)`` running the per-sample attack on a batch (the evaluation passes the target classes).

    Its objective is UPI-Grad's, with ``baselines.per_sample_dissimilarity`` as ``D`` when set; restarts
    and label holding as ``baselines`` says.
    """
    base = settings.baselines
    objective = settings.upi_grad.objective(settings.saliency, settings.k)
    if base.per_sample_dissimilarity is not None:
        objective = replace(objective, dissimilarity=base.per_sample_dissimilarity)

    def attack(x: Tensor, y: Tensor) -> Tensor:
        return fit_per_sample_attack(
            model,
            x,
            y,
            budget.threat,
            objective=objective,
            steps=base.per_sample_steps,
            seed=settings.seed,
            restarts=base.per_sample_restarts,
            hold_label=base.per_sample_hold_label,
        )

    return attack

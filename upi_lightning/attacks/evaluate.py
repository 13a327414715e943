"""Evaluate a perturbation: how much it changes the saliency maps of held-out samples.

Maps are always computed on the **original** model (never a surrogate), for the true class of each
sample (or the class it predicts on the clean image), on the clean image and on ``clip(x + delta, 0, 1)``.
By default only the samples the model classifies correctly are evaluated. Every number is a torchmetrics
state (sums and counts), so under DDP each rank evaluates its own shard and ``compute()`` reduces them
correctly.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric
from tqdm import tqdm  # not tqdm.auto, which calls iter() early and shifts a DataLoader's shuffling

from upi_lightning.attacks.engine import Batches, prepare_batch
from upi_lightning.attacks.settings import TARGETS, Target
from upi_lightning.attribution import check_choice
from upi_lightning.errors import UPIError
from upi_lightning.metrics import AttributionStability, PredictionFlipRate
from upi_lightning.model_modes import attack_device, evaluation_mode, gradients_enabled, model_logits
from upi_lightning.saliency import SaliencyMaps, SaliencySettings
from upi_lightning.threat import apply_perturbation, perturbation_norm

PerSampleDeltas = Callable[[Tensor, Tensor], Tensor]
"""``fn(x, classes) -> (N, C, H, W)``: per-sample perturbations of a batch (e.g. the per-sample attack)."""


def evaluate_perturbation(
    model: nn.Module,
    batches: Batches,
    delta: Tensor | PerSampleDeltas,
    *,
    saliency: SaliencyMaps | None = None,
    k: int = 100,
    only_correct: bool = True,
    progress: bool = False,
    target: Target = "label",
) -> dict[str, float]:
    """Attribution-stability metrics of a perturbation on ``batches`` (on the model's device).

    Args:
        model: the original classifier (eval mode, modes restored).
        batches: iterable of ``(x, y)`` batches of ``[0, 1]`` images.
        delta: a universal ``(C, H, W)`` perturbation, or ``fn(x, classes) -> (N, C, H, W)`` giving per-sample
            perturbations of the evaluated samples of each batch (``classes``: the maps' classes).
        saliency: the maps compared (default: :class:`~upi_lightning.saliency.SaliencySettings`; or Captum's,
            :class:`~upi_lightning.captum_maps.CaptumSaliency`).
        k: top-k size of the top-k intersection and Kendall metrics.
        only_correct: evaluate only the samples the model classifies correctly.
        progress: show a tqdm progress bar.
        target: the maps explain the true ``label`` or the ``predicted`` class of the clean image (the
            same samples are evaluated, and accuracy is always against the labels).

    Returns:
        The means of :class:`upi_lightning.metrics.AttributionStability` (``topk_intersection``,
        ``spearman``, ``kendall``, ``com_shift``, ``relative_l2``, ``cosine``, ``ssim``), ``flip_rate``,
        ``clean_accuracy`` (over all samples seen), the mean ``delta_l2`` and ``delta_linf`` norms, and
        the counts ``n_samples`` (evaluated) and ``n_seen``.

    Raises:
        UPIError: if no sample was evaluated, or on bad images/labels/shapes or a NaN/inf perturbation.

    """
    check_choice("evaluate_perturbation target", target, TARGETS)
    device = attack_device(model)
    maker: SaliencyMaps = SaliencySettings() if saliency is None else saliency
    with evaluation_mode(model), gradients_enabled():  # metric states must not be inference tensors
        stability = AttributionStability(k=k).to(device)
        flips = PredictionFlipRate().to(device)
        counts = {name: SumMetric().to(device) for name in ("n_samples", "n_seen", "n_correct")}
        norms = {name: MeanMetric().to(device) for name in ("delta_l2", "delta_linf")}
        for batch in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
            x, y = prepare_batch(batch, device)
            with torch.no_grad():
                logits = model_logits(model, x)
            correct = logits.argmax(dim=1) == y
            counts["n_seen"].update(torch.tensor(float(len(x)), device=device))
            counts["n_correct"].update(correct.sum().float())
            if only_correct:
                x, y, logits = x[correct], y[correct], logits[correct]
            counts["n_samples"].update(torch.tensor(float(len(x)), device=device))
            if len(x) == 0:
                continue
            classes = y if target == "label" else logits.argmax(dim=1)
            batch_delta = delta(x, classes) if callable(delta) else delta
            batch_delta = batch_delta.detach().to(device=device, dtype=x.dtype)
            if batch_delta.shape not in (x.shape, x.shape[1:]):
                raise UPIError(
                    f"perturbation of shape {tuple(batch_delta.shape)} does not fit images of shape "
                    f"{tuple(x.shape)}; give (C, H, W) or one (C, H, W) per sample."
                )
            if not bool(torch.isfinite(batch_delta).all()):
                raise UPIError("the perturbation contains NaN or inf values; refit it or check its file.")
            perturbed = apply_perturbation(x, batch_delta)
            with torch.no_grad():
                logits_perturbed = model_logits(model, perturbed)
            maps_clean = maker.maps(model, x, classes)
            maps_perturbed = maker.maps(model, perturbed, classes, clean=x)
            stability.update(maps_clean, maps_perturbed)
            flips.update(logits, logits_perturbed)
            per_sample = batch_delta.expand_as(x)
            norms["delta_l2"].update(perturbation_norm(per_sample, "l2", per_sample=True))
            norms["delta_linf"].update(perturbation_norm(per_sample, "linf", per_sample=True))
    totals = {name: metric.compute().item() for name, metric in counts.items()}
    if totals["n_samples"] == 0:
        raise UPIError(
            "No sample was evaluated (no batch, or no correctly classified sample); check the data and "
            "the model, or pass only_correct=False."
        )
    results = {name: value.item() for name, value in stability.compute().items()}
    results["flip_rate"] = flips.compute().item()
    results.update({name: metric.compute().item() for name, metric in norms.items()})
    results["clean_accuracy"] = totals["n_correct"] / totals["n_seen"]
    results["n_samples"] = totals["n_samples"]
    results["n_seen"] = totals["n_seen"]
    return results


def evaluate_draws(model: nn.Module, batches: Batches, deltas: Sequence[Tensor], **kwargs: Any) -> dict[str, float]:
    """Evaluate several perturbations (e.g. random draws) and summarize them.

    Returns, for every key of :func:`evaluate_perturbation`, the mean over draws under the same key and
    the sample standard deviation under ``<key>_std`` (0 for one draw), plus ``n_draws``.
    """
    if not deltas:
        raise UPIError("evaluate_draws needs at least one perturbation.")
    runs = [evaluate_perturbation(model, batches, delta, **kwargs) for delta in deltas]
    summary: dict[str, float] = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        summary[key] = statistics.fmean(values)
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    summary["n_draws"] = float(len(runs))
    return summary


def maps_under_perturbations(
    model: nn.Module, images: Tensor, labels: Tensor, deltas: Mapping[str, Tensor], saliency: SaliencyMaps
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clean maps of ``images`` and, by name, their maps under each universal perturbation (for figures).

    Maps of the original model for ``labels``, SmoothGrad noise shared with the clean maps; CPU tensors.
    """
    with evaluation_mode(model), gradients_enabled():
        clean = saliency.maps(model, images, labels)
        perturbed = {
            name: saliency.maps(model, apply_perturbation(images, delta.to(images.device)), labels, clean=images).cpu()
            for name, delta in deltas.items()
        }
    return clean.cpu(), perturbed

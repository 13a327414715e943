"""torchmetrics metrics of attribution stability, correct under DDP.

Each class is thin: it adds the per-sample values of a :mod:`upi_lightning.stability` function to a
``total`` and counts them in ``count`` (both ``dist_reduce_fx="sum"``) and returns ``total / count``, so
the result over several DDP processes with unequal shards is exactly the mean over all samples (``nan``
before the first update, as for ``torchmetrics.MeanMetric``).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

from upi_lightning.stability import (
    center_of_mass_shift,
    check_k,
    kendall_rank_correlation,
    map_cosine_similarity,
    map_ssim,
    prediction_flips,
    relative_l2_dissimilarity,
    spearman_rank_correlation,
    topk_intersection,
)


class PerSampleMean(Metric):
    """Mean over all samples of a per-sample comparison ``per_sample(clean, perturbed) -> (N,)``.

    States: ``total`` (sum of the values) and ``count`` (number of samples), both summed across
    processes, so the result is exact under DDP with unequal shards.
    """

    is_differentiable = False
    full_state_update = False
    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @abstractmethod
    def per_sample(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        """Return the ``(N,)`` values to average (a function of this module)."""

    @override
    def update(self, clean: Tensor, perturbed: Tensor) -> None:
        """Add the per-sample values of a batch of (clean, perturbed) maps or logits."""
        values = self.per_sample(clean.detach(), perturbed.detach())
        self.total += values.sum(dtype=torch.float64)
        self.count += values.numel()

    @override
    def compute(self) -> Tensor:
        """Return the mean over every sample seen (on every process)."""
        return (self.total / self.count).float()


class _TopKMetric(PerSampleMean):
    def __init__(self, k: int = 100, **kwargs: Any) -> None:
        check_k(k)
        super().__init__(**kwargs)
        self.k = k


class TopKIntersection(_TopKMetric):
    """Mean :func:`topk_intersection` (fraction of shared top-``k`` pixels; 1 = unchanged)."""

    higher_is_better = True

    @override
    def per_sample(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        return topk_intersection(clean, perturbed, self.k)


class KendallRankCorrelation(_TopKMetric):
    """Mean :func:`kendall_rank_correlation` (tau-b on the union of the top-``k`` sets)."""

    higher_is_better = True

    @override
    def per_sample(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        return kendall_rank_correlation(clean, perturbed, self.k)


class SpearmanRankCorrelation(PerSampleMean):
    """Mean :func:`spearman_rank_correlation` of the maps."""

    higher_is_better = True

    @override
    def per_sample(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        return spearman_rank_correlation(clean, perturbed)


class CenterOfMassShift(PerSampleMean):
    """Mean :func:`center_of_mass_shift` in pixels."""

    higher_is_better = False

    @override
    def per_sample(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        return center_of_mass_shift(clean, perturbed)


class RelativeL2Dissimilarity(PerSampleMean):
    """Mean :func:`relative_l2_dissimilarity` ``||clean - perturbed|| / ||clean||``."""

    higher_is_better = False

    @override
    def per_sample(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        return relative_l2_dissimilarity(clean, perturbed)


class MapCosineSimilarity(PerSampleMean):
    """Mean :func:`map_cosine_similarity` of the maps."""

    higher_is_better = True

    @override
    def per_sample(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        return map_cosine_similarity(clean, perturbed)


class MapSSIM(PerSampleMean):
    """Mean :func:`map_ssim` of the maps (Gaussian window of std ``sigma``)."""

    higher_is_better = True

    def __init__(self, sigma: float = 1.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sigma = sigma

    @override
    def per_sample(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        return map_ssim(clean, perturbed, self.sigma)


class PredictionFlipRate(PerSampleMean):
    """Fraction of samples whose predicted class changes; ``update(logits_clean, logits_perturbed)``."""

    higher_is_better = False

    @override
    def per_sample(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        return prediction_flips(clean, perturbed)


class AttributionStability(MetricCollection):
    """All map metrics at once: ``update(maps_clean, maps_perturbed)``, ``compute() -> dict``.

    Keys (before ``prefix`` / ``postfix``): ``topk_intersection``, ``spearman``, ``kendall``,
    ``com_shift``, ``relative_l2``, ``cosine``, ``ssim``. Compute groups are disabled: every metric has
    the same ``total`` / ``count`` state names, and torchmetrics would otherwise merge metrics whose
    states happen to be equal after the first batch (e.g. all 1 on identical maps).

    Args:
        k: top-k size of ``topk_intersection`` and ``kendall``.
        ssim_sigma: Gaussian window std of ``ssim``.
        prefix: prepended to every key (e.g. ``"val/"``).
        postfix: appended to every key.
    """

    def __init__(
        self, k: int = 100, ssim_sigma: float = 1.5, prefix: str | None = None, postfix: str | None = None
    ) -> None:
        super().__init__(
            {
                "topk_intersection": TopKIntersection(k),
                "spearman": SpearmanRankCorrelation(),
                "kendall": KendallRankCorrelation(k),
                "com_shift": CenterOfMassShift(),
                "relative_l2": RelativeL2Dissimilarity(),
                "cosine": MapCosineSimilarity(),
                "ssim": MapSSIM(ssim_sigma),
            },
            prefix=prefix,
            postfix=postfix,
            compute_groups=False,
        )

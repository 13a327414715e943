r"""Attribution stability as plain functions: how much a perturbation changes saliency maps and predictions.

Each function compares two batches of maps ``a`` (clean) and ``b`` (perturbed), of shape ``(N, H, W)``
(or ``(N, D)`` for the rank metrics), and returns one value per sample ``(N,)``; the torchmetrics
classes of :mod:`upi_lightning.metrics` average them (torchmetrics' functional layer).

Conventions, chosen so that no metric ever returns ``nan`` on valid maps:

* **Top-k** is taken by a stable descending sort of the flattened map: among equal values the lower
  row-major index comes first (so an all-zero map's top-k are its first ``k`` pixels).
* **Ranks** are average ranks (ties share the mean of the positions they span).
* **Degenerate maps**: when a correlation or similarity is undefined because a map is constant (all
  zero, say) on the compared entries, it is ``1`` if both maps are constant there (no evidence of a
  change) and ``0`` if only one is. The center of mass of an all-zero map is the image center; the
  relative L2 distance divides by ``||b||`` when ``a`` is all-zero (so it is ``1``, or ``0`` if both
  are zero).

The maps are meant to be saliency maps (non-negative, as :func:`upi_lightning.saliency.normalize_map`
returns); the functions do not check it.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

from upi_lightning.errors import UPIError

# Kendall's tau materializes (chunk, 2k, 2k) pair tensors; chunk the samples to keep them this small.
_KENDALL_PAIRS_PER_CHUNK = 1 << 24


def _check_pair(a: Tensor, b: Tensor, spatial: bool = False) -> None:
    """Raise :class:`UPIError` unless ``a`` and ``b`` are same-shape batches of maps."""
    if a.shape != b.shape:
        raise UPIError(
            f"maps to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}; "
            "compute both with the same model input size."
        )
    expected = "(N, H, W)" if spatial else "(N, H, W) or (N, D)"
    if a.dim() not in ((3,) if spatial else (2, 3)) or a.shape[0] == 0 or a[0].numel() == 0:
        raise UPIError(f"maps must be a non-empty batch of shape {expected}, got {tuple(a.shape)}.")


def check_k(k: int, size: int | None = None) -> None:
    """Raise :class:`UPIError` unless ``k`` is an integer ``>= 1`` (and ``<= size`` when given)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UPIError(f"k must be a positive integer, got {k!r}.")
    if size is not None and k > size:
        raise UPIError(f"k={k} is larger than the map ({size} pixels); choose k <= {size}.")


def _degenerate_ratio(numerator: Tensor, denominator: Tensor, flat_a: Tensor, flat_b: Tensor) -> Tensor:
    """Return ``numerator / denominator`` per sample, with the degenerate rule where the denominator is 0.

    There the value is 1 if both maps are flat (``flat_a & flat_b``: constant on the compared entries)
    and 0 if only one is.
    """
    fallback = (flat_a & flat_b).to(numerator.dtype)
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, fallback)


def topk_indices(maps: Tensor, k: int) -> Tensor:
    """Return the ``(N, k)`` indices of the ``k`` largest entries of each flat map (ties: lower index)."""
    return maps.flatten(1).sort(dim=1, descending=True, stable=True).indices[:, :k]


def _topk_mask(flat: Tensor, k: int) -> Tensor:
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, topk_indices(flat, k), True)


def topk_intersection(a: Tensor, b: Tensor, k: int) -> Tensor:
    r"""Fraction of shared top-``k`` entries, :math:`|T_k(a) \cap T_k(b)| / k`, per sample.

    Raises:
        UPIError: on maps of different shapes or ``k`` outside ``[1, H * W]``.
    """
    _check_pair(a, b)
    check_k(k, a[0].numel())
    flat_a, flat_b = a.flatten(1), b.flatten(1)
    return (_topk_mask(flat_a, k) & _topk_mask(flat_b, k)).sum(dim=1).to(a.dtype) / k


def average_ranks(values: Tensor) -> Tensor:
    """Ranks ``1..D`` of each row of ``(N, D)`` values, ties getting the mean of the ranks they span."""
    sorted_values, order = values.sort(dim=1, stable=True)
    positions = torch.arange(values.shape[1], device=values.device).expand_as(order)
    starts = torch.ones_like(order, dtype=torch.bool)
    starts[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, positions, 0).cummax(dim=1).values
    last = torch.where(ends, positions, values.shape[1]).flip(1).cummin(dim=1).values.flip(1)
    ranks = (first + last).to(values.dtype if values.is_floating_point() else torch.float32) / 2 + 1
    return torch.empty_like(ranks).scatter_(1, order, ranks)


def _pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of the rows of ``(N, D)`` tensors; degenerate rows as in the module doc."""
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    norm_x, norm_y = x.norm(dim=1), y.norm(dim=1)
    return _degenerate_ratio((x * y).sum(dim=1), norm_x * norm_y, norm_x == 0, norm_y == 0)


def spearman_rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    r"""Spearman's :math:`\rho` per sample: Pearson correlation of the average ranks of the two maps.

    Raises:
        UPIError: on maps of different shapes.
    """
    _check_pair(a, b)
    return _pearson(average_ranks(a.flatten(1)), average_ranks(b.flatten(1)))


def kendall_rank_correlation(a: Tensor, b: Tensor, k: int) -> Tensor:
    r"""Kendall's :math:`\tau_b` per sample on the union :math:`U = T_k(a) \cup T_k(b)` of the top-k sets.

    :math:`\tau_b = \frac{\sum_{i<j} \mathrm{sgn}(a_i - a_j)\,\mathrm{sgn}(b_i - b_j)}
    {\sqrt{(n_0 - n_a)(n_0 - n_b)}}` over the pairs of :math:`U`, with :math:`n_0 = |U|(|U|-1)/2` and
    :math:`n_a, n_b` the pairs tied in ``a`` and in ``b``. Cost :math:`O(N k^2)` instead of
    :math:`O(N (HW)^2)`.

    Raises:
        UPIError: on maps of different shapes or ``k`` outside ``[1, H * W]``.
    """
    _check_pair(a, b)
    check_k(k, a[0].numel())
    flat_a, flat_b = a.flatten(1), b.flatten(1)
    chunk = max(1, _KENDALL_PAIRS_PER_CHUNK // (2 * k) ** 2)
    return torch.cat(
        [_kendall_tau_b_topk(ca, cb, k) for ca, cb in zip(flat_a.split(chunk), flat_b.split(chunk), strict=True)]
    )


def _kendall_tau_b_topk(flat_a: Tensor, flat_b: Tensor, k: int) -> Tensor:
    top_a, top_b = topk_indices(flat_a, k), topk_indices(flat_b, k)
    in_top_a = torch.zeros_like(flat_a, dtype=torch.bool).scatter_(1, top_a, True)
    union = torch.cat([top_a, top_b], dim=1)  # (N, 2k): entries of top_b already in top_a are masked out
    valid = torch.cat([torch.ones_like(top_a, dtype=torch.bool), ~in_top_a.gather(1, top_b)], dim=1)
    sign_a = _pairwise_signs(flat_a.gather(1, union))
    sign_b = _pairwise_signs(flat_b.gather(1, union))
    upper = torch.ones(2 * k, 2 * k, dtype=torch.bool, device=flat_a.device).triu(1)
    pairs = valid[:, :, None] & valid[:, None, :] & upper
    concordance = (sign_a * sign_b * pairs).sum(dim=(1, 2))
    n_0 = pairs.sum(dim=(1, 2))
    untied_a = n_0 - ((sign_a == 0) & pairs).sum(dim=(1, 2))
    untied_b = n_0 - ((sign_b == 0) & pairs).sum(dim=(1, 2))
    dtype = flat_a.dtype
    return _degenerate_ratio(
        concordance.to(dtype), (untied_a * untied_b).to(dtype).sqrt(), untied_a == 0, untied_b == 0
    )


def _pairwise_signs(values: Tensor) -> Tensor:
    return torch.sign(values[:, :, None] - values[:, None, :]).to(torch.int8)


def center_of_mass(maps: Tensor) -> Tensor:
    r"""Center of mass ``(N, 2)`` (row, column) in pixels, :math:`\sum_p m_p\, p / \sum_p m_p`.

    An all-zero map has its center at the image center ``((H - 1) / 2, (W - 1) / 2)``.
    """
    height, width = maps.shape[-2:]
    rows = torch.arange(height, dtype=maps.dtype, device=maps.device)
    cols = torch.arange(width, dtype=maps.dtype, device=maps.device)
    mass = maps.sum(dim=(1, 2))
    moments = torch.stack([(maps.sum(dim=2) * rows).sum(dim=1), (maps.sum(dim=1) * cols).sum(dim=1)], dim=1)
    image_center = torch.tensor([(height - 1) / 2, (width - 1) / 2], dtype=maps.dtype, device=maps.device)
    safe_mass = torch.where(mass != 0, mass, torch.ones_like(mass))[:, None]
    return torch.where((mass != 0)[:, None], moments / safe_mass, image_center)


def center_of_mass_shift(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance in pixels between the centers of mass of the two maps, per sample.

    Raises:
        UPIError: on maps of different shapes or not ``(N, H, W)``.
    """
    _check_pair(a, b, spatial=True)
    return (center_of_mass(a) - center_of_mass(b)).norm(dim=1)


def relative_l2_dissimilarity(a: Tensor, b: Tensor) -> Tensor:
    r"""Relative change :math:`\|a - b\|_2 / \|a\|_2` per sample (``a`` is the clean map).

    An all-zero ``a`` divides by :math:`\|b\|_2` instead: 1 if ``b`` is non-zero, 0 if both are zero.

    Raises:
        UPIError: on maps of different shapes.
    """
    _check_pair(a, b)
    diff = (a - b).flatten(1).norm(dim=1)
    norm_a, norm_b = a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)
    denominator = torch.where(norm_a > 0, norm_a, norm_b)
    return diff / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def map_cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    r"""Cosine similarity :math:`\langle a, b\rangle / (\|a\| \|b\|)` of the flattened maps, per sample.

    Two all-zero maps give 1, one all-zero map gives 0.

    Raises:
        UPIError: on maps of different shapes.
    """
    _check_pair(a, b)
    flat_a, flat_b = a.flatten(1), b.flatten(1)
    norm_a, norm_b = flat_a.norm(dim=1), flat_b.norm(dim=1)
    return _degenerate_ratio((flat_a * flat_b).sum(dim=1), norm_a * norm_b, norm_a == 0, norm_b == 0)


def topk_mass_share(maps: Tensor, k: int) -> Tensor:
    """Share of each map's L1 mass in its ``k`` largest entries ``(N,)``: how concentrated the map is.

    ``|map|`` is used; a flat map gives ``k / (H * W)``, a map on ``k`` pixels or fewer gives 1. An all-zero
    map counts as flat (``k / (H * W)``).

    Args:
        maps: saliency maps ``(N, H, W)``.
        k: size of the top set, ``1 <= k <= H * W``.

    Raises:
        UPIError: on maps that are not ``(N, H, W)`` or a bad ``k``.
    """
    if maps.dim() != 3:
        raise UPIError(f"maps must be (N, H, W), got shape {tuple(maps.shape)}.")
    flat = maps.flatten(1).abs()
    check_k(k, flat.shape[1])
    top = flat.gather(1, topk_indices(flat, k)).sum(dim=1)
    total = flat.sum(dim=1)
    flat_share = torch.full_like(total, k / flat.shape[1])
    return torch.where(total > 0, top / torch.where(total > 0, total, torch.ones_like(total)), flat_share)


def map_image_cosine(maps: Tensor, images: Tensor) -> Tensor:
    """Cosine between ``|map|`` and its image averaged over channels, per sample ``(N,)``.

    Near 1, the map is a copy of the image (as training on the map-image cosine can make it), not an
    explanation of the prediction. Degenerate cases as :func:`map_cosine_similarity`.

    Args:
        maps: saliency maps ``(N, H, W)``.
        images: their images ``(N, C, H, W)``.

    Raises:
        UPIError: when the images' ``(N, H, W)`` differ from the maps'.
    """
    if images.dim() != 4 or images.shape[:1] + images.shape[2:] != maps.shape:
        raise UPIError(
            f"images {tuple(images.shape)} must be (N, C, H, W) with (N, H, W) = the maps' {tuple(maps.shape)}."
        )
    return map_cosine_similarity(maps.abs(), images.mean(dim=1).to(maps.dtype))


def _rescale_to_unit_max(maps: Tensor) -> Tensor:
    peak = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def map_ssim(a: Tensor, b: Tensor, sigma: float = 1.5) -> Tensor:
    """SSIM per sample of the two maps, each rescaled to a maximum of 1 (an all-zero map stays zero).

    Uses :func:`torchmetrics.functional.image.structural_similarity_index_measure` with a Gaussian
    window of std ``sigma`` (size ``2 * int(3.5 sigma + 0.5) + 1``, reflection padding) and
    ``data_range=1``. Two all-zero maps give 1.

    Raises:
        UPIError: on maps of different shapes, not ``(N, H, W)``, or smaller than the window's padding.
    """
    _check_pair(a, b, spatial=True)
    pad = int(3.5 * sigma + 0.5)
    if sigma <= 0 or min(a.shape[-2:]) <= pad:
        raise UPIError(
            f"SSIM with sigma={sigma} needs sigma > 0 and maps larger than {pad} pixels per side, got "
            f"{tuple(a.shape[-2:])}; use a smaller sigma."
        )
    return cast(
        Tensor,
        structural_similarity_index_measure(
            _rescale_to_unit_max(a)[:, None],
            _rescale_to_unit_max(b)[:, None],
            sigma=sigma,
            data_range=1.0,
            reduction="none",
        ),
    )


def prediction_flips(logits_clean: Tensor, logits_perturbed: Tensor) -> Tensor:
    """``1.0`` where the predicted class (argmax of the logits ``(N, K)``) changes, else ``0.0``.

    Raises:
        UPIError: on logits of different or non-``(N, K)`` shapes.
    """
    if logits_clean.shape != logits_perturbed.shape or logits_clean.dim() != 2:
        raise UPIError(
            "prediction flips need two logit batches of the same shape (N, K), got "
            f"{tuple(logits_clean.shape)} and {tuple(logits_perturbed.shape)}."
        )
    return (logits_clean.argmax(dim=1) != logits_perturbed.argmax(dim=1)).float()

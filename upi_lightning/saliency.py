r"""Saliency maps: normalized attributions, the settings object that names them, maps that share noise.

A saliency map is :func:`normalize_map` of an attribution (:mod:`upi_lightning.attribution`): ``abs``,
sum over channels, divided by its sum, so each ``H x W`` map sums to 1 (an all-zero attribution stays an
all-zero map). :class:`SaliencySettings` carries the method and its options from the command line to
:meth:`SaliencySettings.maps`, the one function that computes the maps of clean images and of their
perturbed copies with shared SmoothGrad noise, used by the objective, the evaluation and the figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from upi_lightning.attribution import (
    SALIENCY_METHODS,
    SCORE_KINDS,
    SMOOTHGRAD_SAMPLES,
    SaliencyMethod,
    ScoreKind,
    attribution,
    check_choice,
    input_gradient,
)
from upi_lightning.errors import UPIError, check_count
from upi_lightning.model_modes import gradients_enabled
from upi_lightning.noise import sample_normal

__all__ = [
    "SALIENCY_METHODS",
    "SCORE_KINDS",
    "SMOOTHGRAD_SAMPLES",
    "SaliencyMaps",
    "SaliencyMethod",
    "SaliencySettings",
    "ScoreKind",
    "attribution",
    "copies_of",
    "input_gradient",
    "normalize_map",
    "saliency_map",
    "smoothgrad_noise",
]


def smoothgrad_noise(x: Tensor, y: Tensor, n_samples: int, seed: int = 0) -> Tensor:
    """Standard-normal SmoothGrad draws ``(n_samples, N, C, H, W)`` keyed by each sample ``(x_i, y_i)``.

    The draws of a sample come from its own generator (:func:`~upi_lightning.noise.sample_normal`,
    seeded from ``seed`` and the sample's content), so they do not depend on batching or on the number
    of processes.

    Raises:
        UPIError: if ``y`` is not a tensor of one class per image (the draws are keyed by it).
    """
    if not isinstance(y, Tensor) or y.shape != (len(x),):
        raise UPIError(f"SmoothGrad draws need one class per image, a tensor of shape ({len(x)},); got {y!r}.")
    return sample_normal(x, y, n_samples, torch.Generator(device=x.device).manual_seed(seed))


class SaliencyMaps(Protocol):
    """What the evaluation computes maps with (see :meth:`SaliencySettings.maps`).

    :class:`SaliencySettings`, or Captum's :class:`~upi_lightning.captum_maps.CaptumSaliency`.
    """

    def maps(
        self,
        model: nn.Module,
        images: Tensor,
        y: Tensor | None,
        *,
        clean: Tensor | None = None,
        noise_seed: int = 0,
        create_graph: bool = False,
    ) -> Tensor: ...


def copies_of(images: Tensor, clean: Tensor | None) -> int:
    """How many copies of the ``clean`` images ``images`` holds (1 when ``clean`` is ``None``).

    Raises:
        UPIError: if ``images`` is not a whole number of copies of ``clean``.
    """
    reference = images if clean is None else clean
    copies, rest = divmod(len(images), len(reference))
    if rest or copies == 0:
        raise UPIError(f"{len(images)} images are not copies of the {len(reference)} clean images.")
    return copies


@dataclass
class SaliencySettings:
    """The saliency maps under attack and evaluated: one object from the command line to the maps.

    Attributes:
        method: ``gradient``, ``grad_x_input``, ``integrated_gradients`` or ``smoothgrad``.
        score: ``logit``, ``probability`` or ``log_probability``: the class score whose gradient is the map.
        n_steps: integrated-gradients steps.
        n_samples: SmoothGrad noisy copies.
        sigma: SmoothGrad noise std (pixel units).

    Raises:
        UPIError: on an unknown method or score, ``n_steps < 1``, ``n_samples < 1`` or ``sigma < 0``.
    """

    method: SaliencyMethod = "gradient"
    score: ScoreKind = "logit"
    n_steps: int = 16
    n_samples: int = SMOOTHGRAD_SAMPLES
    sigma: float = 0.15

    def __post_init__(self) -> None:
        check_choice("saliency method", self.method, SALIENCY_METHODS)
        check_choice("score", self.score, SCORE_KINDS)
        for name in ("n_steps", "n_samples"):
            check_count(f"saliency {name}", getattr(self, name))
        if not self.sigma >= 0:
            raise UPIError(f"SmoothGrad sigma is a noise std in pixel units and must be >= 0, got {self.sigma}.")

    def method_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`attribution` that ``method`` uses."""
        if self.method == "integrated_gradients":
            return {"n_steps": self.n_steps}
        if self.method == "smoothgrad":
            return {"n_samples": self.n_samples, "sigma": self.sigma}
        return {}

    def maps(
        self,
        model: nn.Module,
        images: Tensor,
        y: Tensor | None,
        *,
        clean: Tensor | None = None,
        noise_seed: int = 0,
        create_graph: bool = False,
    ) -> Tensor:
        """Saliency maps ``(N * m, H, W)`` of ``images``, copies of the ``clean`` images that share their noise.

        ``images`` holds ``m`` copies of the ``N`` clean images (e.g. perturbed ones) stacked copy-major,
        or the clean images themselves (``clean=None``, ``m = 1``); ``y`` holds the ``N`` classes of the
        clean samples (``None``: each image's predicted class). SmoothGrad maps of every copy average over
        the draws of its clean sample (:func:`smoothgrad_noise` with ``noise_seed``): common random
        numbers, so a zero perturbation changes no map and a change measures the perturbation, not the
        draw. Without ``y`` the draws cannot be keyed and come from the global generator.

        Raises:
            UPIError: if ``images`` is not a whole number of copies of ``clean``.
        """
        reference = images if clean is None else clean
        copies = copies_of(images, clean)
        kwargs = self.method_kwargs()
        if self.method == "smoothgrad" and y is not None:
            kwargs["noise"] = smoothgrad_noise(reference, y, self.n_samples, noise_seed).repeat(1, copies, 1, 1, 1)
        target = None if y is None else y.repeat(copies)
        return saliency_map(model, images, target, self.method, score=self.score, create_graph=create_graph, **kwargs)


def normalize_map(attr: Tensor) -> Tensor:
    r"""Saliency map ``(N, H, W)`` of an attribution ``(N, C, H, W)``.

    :math:`I_{hw} = \sum_c |A_{chw}| \,/\, \sum_{h'w'} \sum_c |A_{ch'w'}|`, so every map is
    non-negative and sums to 1. An all-zero attribution gives an all-zero map (the denominator is
    replaced by 1), never NaN; the operation is differentiable.

    Raises:
        UPIError: if ``attr`` is not 4-dimensional.
    """
    if attr.dim() != 4:
        raise UPIError(f"normalize_map needs an attribution of shape (N, C, H, W), got {tuple(attr.shape)}.")
    heat = attr.abs().sum(dim=1)
    total = heat.sum(dim=(1, 2), keepdim=True)
    return heat / torch.where(total > 0, total, torch.ones_like(total))


def saliency_map(
    model: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    method: SaliencyMethod = "gradient",
    **kwargs: Any,
) -> Tensor:
    """:func:`normalize_map` of :func:`attribution` (same arguments): ``(N, H, W)`` maps summing to 1.

    The normalization also runs with autograd on, so ``create_graph=True`` gives a differentiable map
    even under ``torch.no_grad`` / ``torch.inference_mode``.
    """
    with gradients_enabled():
        return normalize_map(attribution(model, x, target, method, **kwargs))

"""Evaluation maps from Captum (optional extra ``captum``): any Captum attribution class, normalized as ours.

Captum's attributions cannot build a graph (``create_graph``), so they never drive an attack or a
training term (the attack differentiates :class:`~upi_lightning.saliency.SaliencySettings` maps).
:class:`CaptumSaliency` computes the maps an attack is *evaluated* on instead:
``evaluate_perturbation(..., saliency=CaptumSaliency("IntegratedGradients"))``, or ``attack.py``'s
``attack.captum`` section.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from upi_lightning.attribution import SCORE_KINDS, ScoreKind, check_choice
from upi_lightning.errors import UPIError
from upi_lightning.model_modes import evaluation_mode, gradients_enabled
from upi_lightning.saliency import copies_of, normalize_map


@dataclass
class CaptumSaliency:
    """Maps :func:`~upi_lightning.saliency.normalize_map` of ``Method(model).attribute(x, target=y, ...)``.

    Deterministic methods compare clean and perturbed maps exactly; a stochastic one (e.g. ``GradientShap``)
    draws its own noise for each, so its metrics also measure that noise.

    Attributes:
        method: a class of ``captum.attr`` by name (``Saliency``, ``IntegratedGradients``,
            ``InputXGradient``, ``DeepLift``, ``GuidedBackprop``...), or the import path of any class with
            Captum's interface (built from the forward function, ``attribute(inputs, target=...)``).
        score: ``logit``, ``probability`` or ``log_probability``: the class score attributed.
        attribute_kwargs: more arguments of ``attribute``, e.g. ``{n_steps: 16, method: riemann_middle}``.

    Raises:
        UPIError: on an unknown score.
    """

    method: str = "Saliency"
    score: ScoreKind = "logit"
    attribute_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("score", self.score, SCORE_KINDS)

    @classmethod
    def of(cls, attribution_class: type, score: ScoreKind = "logit", **attribute_kwargs: Any) -> CaptumSaliency:
        """The maps of a Captum attribution class, e.g. ``CaptumSaliency.of(captum.attr.Saliency)``."""
        return cls(f"{attribution_class.__module__}.{attribution_class.__qualname__}", score, attribute_kwargs)

    def attribution_class(self) -> type:
        """The class :attr:`method` names.

        Raises:
            UPIError: if captum is not installed, or there is no such class.
        """
        module_name, _, name = self.method.rpartition(".")
        try:
            module = importlib.import_module(module_name or "captum.attr")
        except ImportError as err:
            raise UPIError(
                f"Captum maps {self.method!r} need {err.name}: pip install 'upi-lightning[captum]'."
            ) from None
        found = getattr(module, name, None)
        if not isinstance(found, type):
            raise UPIError(f"No attribution class {name!r} in {module.__name__}; e.g. Saliency, IntegratedGradients.")
        return found

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
        """Maps ``(N * m, H, W)`` of ``images`` (``m`` copies of the ``clean`` images) for the classes ``y``.

        The interface of :meth:`upi_lightning.saliency.SaliencySettings.maps`; ``y = None`` attributes each
        image's predicted class, ``noise_seed`` is unused.

        Raises:
            UPIError: with ``create_graph`` (Captum's maps cannot be differentiated).
        """
        if create_graph:
            raise UPIError("Captum maps cannot be differentiated (create_graph); attacks use SaliencySettings maps.")
        copies = copies_of(images, clean)
        forward = {
            "logit": model,
            "probability": nn.Sequential(model, nn.Softmax(dim=1)),
            "log_probability": nn.Sequential(model, nn.LogSoftmax(dim=1)),
        }[self.score]
        with evaluation_mode(model), gradients_enabled():
            inputs = images.detach().clone().requires_grad_(True)
            if y is None:
                with torch.no_grad():
                    target = model(inputs).argmax(dim=1)
            else:
                target = y.repeat(copies)
            attribution = self.attribution_class()(forward).attribute(inputs, target=target, **self.attribute_kwargs)
        return normalize_map(attribution.detach())

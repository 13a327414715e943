r"""Adversarial training with a consistent representation (Dong et al. 2017).

.. math::

    R = \mathrm{CE}(f(x_{adv}), y) + \lambda \frac1N \sum_i \|\phi(x_i) - \phi(x_{adv,i})\|_2^2,

with :math:`\phi` a feature layer read by a forward hook and :math:`x_{adv}` a PGD example.
"""

from __future__ import annotations

import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from upi_lightning.errors import UPIError
from upi_lightning.regularizers.adversarial import AdversarialExamples
from upi_lightning.regularizers.base import TrainingBatch, check_weight, per_sample_squared_norm
from upi_lightning.threat import Norm


class Consistency(AdversarialExamples):
    r"""Adversarial training with a consistent representation (Dong et al. 2017).

    .. math::

        R = \mathrm{CE}(f(x_{adv}), y) + \lambda \frac1N \sum_i \|\phi(x_i) - \phi(x_{adv,i})\|_2^2,

    added to the clean cross-entropy, with :math:`\phi` the output of the feature layer ``layer`` (a
    submodule name of the classifier, e.g. ``net.1.classifier.2`` for the activation after the first
    fully connected layer of ``small_cnn``; ``None``: the input of the last ``nn.Linear``, the
    penultimate features) read with a forward hook during the training-mode forward passes of ``x`` (the
    shared clean pass) and ``x_adv`` (PGD on the eval-mode model). Both sides are differentiated.

    Args:
        weight: ``lambda >= 0``.
        layer: submodule name of the feature layer, or ``None``.
        norm: ``"l2"`` or ``"linf"``.
        eps: radius (pixel units).
        steps: PGD steps (1 with a random start: "fast" adversarial training).
        step_size: PGD step (``None``: ``2.5 * eps / steps``).
        random_start: random start in the ball.
        warmup_steps: the radius grows linearly over the first ``warmup_steps`` optimizer steps, from
            ``eps / warmup_steps`` to ``eps`` (the step size with it); ``0``: ``eps`` from the start.
    """

    name = "consistency"

    def __init__(
        self,
        weight: float = 1.0,
        layer: str | None = None,
        norm: Norm = "linf",
        eps: float = 0.3,
        steps: int = 1,
        step_size: float | None = None,
        random_start: bool = True,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(norm, eps, steps, step_size, random_start, warmup_steps)
        self.weight = check_weight("Consistency weight", weight)
        self.layer = layer
        self._features: list[Tensor] = []
        self._handle: RemovableHandle | None = None

    def _record(self, layer: nn.Module, features: Tensor) -> None:
        """Keep the features of training-mode forward passes (the eval-mode attack passes are skipped)."""
        if layer.training:
            self._features.append(features)

    def _record_input(self, layer: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._record(layer, args[0])

    def _record_output(self, layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        self._record(layer, output)

    def on_train_batch_start(self, module: LightningModule) -> None:
        """Register the feature hook for this step (removed once the term is computed).

        Raises:
            UPIError: if ``layer`` is not a submodule name of ``module`` (or, for ``layer=None``, the
                model has no ``nn.Linear``).
        """
        super().on_train_batch_start(module)
        self.remove_hook()
        if self.layer is None:
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise UPIError("Consistency(layer=None) needs a model with an nn.Linear layer; name a layer.")
            self._handle = linears[-1].register_forward_pre_hook(self._record_input)
            return
        try:
            target = module.get_submodule(self.layer)
        except AttributeError as err:
            names = ", ".join(name for name, _ in module.named_modules() if name)
            raise UPIError(f"Consistency layer {self.layer!r} not found; choose one of: {names}.") from err
        self._handle = target.register_forward_hook(self._record_output)

    def remove_hook(self) -> None:
        """Remove the feature hook and drop the recorded features."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._features = []

    def __call__(self, batch: TrainingBatch) -> Tensor:
        try:
            logits_adv = batch.model(self.adversarial(batch))
            if self._handle is None or len(self._features) < 2:
                raise UPIError(
                    "Consistency did not see the features of the clean and adversarial forward passes; "
                    "its on_train_batch_start hook must run before the clean forward pass."
                )
            clean, adversarial = self._features[0], self._features[-1]
        finally:
            self.remove_hook()
        distance = per_sample_squared_norm(clean - adversarial).mean()
        return F.cross_entropy(logits_adv, batch.y) + self.weight * distance

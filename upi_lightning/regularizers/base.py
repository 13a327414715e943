r"""The regularizer plug-in contract: what a training mode sees of a step, and how it is configured.

The training loss of a batch is

.. math::

    L = \frac1N \sum_i \mathrm{CE}(f(x_i), y_i) + \sum_r R_r,

one term :math:`R_r` per :class:`Regularizer` of ``Classifier(regularizers=[...])``. A regularizer
returns its term from a :class:`TrainingBatch`, and is rebuilt from its primitive :meth:`Regularizer.config`
(``{"class_path", "init_args"}``) by :func:`regularizer_from_config`; its state travels in checkpoints
under :data:`CHECKPOINT_KEY`. This module imports no training mode and no LightningModule.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from upi_lightning.distributed import Reduce, identity
from upi_lightning.errors import UPIError
from upi_lightning.threat import Norm, ThreatModel

CHECKPOINT_KEY = "upi_regularizers"
"""Checkpoint entry holding ``[{"class_path": ..., "state": ...}, ...]``, one per regularizer."""

PACKAGE = __name__.rpartition(".")[0]
"""``upi_lightning.regularizers``: the public import path of the built-in training modes."""


@dataclass
class TrainingBatch:
    """What a regularizer sees of one training step.

    Attributes:
        model: the network ``[0, 1]`` pixels -> logits, in training mode (``Classifier.net``).
        x: the images ``(N, C, H, W)``; they require grad when a regularizer has ``needs_input_grad``.
        y: the true classes ``(N,)``.
        logits: ``model(x)``, part of the graph of the loss.
        ce: per-sample cross-entropy ``(N,)`` of ``logits``.
        reduce: sum of a tensor over all processes (``trainer.strategy.reduce(..., reduce_op="sum")``).
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    logits: Tensor
    ce: Tensor
    reduce: Reduce = identity


def check_weight(name: str, value: float) -> float:
    """Return ``value`` as a float if it is finite and ``>= 0``, else raise :class:`UPIError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise UPIError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def per_sample_squared_norm(tensor: Tensor) -> Tensor:
    r"""Return :math:`\|t_i\|_2^2` of every row of a batch ``(N, ...)`` as ``(N,)``."""
    return tensor.flatten(1).pow(2).sum(dim=1)


def true_class_input_gradient(logits: Tensor, x: Tensor, y: Tensor, create_graph: bool = True) -> Tensor:
    r"""Return :math:`g_i = \nabla_{x_i} z_{y_i}` ``(N, C, H, W)`` from ``logits`` computed from ``x`` (requiring grad).

    One backward pass of the summed true-class logits. The graph of ``logits`` is kept, so the loss can
    still be differentiated; with ``create_graph`` the result is differentiable w.r.t. the parameters
    (double backprop).
    """
    true_logits = logits.gather(1, y[:, None]).sum()
    (grad,) = torch.autograd.grad(true_logits, x, create_graph=create_graph, retain_graph=True)
    return grad


def class_path(cls: type) -> str:
    """Return the import path of ``cls`` that configs and checkpoints store.

    A built-in training mode is defined in a submodule of :data:`PACKAGE` and re-exported by it: its path
    is ``upi_lightning.regularizers.<Class>``, the one configs name and checkpoints hold. Any other
    class keeps ``<its module>.<Class>``.
    """
    module = cls.__module__
    if module.rpartition(".")[0] == PACKAGE and getattr(sys.modules.get(PACKAGE), cls.__qualname__, None) is cls:
        module = PACKAGE
    return f"{module}.{cls.__qualname__}"


class Regularizer:
    """Base class: a term added to the clean cross-entropy, with optional state and hooks.

    Subclasses implement :meth:`__call__` and store every constructor argument under an attribute of
    the same name (so :meth:`config` can rebuild them). Hooks default to doing nothing.

    Attributes:
        name: short name; the classifier logs the term as ``train/<name>``.
        needs_input_grad: the term differentiates the clean forward pass w.r.t. ``x``.
    """

    name: ClassVar[str] = "regularizer"
    needs_input_grad: ClassVar[bool] = False

    def __call__(self, batch: TrainingBatch) -> Tensor:
        """Return the scalar term of ``batch`` (differentiable w.r.t. the model parameters)."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__.")

    def config(self) -> dict[str, Any]:
        """Return ``{"class_path": ..., "init_args": {...}}``: primitives that rebuild this regularizer."""
        parameters = inspect.signature(type(self).__init__).parameters
        init_args = {name: getattr(self, name) for name in parameters if name != "self"}
        return {"class_path": class_path(type(self)), "init_args": init_args}

    def diagnostics(self) -> dict[str, float | Tensor]:
        """Scalars (numbers or 0-d tensors) describing the last :meth:`__call__` (none by default).

        The classifier logs each one at every training step as ``train/<name>/<key>``, beside the term.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Return the state to checkpoint (tensors and primitives only; empty by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""

    def on_fit_start(self, module: LightningModule) -> None:
        """Called by the classifier's ``on_fit_start`` (model on its device, before the sanity check)."""

    def on_train_batch_start(self, module: LightningModule) -> None:
        """Called by the classifier's ``on_train_batch_start``, before the clean forward pass."""

    def on_train_epoch_end(self, module: LightningModule) -> None:
        """Called by the classifier's ``on_train_epoch_end`` (``module.log`` is allowed here)."""


class BallRegularizer(Regularizer):
    """A regularizer that attacks in a ball: its ``norm`` and ``eps`` arguments, checked once as :attr:`threat`."""

    threat: ThreatModel

    @property
    def norm(self) -> Norm:
        """The ball's norm (a constructor argument, so :meth:`config` rebuilds it)."""
        return self.threat.norm

    @property
    def eps(self) -> float:
        """The ball's radius (a constructor argument, so :meth:`config` rebuilds it)."""
        return self.threat.eps


def regularizer_from_config(config: Mapping[str, Any]) -> Regularizer:
    """Build a regularizer from ``{"class_path": "pkg.module.Class", "init_args": {...}}``.

    Raises:
        UPIError: if the class cannot be imported, is not a :class:`Regularizer`, or has no option of a
            name in ``init_args``.
    """
    path = config.get("class_path")
    if not isinstance(path, str) or "." not in path:
        raise UPIError(f"A regularizer config needs a 'class_path' like 'pkg.module.Class', got {dict(config)!r}.")
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise UPIError(f"Cannot import the regularizer class {path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
        raise UPIError(f"{path!r} is not a subclass of upi_lightning.regularizers.Regularizer.")
    init_args = dict(config.get("init_args") or {})
    options = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    unknown = [name for name in init_args if name not in options]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise UPIError(f"{cls.__name__} has no option {names}; its options: {', '.join(options)}.")
    return cls(**init_args)


def build_regularizers(items: Sequence[Regularizer | Mapping[str, Any]] | None) -> list[Regularizer]:
    """Return the regularizers of ``items``: instances as they are, configs through :func:`regularizer_from_config`."""
    built = []
    for item in items or ():
        if isinstance(item, Regularizer):
            built.append(item)
        elif isinstance(item, Mapping):
            built.append(regularizer_from_config(item))
        else:
            raise UPIError(f"regularizers must hold Regularizer objects or their configs, got {type(item).__name__}.")
    return built


def log_keys(regularizers: Sequence[Regularizer]) -> list[str]:
    """Return the ``train/<name>`` log key of each regularizer (``train/<name>_<index>`` for repeated names)."""
    names = [reg.name for reg in regularizers]
    return [f"train/{name}" if names.count(name) == 1 else f"train/{name}_{i}" for i, name in enumerate(names)]

r"""Training modes of :class:`~upi_lightning.module.Classifier`: terms added to the clean cross-entropy.

The training loss of a batch is

.. math::

    L = \frac1N \sum_i \mathrm{CE}(f(x_i), y_i) + \sum_r R_r,

one term :math:`R_r` per regularizer of ``Classifier(regularizers=[...])`` (they compose by summation).
A regularizer is a small object: :meth:`Regularizer.__call__` returns its term from a
:class:`TrainingBatch` (the clean forward pass is shared by all terms), and hooks let it keep state
across steps (the UPI ``delta``), write that state into checkpoints and log to TensorBoard.

* :class:`InputGradientNorm`: double backprop (Ross & Doshi-Velez 2018).
* :class:`InterpretationRegularization`: alignment with a teacher's SmoothGrad maps (Noack et al. 2021).
* :class:`UPIAdversarial`: stability of the saliency maps under a running universal perturbation.
* :class:`Consistency`: adversarial training with a feature-consistency loss (Dong et al. 2017).
* :class:`PGDAdversarial`: PGD adversarial training (Madry et al. 2018).

Which forward pass is differentiated: the input-gradient terms (:class:`InputGradientNorm`,
:class:`InterpretationRegularization`) differentiate the clean training-mode forward pass itself
(``torch.autograd.grad(..., create_graph=True)``, no extra forward). With BatchNorm in training mode a
sample's logits depend on the whole batch, so those gradients are those of the batch-level loss, which
is still a well-defined differentiable objective; for networks without BatchNorm they are exactly the
per-sample gradients. The UPI term and the PGD attacks use the eval-mode model (the shared saliency
and attack code), like the attacks they defend against. Every term keeps the clean cross-entropy in
the loss, so every parameter receives a gradient (no unused parameters under DDP).

Checkpoints: regularizers are not ``nn.Module`` children of the classifier, so their state never
enters ``state_dict`` (a plain ``Classifier`` loads a regularized checkpoint strictly); the classifier
stores their :meth:`Regularizer.state_dict` under :data:`CHECKPOINT_KEY` and their primitive
:meth:`Regularizer.config` in its hyperparameters.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.pgd import pgd_attack
from upi_lightning.attacks.upi_grad import Reduce, check_steps, fit_upi_grad, identity
from upi_lightning.errors import UPIError
from upi_lightning.perturbation import Norm, check_eps, check_norm, perturbation_norm
from upi_lightning.saliency import attribution
from upi_lightning.sample_cache import SampleCache

CHECKPOINT_KEY = "upi_regularizers"
"""Checkpoint entry holding ``[{"class_path": ..., "state": ...}, ...]``, one per regularizer."""

TEACHER_CHUNK = 2048
"""Largest number of noisy copies the IR teacher differentiates in one backward pass (bounds memory)."""


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


def check_count(name: str, value: int) -> int:
    """Return ``value`` if it is an integer ``>= 1``, else raise :class:`UPIError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UPIError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


def check_weight(name: str, value: float) -> float:
    """Return ``value`` as a float if it is finite and ``>= 0``, else raise :class:`UPIError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise UPIError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


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
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

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


def regularizer_from_config(config: Mapping[str, Any]) -> Regularizer:
    """Build a regularizer from ``{"class_path": "pkg.module.Class", "init_args": {...}}``.

    Raises:
        UPIError: if the class cannot be imported or is not a :class:`Regularizer`.
    """
    class_path = config.get("class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        raise UPIError(f"A regularizer config needs a 'class_path' like 'pkg.module.Class', got {dict(config)!r}.")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise UPIError(f"Cannot import the regularizer class {class_path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
        raise UPIError(f"{class_path!r} is not a subclass of upi_lightning.regularizers.Regularizer.")
    return cls(**config.get("init_args", {}))


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


def per_sample_squared_norm(tensor: Tensor) -> Tensor:
    r"""Return :math:`\|t_i\|_2^2` of every row of a batch ``(N, ...)`` as ``(N,)``."""
    return tensor.flatten(1).pow(2).sum(dim=1)


class InputGradientNorm(Regularizer):
    r"""Double backprop (Ross & Doshi-Velez 2018): the squared input-gradient norm of the cross-entropy.

    :math:`R = \frac{\lambda}{2} \frac1N \sum_i \|\nabla_{x_i} \mathrm{CE}(f(x_i), y_i)\|_2^2`.

    The input gradients come from one ``autograd.grad`` of the summed cross-entropy of the clean
    forward pass, with ``create_graph=True`` so the term is differentiable w.r.t. the parameters.

    Args:
        weight: ``lambda >= 0`` (``0`` gives plain cross-entropy training).
    """

    name = "input_gradient_norm"
    needs_input_grad = True

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = check_weight("InputGradientNorm weight", weight)

    def __call__(self, batch: TrainingBatch) -> Tensor:
        (grad,) = torch.autograd.grad(batch.ce.sum(), batch.x, create_graph=True)
        return 0.5 * self.weight * per_sample_squared_norm(grad).mean()


def threshold_beyond_one_std(attr: Tensor) -> Tensor:
    r"""Keep, per sample, the entries farther than one std from the sample's mean; zero the others.

    :math:`t_j = a_j \cdot [\,|a_j - \mu| > \sigma\,]` with :math:`\mu, \sigma` the mean and std of the
    ``C * H * W`` entries of the sample (the IR authors' thresholding of SmoothGrad targets).
    """
    flat = attr.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True)
    return torch.where((flat - mean).abs() > std, flat, torch.zeros_like(flat)).view_as(attr)


class InterpretationRegularization(Regularizer):
    r"""Interpretation regularization (Noack et al. 2021) with SmoothGrad targets of a teacher.

    .. math::

        R = l_{cs}\Big(1 - \frac1N \sum_i \cos(g_i, s_i)\Big) + l_{gm} \|G\|_F,
        \qquad g_i = \nabla_{x_i} z_{y_i}(x_i),

    with ``G`` the ``N x (C H W)`` matrix of the signed true-class logit gradients of the batch (built with
    ``create_graph=True``) and ``s_i`` the SmoothGrad attribution of class ``y_i`` by the teacher
    (``n_samples`` noisy copies with noise std ``sigma`` in pixel units; by default thresholded with
    :func:`threshold_beyond_one_std`). The teacher is ``Classifier.load_from_checkpoint(teacher_ckpt)``,
    loaded at fit start (or on first use), frozen and never part of the student's ``state_dict``.

    Target caching: with ``cache_targets`` the targets are memoized by image content (a hash of the
    pixels and the label), so each training image costs one teacher SmoothGrad for the whole run: the
    first epoch computes them, later epochs reuse them. The cache holds one float map per distinct
    image (on the CPU, not in checkpoints); with data augmentation almost every image is new, so
    disable caching (or augmentation) there.

    Args:
        teacher_ckpt: checkpoint of a trained :class:`~upi_lightning.module.Classifier`.
        l_cs: weight of the cosine term (IR on MNIST: 3.0; CIFAR-10 WRN: 0.75).
        l_gm: weight of the gradient-magnitude term (MNIST: 0.15; CIFAR-10 WRN: 0.005).
        n_samples: SmoothGrad noisy copies.
        sigma: SmoothGrad noise std (pixel units).
        threshold: apply :func:`threshold_beyond_one_std` to the targets.
        cache_targets: memoize the targets by image content.
    """

    name = "interpretation_regularization"
    needs_input_grad = True

    def __init__(
        self,
        teacher_ckpt: str,
        l_cs: float = 3.0,
        l_gm: float = 0.15,
        n_samples: int = 50,
        sigma: float = 0.15,
        threshold: bool = True,
        cache_targets: bool = True,
    ) -> None:
        self.teacher_ckpt = str(teacher_ckpt)
        self.l_cs = check_weight("l_cs", l_cs)
        self.l_gm = check_weight("l_gm", l_gm)
        self.n_samples = check_count("IR n_samples", n_samples)
        self.sigma = check_weight("IR SmoothGrad sigma", sigma)
        self.threshold = threshold
        self.cache_targets = cache_targets
        self._teacher: nn.Module | None = None
        self._cache = SampleCache(storage="cpu")

    def teacher(self, device: torch.device) -> nn.Module:
        """Return the frozen eval-mode teacher network on ``device`` (loaded on first call).

        Raises:
            UPIError: if ``teacher_ckpt`` is not a file.
        """
        if self._teacher is None:
            path = Path(self.teacher_ckpt)
            if not path.is_file():
                raise UPIError(
                    f"IR teacher checkpoint {path} not found; train a teacher first (e.g. train.py fit "
                    "--config configs/mnist.yaml) and set teacher_ckpt to its checkpoint."
                )
            # module.py imports this module, so the classifier is imported here, when it is needed
            from upi_lightning.module import Classifier

            teacher = Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
            self._teacher = teacher.net.eval().requires_grad_(False)
        return self._teacher.to(device)

    def teacher_targets(self, x: Tensor, y: Tensor) -> Tensor:
        """Compute the (thresholded) teacher SmoothGrad attributions ``(N, C, H, W)`` of classes ``y``."""
        attr = attribution(
            self.teacher(x.device),
            x,
            y,
            "smoothgrad",
            n_samples=self.n_samples,
            sigma=self.sigma,
            internal_batch_size=TEACHER_CHUNK,
        )
        return threshold_beyond_one_std(attr) if self.threshold else attr

    def targets(self, x: Tensor, y: Tensor) -> Tensor:
        """Return the targets ``s`` ``(N, C, H, W)`` of a batch, from the cache where possible."""
        x, y = x.detach(), y.detach()
        if not self.cache_targets:
            return self.teacher_targets(x, y)
        return self._cache(self.teacher_targets, x, y)

    def __call__(self, batch: TrainingBatch) -> Tensor:
        true_logits = batch.logits.gather(1, batch.y[:, None]).sum()
        (grad,) = torch.autograd.grad(true_logits, batch.x, create_graph=True)
        targets = self.targets(batch.x, batch.y)
        cosine = F.cosine_similarity(grad.flatten(1), targets.flatten(1), dim=1)
        return self.l_cs * (1 - cosine.mean()) + self.l_gm * torch.linalg.vector_norm(grad)

    def on_fit_start(self, module: LightningModule) -> None:
        """Load the teacher now, so a wrong path fails before training starts."""
        self.teacher(module.device)


class UPIAdversarial(Regularizer):
    r"""Training against a running universal perturbation for interpretation (this project's mode).

    .. math::

        R = \lambda \frac1N \sum_i D\big(I(\mathrm{clip}(x_i + \delta)), I(x_i)\big)

    with ``I`` and ``D`` the saliency map and dissimilarity of the :class:`UPIObjective` built from
    ``objective``; the perturbed maps are differentiated w.r.t. the parameters (double backprop), the
    clean maps are the (detached) reference, as in the attack.
    Every ``every_n_steps`` training steps, ``delta`` takes ``ascent_steps`` UPI-Grad steps
    (:func:`upi_lightning.attacks.upi_grad.fit_upi_grad`, constant step size, warm-started from the current
    ``delta``; the first update starts from a random point of the ball) on the current batch. The gradient
    w.r.t. ``delta`` is summed over processes through ``TrainingBatch.reduce``, so every rank trains
    against the same ``delta`` (universal adversarial training, Shafahi et al. 2020).

    ``objective`` may set a softplus surrogate (``surrogate_beta``) for a ReLU network: it is used to fit
    ``delta`` only; the training term always differentiates the model itself, and ignores the
    objective's ``keep_prediction`` penalty. ``delta``, the step and update counters and the last
    objective value are saved in checkpoints; at every training epoch end ``delta`` is logged to
    TensorBoard as the image ``train/upi_delta`` (grey = 0, scaled to the largest absolute entry), with
    its norm and the last objective value as scalars.

    Args:
        weight: ``lambda >= 0``.
        norm: ``"l2"`` or ``"linf"``.
        eps: radius of the ball of ``delta`` (pixel units).
        every_n_steps: update ``delta`` at training steps ``0, k, 2k, ...``.
        ascent_steps: UPI-Grad steps per update.
        step_size: UPI-Grad step (``None``: the UPI-Grad default, ``eps / 4`` for L2, ``eps / 10`` for Linf).
        objective: keyword arguments of :class:`UPIObjective` (``method``, ``dissimilarity``,
            ``surrogate_beta``, ``sigma``, ...).
        seed: seeds the random start and the smoothing noise of the updates.
    """

    name = "upi_adversarial"

    def __init__(
        self,
        weight: float = 1.0,
        norm: Norm = "l2",
        eps: float = 1.0,
        every_n_steps: int = 1,
        ascent_steps: int = 1,
        step_size: float | None = None,
        objective: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.weight = check_weight("UPIAdversarial weight", weight)
        self.norm = check_norm(norm)
        self.eps = check_eps(eps)
        check_count("every_n_steps", every_n_steps)
        check_steps("constant", step_size, "ascent_steps", ascent_steps)
        self.every_n_steps = every_n_steps
        self.ascent_steps = ascent_steps
        self.step_size = step_size
        self.objective = dict(objective or {})
        try:
            self.attack_objective = UPIObjective(**self.objective)
        except TypeError as err:
            raise UPIError(f"Invalid UPIAdversarial objective {self.objective}: {err}") from err
        self.train_objective = replace(self.attack_objective, surrogate_beta=None, keep_prediction=0.0)
        self.seed = seed
        self.delta: Tensor | None = None
        self.train_steps = 0
        self.updates = 0
        self.last_objective = math.nan

    def update(self, model: nn.Module, x: Tensor, y: Tensor, reduce: Reduce) -> None:
        """Take ``ascent_steps`` UPI-Grad steps of ``delta`` on the batch ``(x, y)``."""
        result = fit_upi_grad(
            model,
            [(x, y)] * self.ascent_steps,
            norm=self.norm,
            eps=self.eps,
            objective=self.attack_objective,
            epochs=1,
            step_size=self.step_size,
            schedule="constant",
            init="random" if self.delta is None else self.delta,
            reduce=reduce,
            seed=self.seed + self.updates,
        )
        self.delta = result.delta
        self.updates += 1
        self.last_objective = result.history[-1]

    def __call__(self, batch: TrainingBatch) -> Tensor:
        x = batch.x.detach()
        if self.train_steps % self.every_n_steps == 0:
            self.update(batch.model, x, batch.y, batch.reduce)
        self.train_steps += 1
        # the objective builds the maps with create_graph=True for a delta that requires grad; this is what
        # makes the term differentiable w.r.t. the parameters (the gradient w.r.t. delta is not used)
        delta = self.delta.to(x).detach().requires_grad_(True)
        return self.weight * self.train_objective.dissimilarity_term(batch.model, x, batch.y, delta).mean()

    def state_dict(self) -> dict[str, Any]:
        """Return ``delta`` (CPU, or ``None`` before the first update) and the counters."""
        delta = None if self.delta is None else self.delta.detach().cpu()
        return {
            "delta": delta,
            "train_steps": self.train_steps,
            "updates": self.updates,
            "last_objective": self.last_objective,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``delta`` and the counters."""
        self.delta = state["delta"]
        self.train_steps = int(state["train_steps"])
        self.updates = int(state["updates"])
        self.last_objective = float(state["last_objective"])

    def on_train_epoch_end(self, module: LightningModule) -> None:
        """Log ``delta`` as an image and its norm and last objective value as scalars."""
        if self.delta is None:
            return
        delta = self.delta.detach().float().cpu()
        # identical on every rank: sync_dist only silences Lightning's epoch-level DDP warning
        module.log("train/upi_delta_norm", perturbation_norm(delta, self.norm).item(), sync_dist=True)
        module.log("train/upi_objective", self.last_objective, sync_dist=True)
        image = 0.5 + delta / (2 * delta.abs().max().clamp_min(1e-12))
        for logger in module.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("train/upi_delta", image, module.global_step)


class AdversarialExamples(Regularizer):
    """Base of the regularizers trained on PGD examples (:func:`upi_lightning.attacks.pgd.pgd_attack`).

    Args:
        norm: ``"l2"`` or ``"linf"``.
        eps: radius of each sample's ball (pixel units).
        steps: PGD steps.
        step_size: PGD step (``None``: ``2.5 * eps / steps``).
        random_start: start PGD from a random point of the ball.
    """

    def __init__(self, norm: Norm, eps: float, steps: int, step_size: float | None, random_start: bool) -> None:
        self.norm = check_norm(norm)
        self.eps = check_eps(eps)
        check_steps("constant", step_size, "steps", steps)
        self.steps = steps
        self.step_size = step_size
        self.random_start = random_start

    def adversarial(self, batch: TrainingBatch) -> Tensor:
        """Return PGD examples of the batch (model in eval mode during the attack, detached result)."""
        return pgd_attack(
            batch.model,
            batch.x,
            batch.y,
            norm=self.norm,
            eps=self.eps,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
        )


class PGDAdversarial(AdversarialExamples):
    r"""PGD adversarial training (Madry et al. 2018), the classic baseline.

    The loss becomes :math:`(1 - w)\,\mathrm{CE}(x) + w\,\mathrm{CE}(x_{adv})`, written as the term
    :math:`R = w\,(\mathrm{CE}(x_{adv}) - \mathrm{CE}(x))` added to the clean cross-entropy: ``w = 1`` is
    Madry's min-max training, ``w = 0.5`` Goodfellow et al.'s mix, ``w = 0`` plain training. ``x_adv`` is
    computed by PGD on the eval-mode model, then forwarded in training mode.

    Args:
        weight: ``w`` in ``[0, 1]``.
        norm: ``"l2"`` or ``"linf"``.
        eps: radius (pixel units; Madry MNIST: Linf 0.3).
        steps: PGD steps (Madry MNIST: 40).
        step_size: PGD step (``None``: ``2.5 * eps / steps``; Madry MNIST: 0.01).
        random_start: random start in the ball.
    """

    name = "pgd_adversarial"

    def __init__(
        self,
        weight: float = 1.0,
        norm: Norm = "linf",
        eps: float = 0.3,
        steps: int = 40,
        step_size: float | None = None,
        random_start: bool = True,
    ) -> None:
        super().__init__(norm, eps, steps, step_size, random_start)
        if not 0 <= check_weight("PGDAdversarial weight", weight) <= 1:
            raise UPIError(f"PGDAdversarial weight is the share of the adversarial loss, in [0, 1]; got {weight}.")
        self.weight = float(weight)

    def __call__(self, batch: TrainingBatch) -> Tensor:
        adversarial_ce = F.cross_entropy(batch.model(self.adversarial(batch)), batch.y)
        return self.weight * (adversarial_ce - batch.ce.mean())


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
    ) -> None:
        super().__init__(norm, eps, steps, step_size, random_start)
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
